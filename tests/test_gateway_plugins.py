"""Gateway plugins through the plugin contract (RequestContext), scope resolution, and the shared counters
hammered by 4 real processes."""

from __future__ import annotations

import base64
import multiprocessing
import time
from pathlib import Path

import jwt
import orjson
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shipyard.gateway.counters import SharedCounters
from shipyard.gateway.plugin_chain import build_consumers, instantiate, resolve_plugins
from shipyard.gateway.plugins import PluginConfigError, RequestContext
from shipyard.gateway.plugins.basic_auth import hash_password
from shipyard.gateway.plugins.prometheus import metrics_exposition

HS_SECRET = "hs-secret-of-alice-32-bytes-long!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _store() -> dict[str, bytes]:
    records = {
        "gateway/consumers/c1": {"id": "c1", "username": "alice"},
        "gateway/consumers/c2": {"id": "c2", "username": "bob"},
        "gateway/credentials/key-auth/k1": {"id": "k1", "consumer": "c1", "kind": "key-auth", "key": "alice-key"},
        "gateway/credentials/key-auth/k2": {"id": "k2", "consumer": "c2", "kind": "key-auth", "key": "bob-key"},
        "gateway/credentials/jwt/j1": {"id": "j1", "consumer": "c1", "kind": "jwt", "key": "alice-iss",
                                       "algorithm": "HS256", "secret": HS_SECRET},
        "gateway/credentials/jwt/j2": {"id": "j2", "consumer": "c2", "kind": "jwt", "key": "bob-iss",
                                       "algorithm": "RS256", "rsa_public_key": RSA_PUBLIC},
        "gateway/credentials/basic-auth/b1": {"id": "b1", "consumer": "c1", "kind": "basic-auth",
                                              "username": "alice", "password": hash_password("pw")},
        "gateway/credentials/acl/a1": {"id": "a1", "consumer": "c1", "kind": "acl", "group": "admins"},
    }
    return {k: orjson.dumps(v) for k, v in records.items()}


CONSUMERS = build_consumers(_store())


def ctx(headers: list[tuple[str, str]] | None = None, *, method: str = "GET", query: str = "", ip: str = "10.0.0.5",
        **kw) -> RequestContext:  # type: ignore[no-untyped-def]
    c = RequestContext(method=method, path="/x", query=query, host="h", client_ip=ip, scheme="http",
                       request_headers=list(headers or []), route_id="r1", service_name="svc", **kw)
    c.shared["consumers"] = CONSUMERS
    return c


def message(reject) -> str:  # type: ignore[no-untyped-def]
    return reject.message


async def test_key_auth() -> None:
    plugin = instantiate({"name": "key-auth", "config": {"hide_credentials": True}})
    missing = await plugin.access(ctx())
    assert (missing.status, missing.message) == (401, "No API key found in request")
    wrong = await plugin.access(ctx([("apikey", "nope")]))
    assert (wrong.status, wrong.message) == (401, "Invalid authentication credentials")
    ok = ctx([("ApiKey", "alice-key")])
    assert await plugin.access(ok) is None
    assert ok.consumer.username == "alice" and ok.header("apikey") is None and ok.header("x-consumer-id") == "c1"
    by_query = ctx(query="a=1&apikey=bob-key")
    assert await plugin.access(by_query) is None and by_query.consumer.id == "c2" and by_query.query == "a=1"
    with pytest.raises(PluginConfigError):
        instantiate({"name": "key-auth", "config": {"key_names": "apikey"}})


async def test_jwt_hs256_rs256_exp_nbf_and_claims_to_headers() -> None:
    plugin = instantiate({"name": "jwt", "config": {"claims_to_verify": ["exp", "nbf"], "leeway": 5,
                                                     "claims_to_headers": {"sub": "X-User"}}})
    now = int(time.time())
    hs = jwt.encode({"iss": "alice-iss", "sub": "u-1", "exp": now + 60, "nbf": now}, HS_SECRET, algorithm="HS256")
    c = ctx([("Authorization", f"Bearer {hs}")])
    assert await plugin.access(c) is None and c.consumer.id == "c1" and c.header("X-User") == "u-1"
    rs = jwt.encode({"iss": "bob-iss", "exp": now + 60, "nbf": now}, RSA_KEY, algorithm="RS256")
    c = ctx(query=f"jwt={rs}")
    assert await plugin.access(c) is None and c.consumer.id == "c2"
    expired = jwt.encode({"iss": "alice-iss", "exp": now - 30, "nbf": now - 60}, HS_SECRET, algorithm="HS256")
    assert message(await plugin.access(ctx([("Authorization", f"Bearer {expired}")]))) == "token expired"
    within_leeway = jwt.encode({"iss": "alice-iss", "exp": now - 2, "nbf": now - 60}, HS_SECRET, algorithm="HS256")
    assert await plugin.access(ctx([("Authorization", f"Bearer {within_leeway}")])) is None
    early = jwt.encode({"iss": "alice-iss", "exp": now + 90, "nbf": now + 60}, HS_SECRET, algorithm="HS256")
    assert message(await plugin.access(ctx([("Authorization", f"Bearer {early}")]))) == "token not valid yet"
    forged = jwt.encode({"iss": "alice-iss", "exp": now + 60, "nbf": now}, "w" * 32, algorithm="HS256")
    r = await plugin.access(ctx([("Authorization", f"Bearer {forged}")]))
    assert (r.status, r.message) == (401, "Invalid signature")
    # A token claiming HS256 for an RS256 credential (the classic key-confusion attack) is refused.
    confused = jwt.encode({"iss": "bob-iss", "exp": now + 60, "nbf": now}, "x" * 32, algorithm="HS256")
    assert message(await plugin.access(ctx([("Authorization", f"Bearer {confused}")]))) == "Invalid algorithm"
    assert message(await plugin.access(ctx())) == "Unauthorized"
    assert (await plugin.access(ctx([("Authorization", "Bearer abc")]))).status == 401


async def test_basic_auth_and_acl() -> None:
    plugin = instantiate({"name": "basic-auth", "config": {}})
    none = await plugin.access(ctx())
    assert none.status == 401 and ("WWW-Authenticate", 'Basic realm="service"') in none.headers
    bad = base64.b64encode(b"alice:wrong").decode()
    assert message(await plugin.access(ctx([("Authorization", f"Basic {bad}")]))) == \
        "Invalid authentication credentials"
    good = ctx([("Authorization", "Basic " + base64.b64encode(b"alice:pw").decode())])
    assert await plugin.access(good) is None and good.consumer.groups == ("admins",)
    acl = instantiate({"name": "acl", "config": {"allow": ["admins"]}})
    assert await acl.access(good) is None and good.header("X-Consumer-Groups") == "admins"
    bob = ctx([("apikey", "bob-key")])
    await instantiate({"name": "key-auth", "config": {}}).access(bob)
    denied = await acl.access(bob)
    assert (denied.status, denied.message) == (403, "You cannot consume this service")
    assert (await acl.access(ctx())).status == 401
    deny = instantiate({"name": "acl", "config": {"deny": ["admins"]}})
    assert (await deny.access(good)).status == 403 and await deny.access(bob) is None
    with pytest.raises(PluginConfigError):
        instantiate({"name": "acl", "config": {"allow": ["a"], "deny": ["b"]}})


async def test_rate_limiting_headers_and_429(tmp_path: Path) -> None:
    counters = SharedCounters(str(tmp_path / "counters"))
    plugin = instantiate({"name": "rate-limiting", "config": {"minute": 3, "hour": 100, "limit_by": "ip"}})
    for i in range(3):
        c = ctx()
        c.shared["counters"] = counters
        assert await plugin.access(c) is None
        headers = dict(c.response_headers)
        assert headers["X-RateLimit-Remaining-Minute"] == str(2 - i) and headers["RateLimit-Limit"] == "3"
        assert 1 <= int(headers["RateLimit-Reset"]) <= 60
    c = ctx()
    c.shared["counters"] = counters
    r = await plugin.access(c)
    assert (r.status, r.message) == (429, "API rate limit exceeded")
    headers = dict(r.headers)
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["RateLimit-Remaining"] == "0"
    # The refused request did not consume the hour window; another IP has its own count.
    assert counters.usage(f"rl|r1|svc|{plugin.scope}|ip:10.0.0.5", 3600) == 3
    other = ctx(ip="10.0.0.6")
    other.shared["counters"] = counters
    assert await plugin.access(other) is None


async def test_cors_size_ip_correlation_transformers() -> None:
    cors = instantiate({"name": "cors", "config": {"origins": ["https://app.example"], "credentials": True,
                                                   "max_age": 600, "headers": ["X-Token"]}})
    pre = await cors.access(ctx([("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")],
                                method="OPTIONS"))
    h = dict(pre.headers)
    assert pre.status == 204 and h["Access-Control-Allow-Origin"] == "https://app.example"
    assert h["Access-Control-Max-Age"] == "600" and h["Access-Control-Allow-Headers"] == "X-Token"
    assert h["Access-Control-Allow-Credentials"] == "true"
    stranger = await cors.access(ctx([("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")],
                                     method="OPTIONS"))
    assert "Access-Control-Allow-Origin" not in dict(stranger.headers)
    simple = ctx([("Origin", "https://app.example")])
    assert await cors.access(simple) is None
    cors.response(simple)
    assert ("Access-Control-Allow-Origin", "https://app.example") in simple.upstream_headers

    size = instantiate({"name": "request-size-limiting",
                        "config": {"allowed_payload_size": 1, "size_unit": "kilobytes"}})
    big = await size.access(ctx([("Content-Length", "1025")]))
    assert (big.status, big.message) == (413, "Request size limit exceeded")
    assert await size.access(ctx([("Content-Length", "1024")])) is None
    chunked = ctx([("Transfer-Encoding", "chunked")])
    assert await size.access(chunked) is None and chunked.shared["max_body_size"] == 1024

    ipr = instantiate({"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}})
    assert await ipr.access(ctx(ip="10.1.2.3")) is None
    assert (await ipr.access(ctx(ip="10.9.1.1"))).status == 403
    assert (await ipr.access(ctx(ip="192.168.1.1"))).status == 403
    with pytest.raises(PluginConfigError):
        instantiate({"name": "ip-restriction", "config": {"allow": ["300.1.1.1"]}})

    cid = instantiate({"name": "correlation-id", "config": {"header_name": "X-Req", "generator": "uuid",
                                                             "echo_downstream": True}})
    c = ctx()
    await cid.access(c)
    cid.response(c)
    assert len(c.header("X-Req")) == 36 and ("X-Req", c.header("X-Req")) in c.upstream_headers
    kept = ctx([("X-Req", "given")])
    await cid.access(kept)
    assert kept.header("X-Req") == "given"

    req = instantiate({"name": "request-transformer", "config": {
        "remove": {"headers": ["x-drop"], "querystring": ["debug"]}, "rename": {"headers": ["x-old:x-new"]},
        "add": {"headers": ["x-added:1"], "querystring": ["v:2"]}, "replace": {"headers": ["x-rep:new"]}}})
    c = ctx([("X-Drop", "1"), ("X-Old", "o"), ("X-Rep", "old")], query="debug=1&a=b")
    await req.access(c)
    assert c.header("x-drop") is None and c.header("x-new") == "o" and c.header("x-rep") == "new"
    assert c.header("x-added") == "1" and c.query == "a=b&v=2"
    resp = instantiate({"name": "response-transformer", "config": {"remove": {"headers": ["server"]},
                                                                    "add": {"headers": ["x-gw:shipyard"]}}})
    c = ctx()
    c.upstream_headers = [("Server", "nginx"), ("Content-Type", "text/plain")]
    resp.response(c)
    assert c.upstream_headers == [("Content-Type", "text/plain"), ("x-gw", "shipyard")]


async def test_prometheus_counts_by_route_and_status(tmp_path: Path) -> None:
    from shipyard.gateway.counters import SharedMetrics

    metrics = SharedMetrics(str(tmp_path / "metrics"))
    plugin = instantiate({"name": "prometheus", "config": {}})
    for status in (200, 201, 503):
        c = ctx(started_at=time.monotonic() - 0.02, upstream_latency=0.01, upstream_status=status)
        c.shared["metrics"] = metrics
        plugin.log(c)
    text = metrics_exposition(metrics).decode()
    assert 'shipyard_gateway_requests_total{service="svc",route="r1",status_class="2xx"} 2' in text
    assert 'status_class="5xx"} 1' in text
    assert 'shipyard_gateway_request_latency_seconds_count{service="svc",route="r1"} 3' in text
    assert 'shipyard_gateway_upstream_latency_seconds_bucket{service="svc",route="r1",le="0.01"} 3' in text


async def test_scope_precedence_and_consumer_plugins() -> None:
    records = [
        {"id": "g", "name": "rate-limiting", "config": {"minute": 1000}},
        {"id": "s", "name": "rate-limiting", "config": {"minute": 100}, "service": "svc"},
        {"id": "r", "name": "rate-limiting", "config": {"minute": 10}, "route": "r1"},
        {"id": "other", "name": "rate-limiting", "config": {"minute": 1}, "route": "r2"},
        {"id": "c", "name": "rate-limiting", "config": {"minute": 5}, "consumer": "c1", "route": "r1"},
        {"id": "k", "name": "key-auth", "config": {}, "service": "svc"},
        {"id": "cors", "name": "cors", "config": {}, "enabled": False},
    ]
    chain = resolve_plugins(records, service="svc", route={"id": "r1", "name": "api"})
    assert [p.name for p in chain.plugins] == ["key-auth", "rate-limiting"]
    assert chain.plugins[1].config == {"minute": 10}
    assert chain.for_consumer("c1")[1].config == {"minute": 5}
    assert chain.for_consumer("c2") is chain.plugins
    assert resolve_plugins(records, service="other", route="r9").plugins[0].config == {"minute": 1000}
    # run_access switches to the consumer's plugins once key-auth has identified alice.
    c = ctx([("apikey", "alice-key")])
    assert await chain.run_access(c) is None
    assert dict(c.response_headers)["X-RateLimit-Limit-Minute"] == "5"


def _hammer(path: str, n: int, start: multiprocessing.synchronize.Event, results: multiprocessing.Queue) -> None:
    counters = SharedCounters(path)
    start.wait()
    now = 1_000_020.0  # one fixed minute window for every process
    admitted = sum(1 for _ in range(n) if counters.acquire("route|consumer", 60, 100, now=now).allowed)
    results.put(admitted)


def test_100_per_minute_with_4_processes_admits_100(tmp_path: Path) -> None:
    path = str(tmp_path / "counters")
    SharedCounters(path)  # created once, like the server does before starting workers
    mp = multiprocessing.get_context("spawn")
    start, results = mp.Event(), mp.Queue()
    procs = [mp.Process(target=_hammer, args=(path, 200, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    admitted = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert 98 <= sum(admitted) <= 102
    assert sum(admitted) == 100  # the locked check-and-increment is exact, not just within ±2


async def test_docs_merge_rewrites_paths_and_components() -> None:
    from shipyard.gateway.docs import Mount, docs_response, merge_openapi

    orders = {"openapi": "3.0.3", "info": {"title": "Orders"}, "paths": {
        "/v1/items": {"get": {"operationId": "list", "responses": {"200": {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Item"}}}}}}},
        "/health": {"get": {"operationId": "health"}}},
        "components": {"schemas": {"Item": {"type": "object"}}}}
    users = {"openapi": "3.0.3", "paths": {"/users/{id}": {"get": {"operationId": "get"}}},
             "components": {"schemas": {"Item": {"type": "string"}}}}
    merged = merge_openapi([
        ("orders", orders, [Mount("/orders", True, "/v1")]),
        ("users", users, [Mount("/users", False)]),
    ])
    assert set(merged["paths"]) == {"/orders/items", "/users/{id}"}  # /health is outside the service path
    ref = merged["paths"]["/orders/items"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/orders.Item"}
    assert set(merged["components"]["schemas"]) == {"orders.Item", "users.Item"}
    assert merged["paths"]["/users/{id}"]["get"]["operationId"] == "users.get"
    status, headers, body = await docs_response("/docs", None, None)  # type: ignore[arg-type]
    assert status == 200 and b"/docs/assets/swagger-ui-bundle.js" in body and b"https://" not in body
    status, headers, body = await docs_response("/docs/assets/swagger-ui-bundle.js", None, None)  # type: ignore
    assert status == 200 and len(body) > 100_000 and dict(headers)["Content-Type"].endswith("javascript")
    assert await docs_response("/other", None, None) is None  # type: ignore[arg-type]


# ---- end to end through real gateway workers ------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from support import ServerProcess, free_port

    base = tmp_path_factory.mktemp("gw")
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "http.server", str(up_port), "--bind", "127.0.0.1",
                                 "--directory", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerProcess(base / "data")
    server.extra += ["--gateway-port", str(server.gateway_port), "--gateway-workers", "4"]
    server.start()
    server.upstream_port = up_port  # type: ignore[attr-defined]
    _wait_for(server.gateway_url + "/no-route-yet", 404)  # the workers are serving
    yield server
    server.stop()
    upstream.terminate()
    upstream.wait(timeout=10)


def _wait_for(url: str, status: int, method: str = "GET", **kw) -> requests.Response:  # type: ignore[no-untyped-def]
    """Each worker follows the store on its own: a config change reaches them at slightly different moments."""
    deadline = time.monotonic() + 20
    while True:
        try:
            r = requests.request(method, url, timeout=5, **kw)
            if r.status_code == status or time.monotonic() > deadline:
                return r
        except (requests.ConnectionError, requests.Timeout):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_end_to_end_auth_acl_rate_limit_cors_size_ip(gateway_server) -> None:  # type: ignore[no-untyped-def]
    admin = gateway_server.url + "/api/gateway"
    gw = gateway_server.gateway_url
    assert requests.post(f"{admin}/upstreams", json={"name": "files"}).status_code == 201
    assert requests.post(f"{admin}/upstreams/files/targets",
                         json={"target": f"127.0.0.1:{gateway_server.upstream_port}"}).status_code == 201
    assert requests.post(f"{admin}/services", json={"name": "files", "host": "files"}).status_code == 201
    for name, path in (("open", "/open"), ("keyed", "/keyed"), ("limited", "/limited"), ("small", "/small"),
                       ("private", "/private")):
        assert requests.post(f"{admin}/services/files/routes", json={"name": name, "paths": [path]}
                             ).status_code == 201
    requests.post(f"{admin}/consumers", json={"username": "alice"})
    requests.post(f"{admin}/consumers/alice/key-auth", json={"key": "alice-key"})
    requests.post(f"{admin}/consumers/alice/acls", json={"group": "staff"})
    requests.post(f"{admin}/consumers", json={"username": "eve"})
    requests.post(f"{admin}/consumers/eve/key-auth", json={"key": "eve-key"})
    requests.post(f"{admin}/routes/keyed/plugins", json={"name": "key-auth"})
    requests.post(f"{admin}/routes/keyed/plugins", json={"name": "acl", "config": {"allow": ["staff"]}})
    requests.post(f"{admin}/routes/limited/plugins", json={"name": "rate-limiting",
                                                           "config": {"minute": 100, "limit_by": "ip"}})
    requests.post(f"{admin}/routes/small/plugins", json={"name": "request-size-limiting",
                                                         "config": {"allowed_payload_size": 10, "size_unit": "bytes"}})
    requests.post(f"{admin}/routes/private/plugins",
                  json={"name": "ip-restriction", "config": {"deny": ["127.0.0.0/8"]}})
    requests.post(f"{admin}/routes/open/plugins", json={"name": "cors", "config": {"origins": ["https://a.example"],
                                                                                    "max_age": 60}})
    assert _wait_for(f"{gw}/open/", 200).status_code == 200
    r = _wait_for(f"{gw}/keyed/", 401)
    assert r.status_code == 401 and r.json() == {"message": "No API key found in request"}
    r = _wait_for(f"{gw}/keyed/", 401, headers={"apikey": "wrong"})
    assert r.json()["message"] == "Invalid authentication credentials"
    assert _wait_for(f"{gw}/keyed/", 200, headers={"apikey": "alice-key"}).status_code == 200
    r = _wait_for(f"{gw}/keyed/", 403, headers={"apikey": "eve-key"})
    assert r.status_code == 403 and r.json() == {"message": "You cannot consume this service"}
    # The cors plugin was written last: a worker may still be building the table that has it (then the
    # preflight goes upstream and gets http.server's 501), so wait for it as for the others.
    r = _wait_for(f"{gw}/open/", 204, "OPTIONS",
                  headers={"Origin": "https://a.example", "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert r.headers["Access-Control-Max-Age"] == "60"
    r = _wait_for(f"{gw}/small/", 413, "POST", data=b"x" * 11)
    assert r.status_code == 413 and r.json() == {"message": "Request size limit exceeded"}
    r = _wait_for(f"{gw}/private/", 403)
    assert r.status_code == 403
    # 100/minute over 4 workers, new connections each time so SO_REUSEPORT spreads them; stay in one window.
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)
    admitted, streak, statuses = 0, 0, []
    # Every worker counts once 8 fresh connections in a row carried the plugin's headers (a worker still on the
    # previous table lets a request through uncounted: at most +1 here, since they settle within milliseconds).
    deadline = time.monotonic() + 10
    while streak < 8 and time.monotonic() < deadline:
        r = requests.get(f"{gw}/limited/", headers={"Connection": "close"}, timeout=5)
        admitted += r.status_code == 200
        streak = streak + 1 if "X-RateLimit-Limit-Minute" in r.headers else 0
    for _ in range(130):
        r = requests.get(f"{gw}/limited/", headers={"Connection": "close"}, timeout=5)
        statuses.append(r.status_code)
    admitted += statuses.count(200)
    assert 98 <= admitted <= 102, statuses
    last = requests.get(f"{gw}/limited/")
    assert last.status_code == 429 and last.json() == {"message": "API rate limit exceeded"}
    assert int(last.headers["Retry-After"]) >= 1 and last.headers["RateLimit-Remaining"] == "0"
    assert last.headers["X-RateLimit-Limit-Minute"] == "100"


def test_prometheus_metrics_scraped_from_the_control_api(gateway_server) -> None:  # type: ignore[no-untyped-def]
    """Requests spread over the 4 workers are summed in one scrape of /api/gateway/metrics (Kong's Admin API
    /metrics), which a real Prometheus parser reads; long service and route names survive whole."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    admin = gateway_server.url + "/api/gateway"
    gw = gateway_server.gateway_url
    service = "metered-service-" + "s" * 60
    route = "metered-route-" + "r" * 60
    assert requests.post(f"{admin}/services", json={"name": service, "url": f"http://127.0.0.1:"
                                                    f"{gateway_server.upstream_port}"}).status_code == 201
    assert requests.post(f"{admin}/services/{service}/routes", json={"name": route, "paths": ["/metered"]}
                         ).status_code == 201
    assert requests.post(f"{admin}/services/{service}/plugins", json={"name": "prometheus"}).status_code == 201
    # Until every worker has the plugin, requests go uncounted: wait for counts to follow requests one for one.
    deadline = time.monotonic() + 20

    def requests_counted() -> dict[str, float]:
        text = requests.get(f"{admin}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "shipyard_gateway_requests_total" and sample.labels["route"] == route:
                    assert sample.labels["service"] == service
                    out[sample.labels["status_class"]] = sample.value
        return out

    streak = 0
    while streak < 8 and time.monotonic() < deadline:
        before = sum(requests_counted().values())
        requests.get(f"{gw}/metered/", headers={"Connection": "close"}, timeout=5)
        streak = streak + 1 if sum(requests_counted().values()) == before + 1 else 0
    assert streak == 8, "the prometheus plugin never reached every worker"

    before = requests_counted()

    def one(i: int) -> int:
        path = "/metered/" if i % 4 else "/metered/missing-file"
        return requests.get(gw + path, headers={"Connection": "close"}, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses.count(200) == 150 and statuses.count(404) == 50
    after = requests_counted()
    assert after["2xx"] - before.get("2xx", 0) == 150 and after["4xx"] - before.get("4xx", 0) == 50

    families = {f.name: f for f in text_string_to_metric_families(requests.get(f"{admin}/metrics", timeout=5).text)}
    latency = families["shipyard_gateway_request_latency_seconds"]
    assert latency.type == "histogram"
    ours = [s for s in latency.samples if s.labels.get("route") == route]
    count = next(s.value for s in ours if s.name.endswith("_count"))
    buckets = [s for s in ours if s.name.endswith("_bucket")]
    assert count == sum(after.values()) and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
    upstream = [s for s in families["shipyard_gateway_upstream_latency_seconds"].samples
                if s.labels.get("route") == route and s.name.endswith("_count")]
    assert upstream[0].value == count
    assert next(s.value for s in families["shipyard_gateway_workers"].samples) == 4


def test_leases_far_from_the_limit_never_pass_it(tmp_path: Path) -> None:
    """Two openers of one counters file (as two workers): far from the limit requests are counted from leases
    taken under the lock; the total admitted is still exactly the limit, and usage leaves out an unused lease."""
    from shipyard.gateway.counters import LEASE_FRACTION

    path = str(tmp_path / "counters")
    a, b = SharedCounters(path), SharedCounters(path)
    now, limit = 1_000_020.0, 3 * LEASE_FRACTION
    admitted = sum(1 for i in range(limit + 500)
                   if (a if i % 3 else b).acquire("route|consumer", 60, limit, now=now).allowed)
    assert admitted == limit
    assert a.usage("route|consumer", 60, now=now) == b.usage("route|consumer", 60, now=now) == limit
    first = a.acquire("idle|consumer", 60, limit, now=now)  # takes a lease, then a goes idle
    assert first.allowed and first.count == 1 and first.remaining == limit - 1
    assert a.usage("idle|consumer", 60, now=now) == 1
    counts = [b.acquire("idle|consumer", 60, limit, now=now).count for _ in range(3)]
    assert counts == sorted(counts) and counts[0] > 1  # b sees a's lease as used
    assert sum(1 for _ in range(limit) if b.acquire("idle|consumer", 60, limit, now=now).allowed) < limit
