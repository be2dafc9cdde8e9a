"""The gateway as an attacker meets it (issue 11): encoded paths against route-scoped auth, catalog entries aimed at
the server's own ports, chunked trailers, and regex routes that would backtrack. A real server, real upstreams, raw
sockets for what clients would never send."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import consul
import orjson
import pytest
import requests

from shipyard.gateway.own_listeners import OwnListeners
from shipyard.gateway.table import build_route_table
from support import ServerProcess, free_port
from test_gateway_proxy import Upstream, _get, raw_exchange, status_of, wait_until


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = Upstream("hard", tmp_path_factory.mktemp("hardening"))
    yield up
    up.stop()


def _admin(server: ServerProcess, method: str, path: str, body: object = None) -> requests.Response:
    r = requests.request(method, server.url + "/api/gateway" + path, json=body, timeout=10)
    assert r.status_code < 300, (path, r.status_code, r.text)
    return r


def get_raw(server: ServerProcess, target: bytes, headers: bytes = b"") -> tuple[int, dict[str, object]]:
    """GET with the request target sent byte for byte (no client library normalises it): (status, JSON body)."""
    data, _ = raw_exchange(server.gateway_port, b"GET " + target + b" HTTP/1.1\r\nHost: gw.test\r\n" + headers +
                           b"Connection: close\r\n\r\n")
    body = data.partition(b"\r\n\r\n")[2]
    if b"Transfer-Encoding: chunked" in data.partition(b"\r\n\r\n")[0]:
        body = _dechunk(body)
    return status_of(data), (json.loads(body) if body.startswith(b"{") else {})


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


# ---- item 2: route matching on the canonical path ------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(server: ServerProcess, upstream: Upstream) -> ServerProcess:
    """/svc open, /svc/admin behind key-auth, both to the same upstream with the path unchanged."""
    _admin(server, "PUT", "/services/hard", {"url": f"http://127.0.0.1:{upstream.port}"})
    _admin(server, "PUT", "/routes/svc-open", {"service": "hard", "paths": ["/svc"], "strip_path": False})
    _admin(server, "PUT", "/routes/svc-admin", {"service": "hard", "paths": ["/svc/admin"], "strip_path": False})
    _admin(server, "PUT", "/consumers/ops", {"username": "ops"})
    _admin(server, "POST", "/consumers/ops/key-auth", {"key": "ops-secret-key"})
    _admin(server, "POST", "/routes/svc-admin/plugins", {"name": "key-auth"})
    wait_until(lambda: _get(server.gateway_url + "/svc/admin/secret") == 401, "key-auth on /svc/admin")
    assert _get(server.gateway_url + "/svc/public") == 200
    return server


# What the route-scoped plugin must still see: a request for the protected resource, however it is spelled.
PROTECTED_SPELLINGS = [
    b"/svc/%61dmin/secret",  # an encoded unreserved letter
    b"/svc/%61%64%6d%69%6e/secret",  # every letter, lower-case hex
    b"/svc/%61%64%6D%69%6E/secret",  # upper-case hex
    b"/svc/x/%2e%2e/admin/secret",  # encoded dot segment
    b"/svc/x/%2E%2e/admin/secret",
    b"/svc/x/../admin/secret",
    b"/svc/./admin/secret",
    b"//svc//admin///secret",  # empty segments
    b"/svc/admin;jsessionid=1/secret",  # a ;parameter on the guarded segment
    b"/svc/%2e/admin/secret",
]


@pytest.mark.parametrize("target", PROTECTED_SPELLINGS, ids=lambda t: t.decode())
def test_spellings_of_the_guarded_path_need_its_key(guarded: ServerProcess, target: bytes) -> None:
    status, body = get_raw(guarded, target)
    assert status == 401, (status, body)
    status, body = get_raw(guarded, target, b"apikey: ops-secret-key\r\n")
    assert status == 200 and str(body["path"]).startswith("/svc/admin"), body


# Spellings that another server would read as the guarded path (it decodes %2F, or strips ;parameters as Tomcat
# does) while their canonical form names the open route: refused, whatever the key.
AMBIGUOUS_SPELLINGS = [
    b"/svc%2Fadmin/secret",
    b"/svc%2fadmin/secret",
    b"/svc/x%2F..%2Fadmin/secret",
    b"/svc;x/admin/secret",
    b"/svc/x/..;/admin/secret",
]


@pytest.mark.parametrize("target", AMBIGUOUS_SPELLINGS, ids=lambda t: t.decode())
def test_spellings_that_an_upstream_may_read_as_the_guarded_path_are_refused(guarded: ServerProcess,
                                                                              target: bytes) -> None:
    status, body = get_raw(guarded, target)
    assert status == 400, (status, body)


def test_what_the_upstream_is_sent_decodes_to_what_was_matched(guarded: ServerProcess) -> None:
    # Decoded unreserved characters and resolved dot segments are what is forwarded, not the raw spelling.
    status, body = get_raw(guarded, b"/svc/x/%2e%2e/%61dmin/secret", b"apikey: ops-secret-key\r\n")
    assert status == 200 and body["raw_path"] == "/svc/admin/secret", body
    # A reserved escape stays as it came (upper-case hex): an encoded slash inside a segment of the open route.
    status, body = get_raw(guarded, b"/svc/files/a%2fb")
    assert status == 200 and body["raw_path"] == "/svc/files/a%2Fb", body
    # Double encoding is decoded by nobody twice: the upstream reads '%61dmin', a name under the open route.
    status, body = get_raw(guarded, b"/svc/%2561dmin/secret")
    assert status == 200 and body["raw_path"] == "/svc/%2561dmin/secret" and body["path"] == "/svc/%61dmin/secret"
    # Paths are case-sensitive (nginx, Kong): /svc/Admin is another resource of the open route.
    status, body = get_raw(guarded, b"/svc/%41dmin/secret")
    assert status == 200 and body["path"] == "/svc/Admin/secret", body
    # '..' never climbs above the root.
    status, body = get_raw(guarded, b"/svc/%2e%2e/%2e%2e/%2e%2e/svc/public")
    assert status == 200 and body["raw_path"] == "/svc/public", body


@pytest.mark.parametrize("target", [b"/svc/%zzadmin", b"/svc/admin%", b"/svc/%6"], ids=lambda t: t.decode())
def test_bad_percent_encoding_is_400(guarded: ServerProcess, target: bytes) -> None:
    status, _ = get_raw(guarded, target)
    assert status == 400


# ---- item 6: the server's own ports are no catalog target ------------------------------------------------------


def _answered_by(r: requests.Response) -> str:
    """The upstream's name, or what else answered (the control API would send the KV value)."""
    try:
        return str(r.json().get("name"))
    except (ValueError, AttributeError):
        return r.text


def test_catalog_cannot_route_the_gateway_to_the_servers_own_ports(server: ServerProcess, upstream: Upstream) -> None:
    """Instances registered at the control, DNS and gateway ports (any spelling of this host) get no traffic: the
    one honest instance of the service gets it all; the control API's KV is never reachable through the gateway."""
    client = consul.Consul(host="127.0.0.1", port=server.http_port)
    client.kv.put("private/config", "top-secret")
    own = [("127.0.0.1", server.http_port), ("127.0.0.2", server.http_port), ("localhost", server.http_port),
           ("::1", server.http_port), ("127.0.0.1", server.dns_port),
           ("127.0.0.1", server.gateway_port),
           # names the table cannot judge (no look-ups there) that resolve to 127.0.0.1: checked once connected
           ("127.1", server.http_port), ("2130706433", server.http_port)]
    for i, (address, port) in enumerate(own):
        client.agent.service.register("kvgrab", service_id=f"kvgrab-own-{i}", address=address, port=port,
                                      tags=["urlprefix-/v1/kv"])
    client.agent.service.register("kvgrab", service_id="kvgrab-honest", address="127.0.0.1", port=upstream.port,
                                  tags=["urlprefix-/v1/kv"])
    url = server.gateway_url + "/v1/kv/private/config?raw"
    wait_until(lambda: _get(url) == 200, "the urlprefix-/v1/kv route")
    answers = [_answered_by(requests.get(url, timeout=10)) for _ in range(3 * (len(own) + 1))]
    assert answers == ["hard"] * len(answers)
    for i in range(len(own)):
        client.agent.service.deregister(f"kvgrab-own-{i}")
    client.agent.service.deregister("kvgrab-honest")


def test_admin_api_may_name_the_control_port_explicitly(server: ServerProcess) -> None:
    consul.Consul(host="127.0.0.1", port=server.http_port).kv.put("explicit/config", "named-by-the-admin")
    _admin(server, "PUT", "/services/control", {"url": f"http://127.0.0.1:{server.http_port}"})
    _admin(server, "PUT", "/routes/control", {"service": "control", "paths": ["/control"], "strip_path": True})
    url = server.gateway_url + "/control/v1/kv/explicit/config?raw"
    wait_until(lambda: _get(url) == 200, "the admin route to the control API")
    assert requests.get(url, timeout=10).text == "named-by-the-admin"


# ---- item 7: chunked request trailers ----------------------------------------------------------------------------


def test_request_trailers_never_reach_the_upstream_head(server: ServerProcess, tmp_path: Path) -> None:
    """On a new upstream connection the head is written after the body (and its trailer) was read: the upstream
    must still get the head as the client sent it, without the trailer's fields."""
    fresh = Upstream("trailers", tmp_path)
    try:
        _admin(server, "PUT", "/services/trailers", {"url": f"http://127.0.0.1:{fresh.port}"})
        _admin(server, "PUT", "/routes/trailers", {"service": "trailers", "paths": ["/trailers"]})
        # Written after the route above, so once it answers the table has both; it never connects to `fresh`.
        _admin(server, "PUT", "/services/nowhere", {"url": f"http://127.0.0.1:{free_port()}"})
        _admin(server, "PUT", "/routes/nowhere", {"service": "nowhere", "paths": ["/trailers-probe"]})
        wait_until(lambda: _get(server.gateway_url + "/trailers-probe") in (502, 503), "the trailers route")
        request = (b"POST /trailers/echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n"
                   b"Trailer: X-Forwarded-For, X-Injected\r\nX-Forwarded-For: 10.9.8.7\r\nConnection: close\r\n\r\n"
                   b"5\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Injected: yes\r\nApiKey: stolen\r\n\r\n")
        data, _ = raw_exchange(server.gateway_port, request)
        assert status_of(data) == 200, data
        head, _, body = data.partition(b"\r\n\r\n")
        seen = json.loads(_dechunk(body) if b"chunked" in head else body)
        assert seen["size"] == 5 and seen["name"] == "trailers"
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
        assert "x-injected" not in headers and "apikey" not in headers and "trailer" not in headers
    finally:
        fresh.stop()


# ---- item 8: route regexes ---------------------------------------------------------------------------------------


def test_kong_regex_paths_are_accepted_and_routed(server: ServerProcess, upstream: Upstream) -> None:
    _admin(server, "PUT", "/services/rx", {"url": f"http://127.0.0.1:{upstream.port}"})
    accepted = requests.put(server.url + "/api/gateway/routes/r0", json={"service": "rx", "paths": ["~/r0/[0-9]+$"]},
                            timeout=10)
    assert accepted.status_code < 300, accepted.text
    assert accepted.json()["regex_paths"] == [{"pattern": "/r0/[0-9]+$", "priority": 0}]
    refused = requests.put(server.url + "/api/gateway/routes/backref",
                           json={"service": "rx", "paths": ["~/b/(a)\\1"]}, timeout=10)
    assert refused.status_code == 400 and "invalid regex" in refused.text, refused.text
    wait_until(lambda: _get(server.gateway_url + "/r0/123") == 200, "the ~/r0 route")
    assert _get(server.gateway_url + "/r0/12x") == 404


def test_a_backtracking_regex_route_does_not_stall_the_worker(server: ServerProcess, upstream: Upstream) -> None:
    _admin(server, "PUT", "/services/rx2", {"url": f"http://127.0.0.1:{upstream.port}"})
    _admin(server, "PUT", "/routes/evil", {"service": "rx2", "regex_paths": ["/r/(a+)+$"], "strip_path": False})
    _admin(server, "PUT", "/routes/plain", {"service": "rx2", "paths": ["/plain"]})
    wait_until(lambda: _get(server.gateway_url + "/r/aaa") == 200 and _get(server.gateway_url + "/plain") == 200,
               "the routes")
    # 'a' * 40 + '!' takes a backtracking engine about 2^40 steps. Sent first, on its own connection; then a second
    # request must be answered by the (single) worker, and the first one too.
    with socket.create_connection(("127.0.0.1", server.gateway_port), timeout=60) as evil:
        evil.sendall(b"GET /r/" + b"a" * 40 + b"! HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        assert requests.get(server.gateway_url + "/plain", timeout=60).status_code == 200
        assert status_of(evil.recv(65536)) == 404


def test_which_routes_may_reach_the_servers_own_ports() -> None:
    """The table's rule, for every source of a route: catalog instances never; an admin-API service's literal
    address (or an upstream's targets) yes, except for a urlprefix- tag route that shares the service's name."""
    own = OwnListeners(frozenset({8500}), frozenset({"10.1.1.1"}))
    instance = {"ID": "ctl", "Service": "ctl", "Tags": ["urlprefix-/tagged"], "Address": "10.1.1.1", "Port": 8500}
    store = {
        "catalog/services/n1/ctl": orjson.dumps(instance),
        "gateway/services/by-name": orjson.dumps({"name": "by-name", "host": "ctl"}),
        "gateway/routes/by-name": orjson.dumps({"id": "by-name", "service": "by-name", "paths": ["/by-name"]}),
        "gateway/services/literal": orjson.dumps({"name": "literal", "host": "127.0.0.1", "port": 8500}),
        "gateway/routes/literal": orjson.dumps({"id": "literal", "service": "literal", "paths": ["/literal"]}),
        "catalog/services/n1/sneaky": orjson.dumps({"ID": "sneaky", "Service": "literal", "Port": 9999,
                                                    "Address": "127.0.0.1", "Tags": ["urlprefix-/sneaky"]}),
        "jobs/ctl": orjson.dumps({"spec": {"name": "ctl", "routes": [{"paths": ["/job"]}]}}),
    }
    table = build_route_table(store, own=own)

    def targets(path: bytes) -> set[str]:
        m = table.match(b"GET", b"h", path)
        assert m is not None, path
        return {t.address for t in m.backend.spec.targets}

    assert targets(b"/tagged") == set() and targets(b"/by-name") == set() and targets(b"/job") == set()
    assert targets(b"/literal") == {"127.0.0.1:8500"}
    assert targets(b"/sneaky") == set()  # a tag route to the admin's service: not the admin's own route
    assert build_route_table(store).match(b"GET", b"h", b"/tagged") is not None  # no `own`: unchanged
    assert {t.address for t in build_route_table(store).match(  # type: ignore[union-attr]
        b"GET", b"h", b"/tagged").backend.spec.targets} == {"10.1.1.1:8500"}
