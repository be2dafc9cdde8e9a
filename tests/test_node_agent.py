"""The node agent inside a real `shipyard server`: jobs deployed through /api/v1/jobs, instances as real processes.

Checks what the issue asks of the agent: env and process groups, catalog registration with health, restarts with
backoff, deregistration before SIGTERM, memory limits, adoption after kill -9 of the server, and the logs API.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent_support import alive, processes_with_env
from shipyard.agent.state import proc_stat
from support import ServerProcess

PYTHON = sys.executable

SERVICE = textwrap.dedent('''
    import json, os, signal, sys, time, urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    EVENTS = os.environ.get("EVENTS_FILE")
    FAIL_FLAG = os.environ.get("FAIL_HEALTH_FILE")

    def note(**event):
        if EVENTS:
            with open(EVENTS, "a") as fh:
                fh.write(json.dumps({**event, "pid": os.getpid(), "alloc": os.environ["SHIPYARD_ALLOC_ID"],
                                     "at": time.time()}) + "\\n")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status = 500 if self.path == "/health" and FAIL_FLAG and os.path.exists(FAIL_FLAG) else 200
            body = json.dumps(dict(os.environ)).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if self.path != "/health":
                print("request", self.path, flush=True)

        def log_message(self, *args):
            pass

    def on_term(signum, frame):
        # Is this instance still in the registry at the moment it is told to stop?
        url = os.environ["CONTROL_URL"] + "/v1/health/service/" + os.environ["SHIPYARD_SERVICE"]
        with urllib.request.urlopen(url, timeout=5) as response:
            ids = [entry["Service"]["ID"] for entry in json.load(response)]
        note(event="sigterm", registered=os.environ["SHIPYARD_ALLOC_ID"] in ids)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    for n in range(int(os.environ.get("BANNER_LINES", "0"))):
        print("banner", n, flush=True)
    print("listening on", os.environ["PORT"], flush=True)
    print("started", file=sys.stderr, flush=True)
    note(event="start")
    server.serve_forever()
''')


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until truthy; the timeout is a generous bound, not a measurement."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Platform:
    """Talks to the server as a client would: the jobs API, the Consul API, the logs API."""

    def __init__(self, server: ServerProcess, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.script = tmp / "service.py"
        self.script.write_text(SERVICE)

    def deploy(self, name: str, **fields: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": name, "args": [PYTHON, str(self.script)], "ports": {"http": {}},
                                "health": {"http": "/health", "interval": "1s", "timeout": "1s", "grace": "1s",
                                           "failures": 2}}
        spec.update(fields)
        env = {"CONTROL_URL": self.server.url, "EVENTS_FILE": str(self.events_file(name))}
        spec["env"] = {**env, **spec.get("env", {})}
        r = requests.post(self.server.url + "/api/v1/jobs", json=spec, timeout=10)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def events_file(self, name: str) -> Path:
        return self.tmp / f"{name}.events"

    def events(self, name: str) -> list[dict[str, Any]]:
        path = self.events_file(name)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def allocs(self, job: str) -> list[dict[str, Any]]:
        r = requests.get(self.server.url + "/api/v1/allocs", params={"job": job}, timeout=10)
        assert r.status_code == 200, r.text
        return [a for a in r.json()["allocations"] if a["desired"] == "run"]

    def statuses(self, job: str) -> list[dict[str, Any]]:
        return [a["status"] for a in self.allocs(job) if a["status"] is not None]

    def healthy(self, job: str, count: int) -> list[dict[str, Any]] | None:
        allocs = self.allocs(job)
        ok = [a for a in allocs if a["status"] and a["status"]["client"] == "healthy"]
        return allocs if len(allocs) == count and len(ok) == count else None

    def wait_healthy(self, job: str, count: int) -> list[dict[str, Any]]:
        return wait_for(lambda: self.healthy(job, count), what=f"{count} healthy instances of {job}")

    def passing(self, job: str) -> list[dict[str, Any]]:
        r = requests.get(self.server.url + f"/v1/health/service/{job}", params={"passing": "1"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def registered(self, job: str) -> list[dict[str, Any]]:
        r = requests.get(self.server.url + f"/v1/health/service/{job}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, job: str) -> None:
        r = requests.post(self.server.url + f"/api/v1/jobs/{job}/stop", timeout=10)
        assert r.status_code == 200, r.text

    def delete(self, job: str) -> None:
        requests.delete(self.server.url + f"/api/v1/jobs/{job}", timeout=10)

    def logs(self, alloc: str, **params: Any) -> requests.Response:
        return requests.get(self.server.url + f"/api/v1/allocs/{alloc}/logs", params=params, timeout=10)


def instance_processes(job: str) -> list[int]:
    return processes_with_env("SHIPYARD_SERVICE", job)


def parent_is_shim(pid: int) -> bool:
    stat = proc_stat(pid)
    if stat is None:
        return False
    cmdline = Path(f"/proc/{stat[1]}/cmdline").read_bytes().split(b"\0")
    return b"shipyard.agent.shim" in cmdline


def wait_gone(job: str) -> None:
    wait_for(lambda: not instance_processes(job), what=f"every process of {job} to exit")


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("agent-server") / "data"
    # --enable-script-checks: test_tcp_and_command_health_checks runs a command check.
    proc = ServerProcess(data_dir, "--drain-delay", "1", "--enable-script-checks").start()
    yield proc
    proc.stop()


@pytest.fixture
def platform(agent_server: ServerProcess, tmp_path: Path) -> Iterator[Platform]:
    p = Platform(agent_server, tmp_path)
    yield p
    for job in requests.get(agent_server.url + "/api/v1/jobs", timeout=10).json()["jobs"]:
        p.delete(job["id"])


def test_instance_runs_with_its_env_in_its_own_group_and_is_registered_passing(platform: Platform) -> None:
    platform.deploy("envsvc", instances=2, env={"GREETING": "hello"}, tags=["v1", "web"], meta={"team": "core"})
    allocs = platform.wait_healthy("envsvc", 2)
    passing = wait_for(lambda: len(platform.passing("envsvc")) == 2 and platform.passing("envsvc"),
                       what="both instances passing in the catalog")
    by_id = {e["Service"]["ID"]: e for e in passing}
    assert set(by_id) == {a["id"] for a in allocs}
    server_pgid = os.getpgid(platform.server.proc.pid)  # type: ignore[union-attr]
    for alloc in allocs:
        status = alloc["status"]
        port = status["ports"]["http"]
        entry = by_id[alloc["id"]]["Service"]
        assert (entry["Service"], entry["Address"], entry["Port"]) == ("envsvc", "127.0.0.1", port)
        assert entry["Tags"] == ["v1", "web"]
        assert entry["Meta"]["team"] == "core" and entry["Meta"]["version"] == str(alloc["version"])
        checks = by_id[alloc["id"]]["Checks"]
        check = next(c for c in checks if c["CheckID"] == f"service:{alloc['id']}")
        assert check["Status"] == "passing" and check["Type"] == "http"
        assert 20000 <= port <= 32000
        env = requests.get(f"http://127.0.0.1:{port}/", timeout=5).json()
        assert env["PORT"] == env["PORT0"] == env["PORT_HTTP"] == str(port)
        assert env["HOST"] == "127.0.0.1"
        assert env["SHIPYARD_SERVICE"] == "envsvc"
        assert env["SHIPYARD_ALLOC_ID"] == alloc["id"]
        assert env["SHIPYARD_INSTANCE"] == str(alloc["index"])
        assert env["GREETING"] == "hello"
        pid = status["pid"]
        assert os.getpgid(pid) == pid != server_pgid  # a process group of its own
        assert parent_is_shim(pid)
        assert "memory: RSS polling" in status["limits"] or "memory: cgroup v2" in status["limits"]
    assert len({a["status"]["ports"]["http"] for a in allocs}) == 2


def test_kill9_of_an_instance_is_healthy_again_quickly(platform: Platform) -> None:
    platform.deploy("phoenix")
    (alloc,) = platform.wait_healthy("phoenix", 1)
    old_pid = alloc["status"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def back() -> dict[str, Any] | None:
        statuses = platform.statuses("phoenix")
        s = statuses[0] if statuses else None
        return s if s and s["client"] == "healthy" and s["pid"] not in (None, old_pid) else None

    status = wait_for(back, timeout=20, what="a new healthy instance")
    # The first restart has no backoff; the bound is generous (the issue asks ~2 s on an idle machine).
    assert time.monotonic() - killed_at < 10
    assert status["restarts"] == 1
    assert status["last_exit"]["signal"] == signal.SIGKILL
    assert status["ports"] == alloc["status"]["ports"]  # same port after a restart
    assert not alive(old_pid)
    assert [e["Service"]["ID"] for e in platform.passing("phoenix")] == [alloc["id"]]


def test_crash_loop_backs_off_and_shows_last_exit_and_stderr(platform: Platform) -> None:
    platform.deploy(
        "crashy",
        args=[PYTHON, "-c", "import sys; print('about to fail', file=sys.stderr); sys.exit(3)"],
        ports={}, health=None, restart={"initial": "500ms", "factor": 2, "max": "10s"},
    )  # fmt: skip

    def looping() -> dict[str, Any] | None:
        statuses = platform.statuses("crashy")
        s = statuses[0] if statuses else None
        return s if s and s["crash_looping"] and s["restarts"] >= 3 and s["next_restart_at"] else None

    status = wait_for(looping, what="a crash loop in backoff")
    assert status["client"] == "unhealthy"
    assert status["pid"] is None
    last = status["last_exit"]
    assert last["exit_code"] == 3 and last["signal"] is None
    assert "about to fail" in last["stderr_tail"]
    assert "crash loop" in status["message"] and "exit code 3" in status["message"]
    # Exponential: the n-th consecutive restart waits initial * factor ** (n - 2) (the first is immediate).
    expected = min(10.0, 0.5 * 2 ** (status["restarts"] - 2))
    assert status["next_restart_at"] - last["finished_at"] == pytest.approx(expected, abs=0.5)
    later = wait_for(lambda: (s := platform.statuses("crashy")) and s[0]["restarts"] >= status["restarts"] + 1
                     and s[0]["next_restart_at"] and s[0], what="the next restart")
    later_delay = later["next_restart_at"] - later["last_exit"]["finished_at"]
    assert later_delay > status["next_restart_at"] - last["finished_at"]
    assert platform.registered("crashy") == []  # no health check: registered only while running


def test_failing_health_check_restarts_the_instance(platform: Platform, tmp_path: Path) -> None:
    flag = tmp_path / "fail-health"
    platform.deploy("sickly", env={"FAIL_HEALTH_FILE": str(flag)})
    (alloc,) = platform.wait_healthy("sickly", 1)
    old_pid = alloc["status"]["pid"]
    flag.touch()

    def restarted() -> dict[str, Any] | None:
        statuses = platform.statuses("sickly")
        s = statuses[0] if statuses else None
        return s if s and s["restarts"] >= 1 and s["last_exit"] else None

    status = wait_for(restarted, what="a restart for failing health")
    assert "health check failed 2 times" in status["last_exit"]["reason"]
    flag.unlink()
    status = wait_for(lambda: (s := platform.statuses("sickly")) and s[0]["client"] == "healthy" and s[0],
                      what="healthy again")
    assert status["pid"] != old_pid
    assert not alive(old_pid)


def test_desired_stop_deregisters_before_sigterm_then_drains(platform: Platform) -> None:
    platform.deploy("graceful", instances=2)
    allocs = platform.wait_healthy("graceful", 2)
    wait_for(lambda: len(platform.passing("graceful")) == 2, what="both passing")
    stopped_at = time.time()
    platform.stop("graceful")
    events = wait_for(lambda: len(e := [x for x in platform.events("graceful") if x["event"] == "sigterm"]) == 2
                      and e, what="both instances to get SIGTERM")
    for event in events:
        assert event["registered"] is False  # the registry no longer listed it when it was told to stop
        assert event["at"] - stopped_at >= 0.9  # the drain delay (1 s) passed first
    wait_gone("graceful")
    assert platform.registered("graceful") == []
    wait_for(lambda: not platform.allocs("graceful"), what="allocations to go")
    for alloc in allocs:
        assert not alive(alloc["status"]["pid"])


def test_memory_limit_kills_an_instance_over_it(platform: Platform) -> None:
    hog = "import time; data = bytearray(200 * 1024 * 1024); data[::4096] = b'x' * len(data[::4096]); time.sleep(60)"
    platform.deploy("hog", args=[PYTHON, "-c", hog], ports={}, health=None, resources={"memory": 50},
                    restart={"initial": "5s"})
    status = wait_for(lambda: (s := platform.statuses("hog")) and s[0]["last_exit"] and s[0], what="an exit")
    assert "memory" in status["last_exit"]["reason"]
    assert "memory" in status["limits"]


def test_logs_tail_and_follow(platform: Platform) -> None:
    platform.deploy("chatty", env={"BANNER_LINES": "5"})
    (alloc,) = platform.wait_healthy("chatty", 1)
    port = alloc["status"]["ports"]["http"]
    r = platform.logs(alloc["id"], tail=2)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert r.text.splitlines() == ["banner 4", f"listening on {port}"]
    assert "started" in platform.logs(alloc["id"], stream="stderr").text.splitlines()
    assert len(platform.logs(alloc["id"]).text.splitlines()) == 6

    url = platform.server.url + f"/api/v1/allocs/{alloc['id']}/logs"
    with requests.get(url, params={"follow": "1", "tail": "1"}, stream=True, timeout=30) as follow:
        lines = follow.iter_lines(decode_unicode=True)
        assert next(lines) == f"listening on {port}"
        requests.get(f"http://127.0.0.1:{port}/hello-follow", timeout=5)
        assert next(lines) == "request /hello-follow"
        platform.stop("chatty")
        rest = list(lines)  # the stream ends once the instance is stopped for good
    assert all("hello-follow" not in line for line in rest)
    assert platform.logs(alloc["id"], tail=1).text.strip() == "request /hello-follow"  # logs outlive it

    assert platform.logs("no-such-alloc").status_code == 404
    assert platform.logs(alloc["id"], stream="stdin").status_code == 400
    assert platform.logs(alloc["id"], tail="many").status_code == 400


def test_server_kill9_then_restart_adopts_instances_and_restarts_missing_ones(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--drain-delay", "0").start()
    try:
        platform = Platform(server, tmp_path)
        platform.deploy("durable", instances=2)
        allocs = platform.wait_healthy("durable", 2)
        pids = {a["id"]: a["status"]["pid"] for a in allocs}
        assert sorted(instance_processes("durable")) == sorted(pids.values())

        server.kill9()  # the server's whole process group; instances live in their own sessions under shims
        assert all(alive(pid) for pid in pids.values())
        assert all(parent_is_shim(pid) for pid in pids.values())
        # While no server runs, one instance dies: the next server must start it again, and adopt the other.
        survivor, victim = sorted(pids)
        os.kill(pids[victim], signal.SIGKILL)
        wait_for(lambda: not alive(pids[victim]), what="the victim to die")

        server.start()
        after = wait_for(lambda: (a := platform.healthy("durable", 2)) and pids[victim] not in
                         [x["status"]["pid"] for x in a] and a, what="both healthy, the victim restarted")
        new_pids = {a["id"]: a["status"]["pid"] for a in after}
        assert set(new_pids) == set(pids)  # same allocations, none added
        assert new_pids[survivor] == pids[survivor]  # adopted, not restarted
        assert {a["id"]: a["status"]["restarts"] for a in after} == {survivor: 0, victim: 1}
        # No duplicates and no orphans: exactly one process per instance, each leading its own group under a shim.
        running = sorted(instance_processes("durable"))
        assert running == sorted(new_pids.values())
        for pid in running:
            assert os.getpgid(pid) == pid and parent_is_shim(pid)
        wait_for(lambda: len(platform.passing("durable")) == 2, what="both passing after the restart")
        assert sorted(e["Service"]["ID"] for e in platform.registered("durable")) == sorted(pids)

        platform.stop("durable")
        wait_gone("durable")
        assert platform.registered("durable") == []
    finally:
        server.stop()


def node_agent_of(server: ServerProcess) -> int | None:
    """The pid of the `shipyard agent` this server started for its node (its --server-pid names the server)."""
    assert server.proc is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in args and b"--server-pid" in args and args[args.index(b"--server-pid") + 1] == str(
                server.proc.pid).encode():
            return int(entry.name)
    return None


def test_the_servers_node_agent_is_a_process_that_is_restarted_and_adopts(tmp_path: Path) -> None:
    """A server runs its node's instances through `shipyard agent`, the same process as on a machine without a
    server: one member for the machine; killed, the agent is started again and adopts the running instances."""
    server = ServerProcess(tmp_path / "data", "--drain-delay", "0").start()
    try:
        agent = node_agent_of(server)
        assert agent is not None, "no shipyard agent started by the server"
        members = requests.get(server.url + "/v1/agent/members", timeout=10).json()
        assert len(members) == 1 and members[0]["Tags"]["role"] == "consul", members  # the machine once
        platform = Platform(server, tmp_path)
        platform.deploy("kept", instances=2)
        pids = {a["id"]: a["status"]["pid"] for a in platform.wait_healthy("kept", 2)}

        os.kill(agent, signal.SIGKILL)
        again = wait_for(lambda: (pid := node_agent_of(server)) not in (None, agent) and pid, what="a new agent")
        assert all(alive(pid) for pid in pids.values())  # instances live on under their shims
        wait_for(lambda: len(platform.passing("kept")) == 2, what="both passing under the new agent")
        after = {a["id"]: a["status"]["pid"] for a in platform.wait_healthy("kept", 2)}
        assert after == pids  # adopted, not restarted
        assert "this node's agent" in server.log_tail(20000) and again != agent
        platform.stop("kept")
        wait_gone("kept")
    finally:
        server.stop()


def test_tcp_and_command_health_checks(platform: Platform, tmp_path: Path) -> None:
    flag = tmp_path / "command-fails"
    platform.deploy("tcpsvc", health={"tcp": "http", "interval": "1s", "timeout": "1s"})
    # The command runs with the instance's environment (PORT), which a script check of the registry would not have.
    platform.deploy("cmdsvc", env={"FLAG": str(flag)}, health={
        "command": 'test ! -e "$FLAG" && python3 -c "import socket; socket.create_connection((\'127.0.0.1\', $PORT))"',
        "interval": "1s", "timeout": "2s", "grace": "1s", "failures": 2,
    })  # fmt: skip
    platform.wait_healthy("tcpsvc", 1)
    (alloc,) = platform.wait_healthy("cmdsvc", 1)
    (tcp_entry,) = wait_for(lambda: platform.passing("tcpsvc"), what="tcp check passing")
    assert [c["Type"] for c in tcp_entry["Checks"] if c["ServiceID"]] == ["tcp"]
    (cmd_entry,) = wait_for(lambda: platform.passing("cmdsvc"), what="command check passing")
    assert [c["Type"] for c in cmd_entry["Checks"] if c["ServiceID"]] == ["ttl"]
    flag.touch()
    status = wait_for(lambda: (s := platform.statuses("cmdsvc")) and s[0]["restarts"] >= 1 and s[0],
                      what="a restart for a failing command check")
    assert "health check failed" in status["last_exit"]["reason"]
    assert status["pid"] != alloc["status"]["pid"]


def test_dev_server_stops_its_instances_when_it_stops(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", dev=True).start()
    try:
        platform = Platform(server, tmp_path)
        platform.deploy("ephemeral", instances=2)
        allocs = platform.wait_healthy("ephemeral", 2)
    finally:
        server.stop(keep_instances=True)
    # Nothing could adopt them (no data dir), so the server took them down on its way out (their shims may still
    # be reaping them when it has exited).
    wait_gone("ephemeral")
    assert not any(alive(a["status"]["pid"]) for a in allocs)


def test_scale_down_keeps_the_remaining_instance_and_updates_its_registration(platform: Platform) -> None:
    platform.deploy("scaled", instances=2, update={"min_healthy_time": "500ms"})
    allocs = platform.wait_healthy("scaled", 2)
    url = platform.server.url + "/api/v1/jobs/scaled/scale"
    r = requests.post(url, json={"instances": 1, "force": True}, timeout=10)
    assert r.status_code == 200, r.text
    version = r.json()["job"]["version"]
    (kept,) = wait_for(lambda: (a := platform.healthy("scaled", 1)) and a[0]["version"] == version and a,
                       what="one instance at the new version")
    assert kept["status"]["pid"] in {a["status"]["pid"] for a in allocs}  # the same process, not a new one
    (entry,) = wait_for(lambda: (e := platform.passing("scaled")) and len(e) == 1
                        and e[0]["Service"]["Meta"]["version"] == str(version) and e, what="registration updated")
    assert entry["Service"]["ID"] == kept["id"]
