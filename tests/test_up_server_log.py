"""`shipyard up` reads what the server it started says in DIRECTORY/.shipyard/server.log, a file every server started
there appends to: only the lines written since this start count (an earlier run's "ready" and secrets engine address
must not be taken for this one's, which made a second `make demo` fail at the secrets engine)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from shipyard.cli.lifecycle_commands import vault_dev_note

OLD = ("secrets engine in dev mode (in memory unless a data dir; never for production). VAULT_ADDR=http://127.0.0.1:8200"
       " root token: hvs.old\nINFO shipyard.server: shipyard server ready: http://127.0.0.1:8500\n")
NEW = ("secrets engine in dev mode (in memory unless a data dir; never for production). VAULT_ADDR=https://127.0.0.1:8200"
       " root token: hvs.new\nINFO shipyard.server: shipyard server ready: https://127.0.0.1:8501\n")


def test_the_note_waits_for_this_servers_ready_line_not_an_earlier_ones(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vault-dev.json").write_text(json.dumps({"root_token": "hvs.new"}))
    log = tmp_path / "server.log"
    log.write_text(OLD)
    started = log.stat().st_size

    def server_comes_up() -> None:
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(NEW)

    writer = threading.Thread(target=server_comes_up)
    writer.start()
    note = vault_dev_note(tmp_path, 8200, started)
    writer.join()
    assert "VAULT_ADDR=https://127.0.0.1:8200 VAULT_TOKEN=hvs.new" in note, note
