"""Consul KV over the real server with the real py-consul client: values, cas, flags, listings, locks, blocking."""

from __future__ import annotations

import threading
import uuid

import consul
import pytest
import requests

from support import ServerProcess


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_put_get_text_binary_and_empty_values(client: consul.Consul) -> None:
    base = unique()
    assert client.kv.put(f"{base}/text", "hello") is True
    blob = bytes(range(256)) * 4
    assert client.kv.put(f"{base}/blob", blob) is True
    assert client.kv.put(f"{base}/empty", b"") is True

    index, item = client.kv.get(f"{base}/text")
    assert item["Value"] == b"hello"
    assert item["Key"] == f"{base}/text"
    assert item["Flags"] == 0 and item["LockIndex"] == 0
    assert item["CreateIndex"] == item["ModifyIndex"] == int(index)  # py-consul hands the index back as text
    assert client.kv.get(f"{base}/blob")[1]["Value"] == blob
    # Consul keeps an empty body as nil: JSON null, which py-consul hands back as None
    empty = client.kv.get(f"{base}/empty")[1]
    assert empty is not None and empty["Value"] is None

    index, missing = client.kv.get(f"{base}/nope")
    assert missing is None


def test_raw_get_returns_the_bytes_as_text_plain(server: ServerProcess, client: consul.Consul) -> None:
    key = unique()
    client.kv.put(key, b"\x00\x01raw\xff")
    r = requests.get(f"{server.url}/v1/kv/{key}?raw")
    assert r.status_code == 200
    assert r.content == b"\x00\x01raw\xff"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    r = requests.get(f"{server.url}/v1/kv/{unique()}")
    assert r.status_code == 404 and r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1


def test_flags_and_cas(client: consul.Consul) -> None:
    key = unique()
    assert client.kv.put(key, "v1", flags=42) is True
    _, item = client.kv.get(key)
    assert item["Flags"] == 42
    # cas=0 means "only if absent"
    assert client.kv.put(key, "v2", cas=0) is False
    assert client.kv.put(unique(), "fresh", cas=0) is True
    # cas=<ModifyIndex> must match the current one
    assert client.kv.put(key, "v2", cas=item["ModifyIndex"] + 1000) is False
    assert client.kv.put(key, "v2", cas=item["ModifyIndex"]) is True
    _, after = client.kv.get(key)
    assert after["Value"] == b"v2"
    assert after["ModifyIndex"] > item["ModifyIndex"]
    assert after["CreateIndex"] == item["CreateIndex"]
    # a plain put without ?flags resets them, as in Consul
    assert after["Flags"] == 0
    assert client.kv.put(key, "v3", cas=item["ModifyIndex"]) is False
    assert client.kv.put(key, "big", flags=2**64 - 1) is True
    assert client.kv.get(key)[1]["Flags"] == 2**64 - 1


def test_recurse_is_sorted_and_keys_with_separator(client: consul.Consul) -> None:
    base = unique()
    for k in ["b", "a/2", "a/1", "c/x/y", "a/1/deep"]:
        client.kv.put(f"{base}/{k}", k)
    _, items = client.kv.get(f"{base}/", recurse=True)
    assert [i["Key"] for i in items] == [f"{base}/{k}" for k in ["a/1", "a/1/deep", "a/2", "b", "c/x/y"]]
    _, keys = client.kv.get(f"{base}/", keys=True)
    assert keys == [f"{base}/{k}" for k in ["a/1", "a/1/deep", "a/2", "b", "c/x/y"]]
    _, keys = client.kv.get(f"{base}/", keys=True, separator="/")
    assert keys == [f"{base}/a/", f"{base}/b", f"{base}/c/"]
    _, keys = client.kv.get(f"{base}/a/", keys=True, separator="/")
    assert keys == [f"{base}/a/1", f"{base}/a/1/", f"{base}/a/2"]
    assert client.kv.get(f"{unique()}/", recurse=True)[1] is None


def test_delete_single_cas_and_recurse(client: consul.Consul) -> None:
    base = unique()
    for k in ["x", "y/1", "y/2", "z"]:
        client.kv.put(f"{base}/{k}", k)
    assert client.kv.delete(f"{base}/x") is True
    assert client.kv.get(f"{base}/x")[1] is None
    _, z = client.kv.get(f"{base}/z")
    assert client.kv.delete(f"{base}/z", cas=z["ModifyIndex"] + 1000) is False
    assert client.kv.get(f"{base}/z")[1] is not None
    assert client.kv.delete(f"{base}/z", cas=z["ModifyIndex"]) is True
    assert client.kv.get(f"{base}/z")[1] is None
    assert client.kv.delete(f"{base}/y", recurse=True) is True
    assert client.kv.get(f"{base}/", recurse=True)[1] is None


def test_acquire_and_release_with_sessions(client: consul.Consul) -> None:
    key = unique("lock")
    s1 = client.session.create(name="one", lock_delay=0)
    s2 = client.session.create(name="two", lock_delay=0)
    assert client.kv.put(key, "leader-1", acquire=s1) is True
    _, item = client.kv.get(key)
    assert item["Session"] == s1 and item["LockIndex"] == 1 and item["Value"] == b"leader-1"
    # re-acquire by the holder does not bump LockIndex; another session is refused
    assert client.kv.put(key, "leader-1b", acquire=s1) is True
    assert client.kv.get(key)[1]["LockIndex"] == 1
    assert client.kv.put(key, "leader-2", acquire=s2) is False
    # a plain put keeps the holder
    assert client.kv.put(key, "plain") is True
    assert client.kv.get(key)[1]["Session"] == s1
    # release only by the holder
    assert client.kv.put(key, "x", release=s2) is False
    assert client.kv.put(key, "released", release=s1) is True
    _, item = client.kv.get(key)
    assert "Session" not in item and item["LockIndex"] == 1 and item["Value"] == b"released"
    assert client.kv.put(key, "leader-2", acquire=s2) is True
    assert client.kv.get(key)[1]["LockIndex"] == 2
    client.session.destroy(s1)
    client.session.destroy(s2)


def test_plain_put_keeps_the_lock_and_an_unchanged_one_writes_nothing(client: consul.Consul) -> None:
    key = unique("plain")
    sid = client.session.create(name="holder", behavior="delete", lock_delay=0)
    assert client.kv.put(key, "v", acquire=sid) is True
    _, held = client.kv.get(key)
    assert client.kv.put(key, "v") is True  # same value and flags: Consul skips the write
    assert client.kv.get(key)[1]["ModifyIndex"] == held["ModifyIndex"]
    assert client.kv.put(key, "w", flags=7) is True
    _, after = client.kv.get(key)
    assert (after["Session"], after["LockIndex"], after["Flags"], after["Value"]) == (sid, held["LockIndex"], 7, b"w")
    assert after["ModifyIndex"] > held["ModifyIndex"]
    client.session.destroy(sid)
    assert client.kv.get(key)[1] is None  # the behaviour recorded at acquire time outlived the plain puts


def test_acquire_with_unknown_session_is_500_invalid_session(server: ServerProcess) -> None:
    r = requests.put(f"{server.url}/v1/kv/{unique()}?acquire=no-such-session", data=b"x")
    assert r.status_code == 500
    assert r.text == 'invalid session "no-such-session"'


def test_concurrent_acquires_have_exactly_one_winner(client: consul.Consul, server: ServerProcess) -> None:
    key = unique("race")
    sessions = [client.session.create(lock_delay=0) for _ in range(8)]
    wins: list[str] = []
    barrier = threading.Barrier(len(sessions))

    def contend(sid: str) -> None:
        c = consul.Consul(host="127.0.0.1", port=server.http_port)
        barrier.wait()
        if c.kv.put(key, sid, acquire=sid):
            wins.append(sid)

    threads = [threading.Thread(target=contend, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert client.kv.get(key)[1]["Session"] == wins[0]
    for s in sessions:
        client.session.destroy(s)


def test_lock_delay_refuses_other_sessions_after_invalidation(client: consul.Consul) -> None:
    key = unique("delay")
    holder = client.session.create(lock_delay=30)
    other = client.session.create(lock_delay=0)
    assert client.kv.put(key, "a", acquire=holder) is True
    client.session.destroy(holder)
    _, item = client.kv.get(key)
    assert "Session" not in item
    # within the lock delay, another session cannot take it
    assert client.kv.put(key, "b", acquire=other) is False
    # a key without lock delay can still be taken at once
    free_key = unique("nodelay")
    short = client.session.create(lock_delay=0)
    assert client.kv.put(free_key, "a", acquire=short) is True
    client.session.destroy(short)
    assert client.kv.put(free_key, "b", acquire=other) is True
    client.session.destroy(other)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # surfaced by the caller's assertions
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_single_key_wait_ignores_other_keys_and_wakes_on_its_own(client: consul.Consul) -> None:
    key, other = unique("watched"), unique("other")
    client.kv.put(key, "v1")
    index, _ = client.kv.get(key)
    t, out = _in_thread(lambda: client.kv.get(key, index=index, wait="3s"))
    client.kv.put(other, "noise")
    client.kv.put(f"{key}/child", "noise")
    t.join(timeout=20)
    assert not t.is_alive()
    new_index, item = out["result"]  # type: ignore[misc]
    # nothing happened to the key: the wait ran out with the same index
    assert int(new_index) == int(index) and item["Value"] == b"v1"

    t, out = _in_thread(lambda: client.kv.get(key, index=index, wait="30s"))
    client.kv.put(key, "v2")
    t.join(timeout=20)
    assert not t.is_alive()
    new_index, item = out["result"]  # type: ignore[misc]
    assert int(new_index) > int(index) and item["Value"] == b"v2"


def test_prefix_wait_wakes_on_deletion(client: consul.Consul) -> None:
    base = unique("tree")
    client.kv.put(f"{base}/a", "1")
    client.kv.put(f"{base}/b", "2")
    index, items = client.kv.get(f"{base}/", recurse=True)
    assert len(items) == 2
    t, out = _in_thread(lambda: client.kv.get(f"{base}/", recurse=True, index=index, wait="30s"))
    client.kv.delete(f"{base}/b")
    t.join(timeout=20)
    assert not t.is_alive()
    new_index, items = out["result"]  # type: ignore[misc]
    assert int(new_index) > int(index)
    assert [i["Key"] for i in items] == [f"{base}/a"]


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("a/../b", '".." path segment'),
        ("a%2F..%2Fb", '".." path segment'),
        ("..", '".." path segment'),
        ("a%00b", "NUL"),
        ("%FF%FE", "not valid UTF-8"),
    ],
)
def test_bad_keys_are_400_with_a_clear_message(server: ServerProcess, path: str, needle: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        req = requests.Request(method, f"{server.url}/v1/kv/{path}", data=b"x" if method == "PUT" else None)
        prepared = req.prepare()
        prepared.url = f"{server.url}/v1/kv/{path}"  # keep ".." as sent, no client-side normalisation
        r = requests.Session().send(prepared)
        assert r.status_code == 400, (method, path, r.text)
        assert needle in r.text
    assert requests.get(f"{server.url}/v1/status/leader").status_code == 200


def test_put_without_key_and_bad_params(server: ServerProcess) -> None:
    r = requests.put(f"{server.url}/v1/kv/", data=b"x")
    assert r.status_code == 400 and r.text == "Missing key name"
    r = requests.get(f"{server.url}/v1/kv/")
    assert r.status_code == 400 and r.text == "Missing key name"
    r = requests.put(f"{server.url}/v1/kv/{unique()}?flags=abc", data=b"x")
    assert r.status_code == 400 and "flags" in r.text
    r = requests.put(f"{server.url}/v1/kv/{unique()}?cas=-1", data=b"x")
    assert r.status_code == 400 and "cas" in r.text
    r = requests.put(f"{server.url}/v1/kv/{unique()}?cas=0&acquire=x", data=b"x")
    assert r.status_code == 400 and "Conflicting flags" in r.text
    r = requests.delete(f"{server.url}/v1/kv/{unique()}?cas=0&recurse")
    assert r.status_code == 400 and "Conflicting flags" in r.text


def test_oversize_value_is_413_and_nothing_is_written(server: ServerProcess, client: consul.Consul) -> None:
    key = unique("big")
    assert client.kv.put(key, b"x" * (512 * 1024)) is True  # exactly the limit is fine
    r = requests.put(f"{server.url}/v1/kv/{key}", data=b"y" * (512 * 1024 + 1))
    assert r.status_code == 413
    assert "max size: 524288 bytes" in r.text
    assert client.kv.get(key)[1]["Value"] == b"x" * (512 * 1024)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(9):
            yield b"z" * 65536

    r = requests.put(f"{server.url}/v1/kv/{key}", data=chunks())
    assert r.status_code == 413
    assert client.kv.get(key)[1]["Value"] == b"x" * (512 * 1024)

    def under_limit():  # a chunked body under the limit arrives whole, not just its first chunk
        for i in range(7):
            yield bytes([i]) * 65536

    r = requests.put(f"{server.url}/v1/kv/{key}", data=under_limit())
    assert r.status_code == 200
    assert client.kv.get(key)[1]["Value"] == b"".join(bytes([i]) * 65536 for i in range(7))


def test_values_survive_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = ServerProcess(tmp_path / "data").start()
    try:
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        c.kv.put("persist/me", b"\x00kept", flags=7)
        _, before = c.kv.get("persist/me")
        proc.restart()
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        _, after = c.kv.get("persist/me")
        assert after == before
    finally:
        proc.stop()


def test_concurrent_cas_increments_lose_no_update(client: consul.Consul, server: ServerProcess) -> None:
    key = unique("counter")
    client.kv.put(key, "0")
    successes: list[int] = []

    def worker() -> None:
        c = consul.Consul(host="127.0.0.1", port=server.http_port)
        done = 0
        while done < 10:
            _, item = c.kv.get(key)
            if c.kv.put(key, str(int(item["Value"]) + 1), cas=item["ModifyIndex"]):
                done += 1
        successes.append(done)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(successes) == 40
    assert client.kv.get(key)[1]["Value"] == b"40"
