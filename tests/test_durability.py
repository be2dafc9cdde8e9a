"""Crash durability of the real server: `kill -9` during a stream of acknowledged KV writes, then restart.

Talks to a real `shipyard server` only through py-consul; never opens the server's data files.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import consul

from support import ServerProcess

WRITERS = 8
KEYS_PER_WRITER = 40  # each writer cycles over its own keys, so later writes overwrite earlier ones
ACKS_BEFORE_KILL = 600
# Upper bound for the writers to reach ACKS_BEFORE_KILL; a guard against hanging, not a performance check.
GUARD_S = 60.0


@dataclass
class Writer:
    """One thread writing its own keys in order; remembers what the server acknowledged."""

    index: int
    port: int
    run_id: str
    acked: dict[str, bytes] = field(default_factory=dict)  # key -> last acknowledged value
    acked_count: int = 0
    in_flight: tuple[str, bytes] | None = None  # the write the server died on, if any
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def key(self, seq: int) -> str:
        return f"durability/w{self.index}/k{seq % KEYS_PER_WRITER:03d}"

    def run(self) -> None:
        client = consul.Consul(host="127.0.0.1", port=self.port)
        seq = 0
        while not self.stop.is_set():
            key = self.key(seq)
            value = f"{self.run_id}/w{self.index}/s{seq}".encode()
            self.in_flight = (key, value)
            try:
                ok = client.kv.put(key, value)
            except Exception as exc:  # the server was killed under this request
                self.error = exc
                return
            if ok is not True:
                self.error = AssertionError(f"put {key} answered {ok!r}")
                return
            self.acked[key] = value
            self.acked_count += 1
            self.in_flight = None
            seq += 1


def start_writers(port: int) -> list[tuple[Writer, threading.Thread]]:
    run_id = uuid.uuid4().hex[:8]
    pairs = []
    for i in range(WRITERS):
        writer = Writer(i, port, run_id)
        thread = threading.Thread(target=writer.run, name=f"kv-writer-{i}", daemon=True)
        thread.start()
        pairs.append((writer, thread))
    return pairs


def wait_for_acks(writers: list[Writer], count: int) -> None:
    deadline = time.monotonic() + GUARD_S
    while sum(w.acked_count for w in writers) < count:
        failed = [w.error for w in writers if w.error is not None]
        assert not failed, f"a writer failed before the kill: {failed[0]!r}"
        assert time.monotonic() < deadline, "writers made no progress"
        time.sleep(0.01)


def stored_entries(client: consul.Consul, prefix: str) -> dict[str, dict]:
    _, entries = client.kv.get(prefix, recurse=True)
    return {e["Key"]: e for e in entries or []}


def kill_during_writes(server: ServerProcess) -> list[Writer]:
    """Starts the writers, kills the server with SIGKILL while they are mid-stream, returns the writers."""
    pairs = start_writers(server.http_port)
    writers = [w for w, _ in pairs]
    wait_for_acks(writers, ACKS_BEFORE_KILL)
    server.kill9()
    for writer, thread in pairs:
        writer.stop.set()
        thread.join(GUARD_S)
        assert not thread.is_alive()
    return writers


def check_acknowledged_writes_survived(client: consul.Consul, writers: list[Writer]) -> int:
    entries = stored_entries(client, "durability/")
    checked = 0
    for writer in writers:
        for key, value in writer.acked.items():
            assert key in entries, f"acknowledged write of {key} was lost"
            stored = entries[key]["Value"]
            # The write the server died on may or may not have been committed; nothing older may show.
            allowed = {value}
            if writer.in_flight is not None and writer.in_flight[0] == key:
                allowed.add(writer.in_flight[1])
            assert stored in allowed, f"{key}: stored {stored!r}, last acknowledged {value!r}"
            checked += 1
    return checked


def test_acknowledged_writes_survive_kill9(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        writers = kill_during_writes(server)
        assert sum(w.acked_count for w in writers) >= ACKS_BEFORE_KILL
        assert any(w.error is not None for w in writers), "the kill must land while writes are in flight"

        server.start()
        client = consul.Consul(host="127.0.0.1", port=server.http_port)
        checked = check_acknowledged_writes_survived(client, writers)
        assert checked == sum(len(w.acked) for w in writers) > 0
        # Each key read alone agrees with the recursive read.
        for writer in writers[:2]:
            for key, value in list(writer.acked.items())[:5]:
                _, entry = client.kv.get(key)
                assert entry is not None
                assert entry["Value"] in {value, writer.in_flight[1] if writer.in_flight else value}
        # The restarted server takes writes again.
        assert client.kv.put("durability/after-restart", b"yes") is True
        assert client.kv.get("durability/after-restart")[1]["Value"] == b"yes"
    finally:
        server.stop()


def test_indexes_keep_increasing_across_kill9_restarts(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        client = consul.Consul(host="127.0.0.1", port=server.http_port)
        highest_seen = 0
        previous: dict[str, dict] = {}
        for cycle in range(2):
            writers = kill_during_writes(server)
            server.start()
            client = consul.Consul(host="127.0.0.1", port=server.http_port)
            check_acknowledged_writes_survived(client, writers)

            index, entries_list = client.kv.get("durability/", recurse=True)
            entries = {e["Key"]: e for e in entries_list}
            modify = [e["ModifyIndex"] for e in entries.values()]
            assert int(index) >= max(modify), "X-Consul-Index covers every entry it returns"
            assert max(modify) > highest_seen, f"cycle {cycle}: indexes went backwards after restart"
            for e in entries.values():
                assert e["CreateIndex"] <= e["ModifyIndex"]
            # Entries nobody wrote since the previous restart keep their indexes exactly.
            for key, before in previous.items():
                after = entries[key]
                assert after["ModifyIndex"] >= before["ModifyIndex"]
                if after["ModifyIndex"] == before["ModifyIndex"]:
                    assert after["Value"] == before["Value"]

            # A new write after the restart gets an index above everything stored before it.
            assert client.kv.put(f"durability/marker-{cycle}", b"m") is True
            marker_index, marker = client.kv.get(f"durability/marker-{cycle}")
            assert marker["ModifyIndex"] > max(modify)
            assert marker["CreateIndex"] == marker["ModifyIndex"]
            assert int(marker_index) >= marker["ModifyIndex"]
            highest_seen = marker["ModifyIndex"]
            previous = stored_entries(client, "durability/")

        # A clean restart (SIGTERM) after the crashes keeps everything and the indexes too.
        server.restart()
        client = consul.Consul(host="127.0.0.1", port=server.http_port)
        after_clean = stored_entries(client, "durability/")
        assert after_clean == previous
        assert client.kv.put("durability/final", b"f") is True
        assert client.kv.get("durability/final")[1]["ModifyIndex"] > highest_seen
    finally:
        server.stop()
