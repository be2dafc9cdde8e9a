"""A service for the secrets delivery tests: writes what it was given (a secret as env, its engine token's reach,
its pid) to $OUT as JSON, then idles; on SIGHUP it reads its secret again through the API with its own token and
writes the report again (what a service with change_mode: signal does)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from shipyard.sdk import config, secrets


def get(path: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"{os.environ['VAULT_ADDR']}/v1/{path}",
                                     headers={"X-Vault-Token": os.environ.get("VAULT_TOKEN", "")})
    # An engine over HTTPS: its CA, as the instance is told (VAULT_CACERT), as Vault's clients do.
    context = ssl.create_default_context(cafile=os.environ["VAULT_CACERT"]) if os.environ.get("VAULT_CACERT") else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def write(report: dict[str, Any]) -> None:
    tmp = os.environ["OUT"] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh)
    os.replace(tmp, os.environ["OUT"])


def secret_files() -> dict[str, Any]:
    folder = os.environ.get("SECRETS_DIR", "")
    if not folder:
        return {}
    files = {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}
    modes = {name: oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in files}
    return {"dir": folder, "dir_mode": oct(os.stat(folder).st_mode & 0o777), "files": files, "modes": modes}


report = {"DB_PASSWORD": os.environ.get("DB_PASSWORD"), "own": get(os.environ["OWN"])[0],
          "other": get(os.environ["OTHER"])[0], "token_prefix": os.environ.get("VAULT_TOKEN", "")[:4],
          "accessor": (get("auth/token/lookup-self")[1] or {}).get("data", {}).get("accessor"),
          "secret_files": secret_files(), "pid": os.getpid(), "signals": 0,
          "token": os.environ.get("VAULT_TOKEN", ""),  # the tests look for it in the server's data dir
          "vault_addr": os.environ.get("VAULT_ADDR", "")}


class DbSecrets(config.Settings):
    password: str = ""


def reread(signum: int, frame: object) -> None:
    # The SDK's typed read, with the instance's own token (VAULT_ADDR and VAULT_TOKEN from its environment).
    report["DB_PASSWORD"] = secrets.load(DbSecrets, os.environ["OWN"]).password
    report["same_by_get"] = secrets.get(os.environ["OWN"] + "#password") == report["DB_PASSWORD"]
    report["signals"] += 1
    report["secret_files"] = secret_files()
    write(report)


signal.signal(signal.SIGHUP, reread)
write(report)
while True:
    time.sleep(60)
