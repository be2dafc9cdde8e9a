"""A service for the secrets delivery tests: writes what it was given (a secret as env, its engine token's reach)
to $OUT as JSON, then idles until stopped."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request


def status_of(path: str) -> int:
    request = urllib.request.Request(f"{os.environ['VAULT_ADDR']}/v1/{path}",
                                     headers={"X-Vault-Token": os.environ.get("VAULT_TOKEN", "")})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


report = {"DB_PASSWORD": os.environ.get("DB_PASSWORD"), "own": status_of(os.environ["OWN"]),
          "other": status_of(os.environ["OTHER"]), "token_prefix": os.environ.get("VAULT_TOKEN", "")[:4]}
tmp = os.environ["OUT"] + ".tmp"
with open(tmp, "w") as fh:
    json.dump(report, fh)
os.replace(tmp, os.environ["OUT"])
while True:
    time.sleep(60)
