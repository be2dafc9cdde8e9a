"""The first hour of a new user, through the real `shipyard` CLI as subprocesses: relative paths, code changes,
crash loops, down, ps, logs, restart/scale progress, Ctrl-C of a server, and the README's "Your first service"."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# A service that logs to both streams (each line a moment apart, so the shim reads them in order) and answers
# GET / with MESSAGE, which tests change in the file to make a code change.
APP = '''\
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
MESSAGE = "first"
for n, stream in enumerate((sys.stdout, sys.stderr, sys.stdout, sys.stderr), 1):
    stream.write(f"{'out' if stream is sys.stdout else 'err'} {n}\\n")
    stream.flush()
    time.sleep(0.3)
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = MESSAGE.encode()
        if self.path != "/health":
            print(f"request {self.path}", flush=True)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''
CRASH = '''\
import sys
print("starting", flush=True)
sys.stderr.write("Traceback (most recent call last):\\nKeyError: 'DATABASE_URL'\\n")
sys.exit(3)
'''


def project(directory: Path, name: str = "web", instances: int = 1, app: str = APP, health: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.py").write_text(app)
    check = "    health: {http: /health, interval: 500ms}\n" if health else ""
    (directory / "shipyard.yaml").write_text(
        f"services:\n  {name}:\n    cmd: python app.py\n    instances: {instances}\n    ports: [http]\n{check}"
        "    update: {max_parallel: 1, min_healthy_time: 500ms}\n    restart: {initial: 200ms, max: 500ms}\n")
    return directory


def cli_env(addr: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SHIPYARD_HTTP_ADDR": addr, "SHIPYARD_DNS_PORT": "0", "SHIPYARD_GATEWAY_PORT": "0",
           "COLUMNS": "100", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("CONSUL_HTTP_ADDR", None)
    return env


def shipyard(*args: str, cwd: Path, env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def answering(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def live_shims(data_dir: Path) -> list[int]:
    pids = []
    for state_file in (data_dir / "agent" / "instances").glob("*/state.json"):
        pid = json.loads(state_file.read_text())["shim_pid"]
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            pids.append(pid)
    return pids


def instance_port(addr: str, service: str, cwd: Path) -> int:
    allocs = json.loads(shipyard("ps", service, "--json", cwd=cwd, env=cli_env(addr)).stdout)["allocations"]
    return int(next(a for a in allocs if a["desired"] == "run")["status"]["ports"]["http"])


def down_quietly(addr: str, directory: Path) -> None:
    """Cleanup after a failed test: whatever `up` started for `directory` goes."""
    shipyard("down", str(directory), cwd=directory, env=cli_env(addr), timeout=90)
    pid_file = directory / ".shipyard" / "server.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("first-hour") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


# ---- 1: every relative path is resolved against the caller's working directory ----------------------------------


@pytest.mark.timeout(400)
def test_up_with_relative_paths_from_several_directories(tmp_path: Path) -> None:
    proj = project(tmp_path / "proj")
    (tmp_path / "elsewhere").mkdir()
    addr = f"127.0.0.1:{free_port()}"
    env = cli_env(addr)
    try:
        for cwd, where in ((tmp_path, "proj"), (proj, "."), (tmp_path / "elsewhere", "../proj")):
            up = shipyard("up", where, "--timeout", "60", cwd=cwd, env=env)
            assert up.returncode == 0, up.stdout + up.stderr
            assert "all services healthy" in up.stdout
            assert "exit code" not in up.stdout
            down = shipyard("down", where, cwd=cwd, env=env)
            assert down.returncode == 0, down.stdout + down.stderr
            assert "stopped the shipyard server" in down.stdout
    finally:
        down_quietly(addr, proj)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("data_dir_args", [["--data-dir", "./data"], []], ids=["data-dir ./data", "default"])
def test_server_with_relative_data_dir_runs_instances(tmp_path: Path, data_dir_args: list[str]) -> None:
    project(tmp_path / "proj")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--http-port", str(port), "--dns-port", "0",
           "--no-gateway", *data_dir_args]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    data_dir = tmp_path / ("data" if data_dir_args else "shipyard-data")
    try:
        while not answering(addr):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.1)
        deployed = shipyard("deploy", "proj", "--timeout", "60", cwd=tmp_path, env=cli_env(addr))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "all services healthy" in deployed.stdout
        assert live_shims(data_dir)
        assert shipyard("down", cwd=tmp_path, env=cli_env(addr)).returncode == 0
        assert not live_shims(data_dir)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        for pid in live_shims(data_dir):
            os.kill(pid, signal.SIGTERM)


def test_a_missing_workdir_is_one_line_before_anything_is_sent(tmp_path: Path) -> None:
    proj = project(tmp_path / "proj")
    (proj / "shipyard.yaml").write_text((proj / "shipyard.yaml").read_text().replace(
        "    cmd: python app.py\n", "    cmd: python app.py\n    workdir: src\n"))
    done = shipyard("deploy", "proj", cwd=tmp_path, env=cli_env(f"127.0.0.1:{free_port()}"))  # no server there
    assert done.returncode == 1
    assert done.stderr == f"error: web: workdir 'src' is not a directory ({proj / 'src'})\n"


# ---- 2: a code change is a new version; --dry-run shows the plan --------------------------------------------------


@pytest.mark.timeout(300)
def test_deploy_rolls_out_a_code_change_and_dry_run_shows_it(quiet_server: ServerProcess, tmp_path: Path) -> None:
    proj = project(tmp_path / "code", name="code", instances=2)
    (proj / "__pycache__").mkdir()
    env = cli_env(quiet_server.addr)
    first = shipyard("deploy", ".", "--timeout", "60", cwd=proj, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    port = instance_port(quiet_server.addr, "code", proj)
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "first"

    (proj / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"ignored")
    again = shipyard("deploy", ".", cwd=proj, env=env)
    assert again.returncode == 0 and "code: unchanged" in again.stdout, again.stdout + again.stderr

    (proj / "app.py").write_text(APP.replace('MESSAGE = "first"', 'MESSAGE = "second"'))
    (proj / "extra.py").write_text("")
    plan = shipyard("deploy", ".", "--dry-run", cwd=proj, env=env)
    assert plan.returncode == 0, plan.stderr
    assert "code: version 1 → 2 (code); rolling update: replaces 2 instance(s), 1 at a time" in plan.stdout
    assert "    M app.py" in plan.stdout and "    A extra.py" in plan.stdout
    assert "nothing was sent" in plan.stdout
    assert json.loads(shipyard("ps", "code", "--json", cwd=proj, env=env).stdout)["allocations"][0]["version"] == 1

    rolled = shipyard("deploy", ".", "--timeout", "60", cwd=proj, env=env)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "code: version 1 → 2 (code)" in rolled.stdout and "M app.py" in rolled.stdout
    port = instance_port(quiet_server.addr, "code", proj)
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "second"
    assert shipyard("stop", "code", cwd=proj, env=env).returncode == 0


# ---- 3 and 6: a crash loop says why at once and fails fast; ps fits 100 columns ----------------------------------


@pytest.mark.timeout(300)
def test_crash_loop_is_shown_live_and_fails_fast(quiet_server: ServerProcess, tmp_path: Path) -> None:
    proj = project(tmp_path / "crash", name="crashy", instances=2, app=CRASH)
    # Rendered as on a terminal (every frame of the progress display), then read without the escape codes.
    terminal = cli_env(quiet_server.addr, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    done = shipyard("deploy", ".", "--timeout", "600", cwd=proj, env=terminal)
    out, err = (re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text) for text in (done.stdout + done.stderr, done.stderr))
    assert done.returncode == 1, out
    assert "0/2 healthy" in out and "0/None" not in out
    assert "exit code 3" in out and "KeyError: 'DATABASE_URL'" in out and "restarts: 1" in out
    assert re.search(r"error: crashy\.\d crash-looped \(3 restarts\) before it was ever healthy: exit code 3: "
                     r"KeyError: 'DATABASE_URL'", err), err
    assert "not healthy after" not in out  # it did not wait for the timeout

    ps = shipyard("ps", cwd=proj, env=cli_env(quiet_server.addr))
    assert ps.returncode == 0, ps.stderr
    lines = ps.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), ps.stdout
    rows = [line for line in lines if re.match(r"crashy\.\d ", line)]
    assert len(rows) == 2 and all("crash-loop" in row and "exit code 3" in row for row in rows), ps.stdout
    assert ps.stdout.index("crashy.1 ") < ps.stdout.index("KeyError: 'DATABASE_URL'")  # notes below the table
    assert sum("limits:" in line for line in lines) <= 1

    one = shipyard("ps", "crashy", cwd=proj, env=cli_env(quiet_server.addr))
    assert "crash loop" in one.stdout and "KeyError" in one.stdout
    wide = shipyard("ps", "-o", "wide", cwd=proj, env=cli_env(quiet_server.addr))
    assert "ALLOC" in wide.stdout and "crashy.0." in wide.stdout
    allocs = json.loads(shipyard("ps", "crashy", "--json", cwd=proj, env=cli_env(quiet_server.addr)).stdout)
    assert {a["status"]["last_exit"]["exit_code"] for a in allocs["allocations"]} == {3}
    missing = shipyard("ps", "nope", cwd=proj, env=cli_env(quiet_server.addr))
    assert missing.returncode == 1 and missing.stderr.startswith("error: no service 'nope'")
    assert shipyard("stop", "crashy", cwd=proj, env=cli_env(quiet_server.addr)).returncode == 0


@pytest.mark.timeout(300)
def test_a_lost_working_directory_is_said_plainly(quiet_server: ServerProcess, tmp_path: Path) -> None:
    proj = project(tmp_path / "lost", name="lost")
    env = cli_env(quiet_server.addr)
    assert shipyard("deploy", str(proj), "--timeout", "60", cwd=tmp_path, env=env).returncode == 0
    shutil.rmtree(proj)
    done = shipyard("restart", "lost", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert f"cannot start: its working directory {proj} is gone" in done.stderr, done.stdout + done.stderr
    assert shipyard("stop", "lost", cwd=tmp_path, env=env).returncode == 0


# ---- 7: logs interleave both streams by time ---------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[str], needle: str, limit: float = 60) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + limit
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            seen += proc.stdout.readline()
    return seen


@pytest.mark.timeout(300)
def test_logs_interleave_stdout_and_stderr(quiet_server: ServerProcess, tmp_path: Path) -> None:
    proj = project(tmp_path / "talk", name="talk")
    env = cli_env(quiet_server.addr)
    assert shipyard("deploy", ".", "--timeout", "60", cwd=proj, env=env).returncode == 0
    both = shipyard("logs", "talk", cwd=proj, env=env)
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == ["out 1", "err 2", "out 3", "err 4"]
    assert shipyard("logs", "talk", "--stdout", cwd=proj, env=env).stdout.splitlines() == ["out 1", "out 3"]
    assert shipyard("logs", "talk", "--stderr", cwd=proj, env=env).stdout.splitlines() == ["err 2", "err 4"]
    assert shipyard("logs", "talk", "--tail", "2", cwd=proj, env=env).stdout.splitlines() == ["out 3", "err 4"]

    # Ctrl-C as at a terminal: a run started in the background of a non-interactive shell (as CI may be) has
    # SIGINT ignored, which children inherit, and Python then installs no KeyboardInterrupt for it.
    follow = subprocess.Popen([sys.executable, "-m", "shipyard.cli.main", "logs", "talk", "-f", "--tail", "0"],
                              cwd=proj, env=env, stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        port = instance_port(quiet_server.addr, "talk", proj)
        deadline = time.monotonic() + 60
        seen = ""
        while "request /ping" not in seen and time.monotonic() < deadline:  # until the follow stream is open
            requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)
            seen += _read_until(follow, "request /ping", 1)
        assert "request /ping" in seen
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(30)
    assert shipyard("stop", "talk", cwd=proj, env=env).returncode == 0


# ---- 9 (restart and scale): they follow the rollout until done ------------------------------------------------


@pytest.mark.timeout(300)
def test_restart_and_scale_wait_until_done(quiet_server: ServerProcess, tmp_path: Path) -> None:
    proj = project(tmp_path / "turn", name="turn")
    env = cli_env(quiet_server.addr)
    assert shipyard("deploy", ".", "--timeout", "60", cwd=proj, env=env).returncode == 0
    before = json.loads(shipyard("ps", "turn", "--json", cwd=proj, env=env).stdout)["allocations"][0]["id"]

    restarted = shipyard("restart", "turn", cwd=proj, env=env)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "turn: restart done" in restarted.stdout and "1/1 healthy" in restarted.stdout
    after = json.loads(shipyard("ps", "turn", "--json", cwd=proj, env=env).stdout)["allocations"]
    assert [a["id"] for a in after] != [before] and all(a["status"]["client"] == "healthy" for a in after)

    scaled = shipyard("scale", "turn", "3", cwd=proj, env=env)
    assert scaled.returncode == 0, scaled.stdout + scaled.stderr
    assert "3/3 healthy" in scaled.stdout and "turn: scale to 3 done" in scaled.stdout
    states = [a["status"]["client"] for a in json.loads(shipyard("ps", "turn", "--json", cwd=proj, env=env).stdout)[
        "allocations"]]
    assert states == ["healthy"] * 3

    detached = shipyard("scale", "turn", "1", "--detach", cwd=proj, env=env)
    assert detached.returncode == 0 and "turn: scale to 1 requested" in detached.stdout
    assert shipyard("stop", "turn", cwd=proj, env=env).returncode == 0


# ---- 5 and 10: down waits for everything; Ctrl-C of a server says what keeps running ---------------------------


@pytest.mark.timeout(300)
def test_down_returns_once_all_is_gone_so_up_works_at_once(tmp_path: Path) -> None:
    proj = project(tmp_path / "again", name="again", instances=2)
    addr = f"127.0.0.1:{free_port()}"
    env = cli_env(addr)
    try:
        assert shipyard("up", "--timeout", "60", cwd=proj, env=env).returncode == 0
        data_dir = proj / ".shipyard" / "data"
        assert len(live_shims(data_dir)) == 2
        down = shipyard("down", cwd=proj, env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped 1 service(s)" in down.stdout and "stopped the shipyard server" in down.stdout
        assert not answering(addr) and not live_shims(data_dir)
        again = shipyard("up", "--timeout", "60", cwd=proj, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        down_quietly(addr, proj)


@pytest.mark.timeout(300)
def test_ctrl_c_of_a_server_says_what_keeps_running_and_down_stops_it(tmp_path: Path) -> None:
    project(tmp_path / "left", name="left", instances=2)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--http-port", str(port), "--dns-port", "0",
           "--no-gateway", "--data-dir", "data"]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not answering(addr):
            assert server.poll() is None
            time.sleep(0.1)
        assert shipyard("deploy", "left", "--timeout", "60", cwd=tmp_path, env=cli_env(addr)).returncode == 0
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
        assert (f"2 instances keep running and will be adopted by the next server started with --data-dir "
                f"{data_dir}; `shipyard down --data-dir {data_dir}` stops them") in err
        assert len(live_shims(data_dir)) == 2
        down = shipyard("down", "--data-dir", "data", cwd=tmp_path, env=cli_env(addr))
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped 1 service(s)" in down.stdout and "stopped the shipyard server" in down.stdout
        assert not live_shims(data_dir) and not answering(addr)
    finally:
        if server.poll() is None:
            server.kill()
        for pid in live_shims(data_dir):
            os.kill(pid, signal.SIGTERM)


# ---- the README's "Your first service", step by step -----------------------------------------------------------


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your first service\n")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_first_service_files_are_the_example() -> None:
    blocks = re.findall(r"```\w+ (\S+)\n(.*?)```", _readme_section(), re.S)
    assert [name for name, _ in blocks] == ["shipyard.yaml", "names/app.py", "greet/app.py"]
    for name, body in blocks:
        assert body == (ROOT / "examples" / "first-service" / name).read_text(), name


def _expectations(command: str) -> list[str]:
    """What each README step must print (beyond exit code 0)."""
    table = {
        "shipyard up": ["all services healthy"],
        "shipyard deploy --dry-run": ["names: unchanged", "greet: version 1 → 2 (code); rolling update", "M app.py",
                                      "nothing was sent"],
        "shipyard deploy": ["greet: version 1 → 2 (code)", "2/2 healthy", "all services healthy"],
        "shipyard logs greet": ["[greet."],
        "shipyard ps": ["greet.0", "greet.1", "names.0", "names.1", "healthy"],
        "shipyard down": ["stopped 2 service(s)", "stopped the shipyard server"],
    }
    return next((want for prefix, want in table.items() if command.startswith(prefix)), [])


@pytest.mark.timeout(400)
def test_readme_first_service_steps(tmp_path: Path) -> None:
    steps = re.search(r"```sh\n(.*?)```", _readme_section(), re.S)
    assert steps is not None
    commands = [line.split("  #")[0].strip() for line in steps.group(1).splitlines() if line.strip()]
    addr, gateway = f"127.0.0.1:{free_port()}", free_port()
    env = cli_env(addr, SHIPYARD_GATEWAY_PORT=str(gateway))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    cwd = tmp_path
    greetings = iter(["Hello, ", "Howdy, "])
    try:
        for command in commands:
            if command.startswith("cd "):
                cwd = cwd / command[3:]
                continue
            command = command.replace("localhost:8080", f"localhost:{gateway}")
            done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=150)
            if command.startswith("curl"):
                want = next(greetings)
                deadline = time.monotonic() + 30  # the gateway follows the catalog by watch: a moment behind
                while want not in done.stdout and time.monotonic() < deadline:
                    time.sleep(0.2)
                    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                                          text=True, timeout=30)
                assert want in done.stdout, (command, done.stdout, done.stderr)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            for want in _expectations(command):
                assert want in done.stdout, (command, want, done.stdout)
        assert not answering(addr)
        assert not live_shims(tmp_path / "my-first-service" / ".shipyard" / "data")
    finally:
        down_quietly(addr, tmp_path / "my-first-service")
