"""Consul prepared queries (/v1/query) against a real server: CRUD, execute (health, tags, meta, Near, limit,
failover), templates, explain, and errors."""

from __future__ import annotations

from collections.abc import Iterator

import consul
import pytest
import requests

from support import ServerProcess


@pytest.fixture
def api(server: ServerProcess) -> Iterator[str]:
    yield f"{server.url}/v1/query"
    for query in requests.get(f"{server.url}/v1/query", timeout=10).json():
        requests.delete(f"{server.url}/v1/query/{query['ID']}", timeout=10)


def _register(client: consul.Consul, node: str, address: str, service: str, tags: list[str],
              status: str = "passing", meta: dict[str, str] | None = None) -> None:
    check = {"Node": node, "CheckID": f"{service}-check", "Name": "c", "Status": status, "ServiceID": service}
    client.catalog.register(node, address, service={"Service": service, "ID": service, "Tags": tags,
                                                    "Meta": meta or {}}, check=check)


def test_crud(api: str) -> None:
    created = requests.post(api, json={"Name": "crud-q", "Service": {"Service": "db"}}, timeout=10).json()
    (query,) = requests.get(f"{api}/{created['ID']}", timeout=10).json()
    assert query["Name"] == "crud-q" and query["Service"]["Service"] == "db"
    assert query["CreateIndex"] == query["ModifyIndex"] > 0
    update = {"Name": "crud-q", "Service": {"Service": "db", "OnlyPassing": True}}
    assert requests.put(f"{api}/{created['ID']}", json=update, timeout=10).status_code == 200
    assert requests.get(f"{api}/{created['ID']}", timeout=10).json()[0]["Service"]["OnlyPassing"] is True
    assert requests.delete(f"{api}/{created['ID']}", timeout=10).status_code == 200
    missing = requests.get(f"{api}/{created['ID']}", timeout=10)
    assert missing.status_code == 404 and missing.text == "Query not found"


def test_execute_filters_health_tags_and_meta(api: str, client: consul.Consul) -> None:
    _register(client, "qn1", "10.0.0.1", "qsvc", ["primary"], meta={"env": "prod"})
    _register(client, "qn2", "10.0.0.2", "qsvc", ["secondary"], status="warning", meta={"env": "prod"})
    _register(client, "qn3", "10.0.0.3", "qsvc", ["primary"], status="critical")
    requests.post(api, json={"Name": "any", "Service": {"Service": "qsvc"}}, timeout=10)
    requests.post(api, json={"Name": "passing", "Service": {"Service": "qsvc", "OnlyPassing": True}}, timeout=10)
    requests.post(api, json={"Name": "tagged", "Service": {"Service": "qsvc", "Tags": ["!secondary"]}}, timeout=10)
    requests.post(api, json={"Name": "meta", "Service": {"Service": "qsvc", "ServiceMeta": {"env": "prod"},
                                                         "IgnoreCheckIDs": ["qsvc-check"]}}, timeout=10)

    def nodes(name: str) -> list[str]:
        result = client.query.execute(name)
        assert result["Service"] == "qsvc" and result["Datacenter"] == "dc1" and result["Failovers"] == 0
        return sorted(n["Node"]["Node"] for n in result["Nodes"])

    assert nodes("any") == ["qn1", "qn2"]  # critical is always left out
    assert nodes("passing") == ["qn1"]
    assert nodes("tagged") == ["qn1"]
    assert nodes("meta") == ["qn1", "qn2"]  # the ignored check does not count, qn3 has no env meta


def test_near_sorts_by_coordinates_and_limit_cuts(api: str, client: consul.Consul) -> None:
    for i, x in enumerate((0.3, 0.1, 0.2)):
        node = f"near{i}"
        _register(client, node, f"10.2.0.{i}", "nearsvc", [])
        client.coordinate.update(node, {"Adjustment": 0, "Error": 0.1, "Height": 0, "Vec": [x, 0, 0, 0, 0, 0, 0, 0]})
    created = client.query.create("nearsvc", "nearq")
    result = client.query.execute(created["ID"], near="near0")
    assert [n["Node"]["Node"] for n in result["Nodes"]] == ["near0", "near2", "near1"]
    assert len(client.query.execute("nearq", near="near0", limit=1)["Nodes"]) == 1


def test_failover_in_one_datacenter_has_nowhere_to_go(api: str, client: consul.Consul) -> None:
    body = {"Name": "fo", "Service": {"Service": "nowhere", "Failover": {"NearestN": 2, "Datacenters": ["dc2"]}}}
    requests.post(api, json=body, timeout=10)
    result = client.query.execute("fo")
    assert result["Nodes"] == [] and result["Failovers"] == 0


def test_template_renders_the_name_and_explain_shows_it(api: str, client: consul.Consul) -> None:
    _register(client, "tn1", "10.3.0.1", "geo-web", [])
    body = {"Name": "geo-", "Template": {"Type": "name_prefix_match", "Regexp": "^geo-(.*)$"},
            "Service": {"Service": "geo-${match(1)}"}}
    requests.post(api, json=body, timeout=10)
    result = client.query.execute("geo-web")
    assert result["Service"] == "geo-web" and [n["Node"]["Node"] for n in result["Nodes"]] == ["tn1"]
    assert client.query.explain("geo-web")["Query"]["Service"]["Service"] == "geo-web"


def test_pyconsul_create_lowercase_body(api: str, client: consul.Consul) -> None:
    created = client.query.create("lc-svc", "lcquery", onlypassing=True, tags=["a"])
    (query,) = client.query.get(created["ID"])
    assert query["Service"] == {**query["Service"], "Service": "lc-svc", "OnlyPassing": True, "Tags": ["a"]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Name": "x"}, "Must provide a Service name to query"),
        ({"Name": "x", "Service": {"Service": "s", "Failover": {"NearestN": -1}}}, "Bad NearestN"),
        ({"Name": "x", "Service": {"Service": "s"}, "DNS": {"TTL": "ten"}}, "Bad DNS TTL"),
        ({"Name": "x", "Service": {"Service": "s"}, "Template": {"Type": "weird"}}, "Bad Template.Type"),
        ({"Name": "x", "Service": {"Service": "s"}, "Session": "no-such-session"}, "invalid session"),
    ],
)
def test_invalid_queries(api: str, body: dict[str, object], message: str) -> None:
    response = requests.post(api, json=body, timeout=10)
    assert response.status_code == 500 and message in response.text


def test_names_are_unique(api: str) -> None:
    requests.post(api, json={"Name": "dup", "Service": {"Service": "s"}}, timeout=10)
    response = requests.post(api, json={"Name": "dup", "Service": {"Service": "t"}}, timeout=10)
    assert response.status_code == 500 and "aliases an existing query name" in response.text


def test_executing_an_unknown_query_is_404(api: str) -> None:
    response = requests.get(f"{api}/nothing-here/execute", timeout=10)
    assert response.status_code == 404


async def test_the_dns_entry_point_runs_a_query_by_name_and_is_none_for_unknown() -> None:
    """execute_prepared_query is what DNS calls for <query>.query.consul: in-process, over a real SQLite store."""
    from shipyard.registry.catalog import Catalog
    from shipyard.registry.node import NodeIdentity
    from shipyard.registry.prepared_queries import PreparedQueries, execute_prepared_query
    from shipyard.store import SqliteStore

    store = await SqliteStore.open(None)
    try:
        node = NodeIdentity("dns-node", "00000000-0000-0000-0000-000000000001", "127.0.0.1", "dc1")
        catalog = Catalog(store, node)
        await catalog.start()
        await catalog.register_service("dns-node", {"ID": "web1", "Service": "web", "Port": 80, "Tags": []}, [])
        await PreparedQueries(store, catalog, node).create({"Name": "webq", "Service": {"Service": "web"},
                                                             "DNS": {"TTL": "10s"}})
        found = await execute_prepared_query(store, catalog, node, "webq")
        assert found is not None and found.dns_ttl == "10s"
        assert [(n["Node"]["Node"], n["Service"]["Port"]) for n in found.nodes] == [("dns-node", 80)]
        assert await execute_prepared_query(store, catalog, node, "nope") is None
    finally:
        await store.close()
