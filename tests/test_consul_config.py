"""Consul config entries (/v1/config) and the discovery chain compiled from them, against a real server."""

from __future__ import annotations

import consul
import pytest
import requests

from support import ServerProcess


def test_crud_with_indexes(client: consul.Consul) -> None:
    assert client.config.set(kind="service-defaults", name="crud", config_entry={"Protocol": "HTTP"}) is True
    entry = client.config.get(kind="service-defaults", name="crud")
    assert (entry["Kind"], entry["Name"], entry["Protocol"]) == ("service-defaults", "crud", "http")
    assert entry["CreateIndex"] == entry["ModifyIndex"] > 0
    client.config.set(kind="service-defaults", name="crud", config_entry={"Protocol": "grpc"})
    updated = client.config.get(kind="service-defaults", name="crud")
    assert updated["CreateIndex"] == entry["CreateIndex"] and updated["ModifyIndex"] > entry["ModifyIndex"]
    assert "crud" in [e["Name"] for e in client.config.list(kind="service-defaults")]
    assert client.config.delete(kind="service-defaults", name="crud") is True
    assert client.config.get(kind="service-defaults", name="crud") is None


def test_cas_zero_creates_only_when_absent(client: consul.Consul) -> None:
    assert client.config.set(kind="service-defaults", name="cas0", config_entry={}, cas=0) is True
    assert client.config.set(kind="service-defaults", name="cas0", config_entry={"Protocol": "http"}, cas=0) is False
    index = client.config.get(kind="service-defaults", name="cas0")["ModifyIndex"]
    assert client.config.delete(kind="service-defaults", name="cas0", cas=index + 1) is False
    assert client.config.delete(kind="service-defaults", name="cas0", cas=index) is True


def test_missing_entry_is_consuls_404_text(server: ServerProcess) -> None:
    response = requests.get(f"{server.url}/v1/config/service-defaults/nope", timeout=10)
    assert response.status_code == 404
    assert response.text == 'Config entry not found for "service-defaults" / "nope"'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Kind": "no-such-kind", "Name": "x"}, "invalid config entry kind: no-such-kind"),
        ({"Kind": "proxy-defaults", "Name": "web"}, 'only "global" is supported'),
        ({"Kind": "mesh", "Name": "x"}, 'only "mesh" is supported'),
        ({"Name": "x"}, "does not contain a kind/Kind key"),
    ],
)
def test_invalid_entries_are_400(server: ServerProcess, body: dict[str, str], message: str) -> None:
    response = requests.put(f"{server.url}/v1/config", json=body, timeout=10)
    assert response.status_code == 400
    assert message in response.text


def test_listing_an_unknown_kind_is_400(server: ServerProcess) -> None:
    response = requests.get(f"{server.url}/v1/config/widgets", timeout=10)
    assert response.status_code == 400


def test_proxy_defaults_global_and_lowercase_keys(server: ServerProcess) -> None:
    body = {"kind": "proxy-defaults", "name": "global", "Config": {"protocol": "http"}}
    assert requests.put(f"{server.url}/v1/config", json=body, timeout=10).json() is True
    entry = requests.get(f"{server.url}/v1/config/proxy-defaults/global", timeout=10).json()
    assert entry["Config"] == {"protocol": "http"} and entry["Kind"] == "proxy-defaults"
    requests.delete(f"{server.url}/v1/config/proxy-defaults/global", timeout=10)


def test_default_chain(client: consul.Consul) -> None:
    chain = client.discovery_chain.get("plain")["Chain"]
    target = "plain.default.default.dc1"
    assert chain["ServiceName"] == "plain" and chain["Protocol"] == "tcp" and chain["Default"] is True
    assert chain["StartNode"] == f"resolver:{target}"
    assert chain["Nodes"][f"resolver:{target}"]["Resolver"] == {"ConnectTimeout": "5s", "Default": True,
                                                                "Target": target}
    assert chain["Targets"][target]["SNI"].startswith("plain.default.dc1.internal.")
    assert chain["Targets"][target]["SNI"].endswith(".consul")


def test_overrides_change_protocol_and_timeout(client: consul.Consul) -> None:
    chain = client.discovery_chain.get("over", override_protocol="http", override_connect_timeout="2s")["Chain"]
    assert chain["Protocol"] == "http" and chain["CustomizationHash"] and chain["Default"] is False
    assert chain["Targets"]["over.default.default.dc1"]["ConnectTimeout"] == "2s"


def test_router_splitter_and_resolver_compile(client: consul.Consul) -> None:
    client.config.set(kind="service-defaults", name="shop", config_entry={"Protocol": "http"})
    client.config.set(kind="service-resolver", name="shop", config_entry={
        "ConnectTimeout": "3s", "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {}}})
    client.config.set(kind="service-splitter", name="shop", config_entry={
        "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
    client.config.set(kind="service-router", name="shop", config_entry={
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin"}}]})
    chain = client.discovery_chain.get("shop")["Chain"]
    assert chain["StartNode"] == "router:shop.default.default"
    routes = chain["Nodes"]["router:shop.default.default"]["Routes"]
    assert [r["NextNode"] for r in routes] == ["resolver:admin.default.default.dc1", "splitter:shop.default.default"]
    splits = chain["Nodes"]["splitter:shop.default.default"]["Splits"]
    assert splits == [{"Weight": 90, "NextNode": "resolver:v1.shop.default.default.dc1"},
                      {"Weight": 10, "NextNode": "resolver:v2.shop.default.default.dc1"}]
    v1 = chain["Targets"]["v1.shop.default.default.dc1"]
    assert v1["Subset"] == {"Filter": "Service.Meta.version == v1"} and v1["ConnectTimeout"] == "3s"
    assert v1["SNI"].startswith("v1.shop.default.dc1.internal.")


def test_routing_a_tcp_service_is_refused_either_way(server: ServerProcess, client: consul.Consul) -> None:
    splitter = {"Kind": "service-splitter", "Name": "tcpsvc", "Splits": [{"Weight": 100}]}
    refused = requests.put(f"{server.url}/v1/config", json=splitter, timeout=10)
    assert refused.status_code == 500
    assert 'uses a protocol "tcp" that does not permit advanced routing or splitting behavior' in refused.text
    client.config.set(kind="service-defaults", name="tcpsvc", config_entry={"Protocol": "http"})
    assert requests.put(f"{server.url}/v1/config", json=splitter, timeout=10).json() is True
    back_to_tcp = {"Kind": "service-defaults", "Name": "tcpsvc", "Protocol": "tcp"}
    assert requests.put(f"{server.url}/v1/config", json=back_to_tcp, timeout=10).status_code == 500
    assert client.config.get(kind="service-defaults", name="tcpsvc")["Protocol"] == "http"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Kind": "service-splitter", "Name": "w", "Splits": [{"Weight": 60}]}, "must be 100, not 60.000000"),
        ({"Kind": "service-resolver", "Name": "r", "DefaultSubset": "v9"}, 'DefaultSubset "v9" is not a valid'),
        ({"Kind": "service-defaults", "Name": "p", "Protocol": "smtp"}, 'invalid protocol "smtp"'),
        ({"Kind": "service-intentions", "Name": "i", "Sources": [{"Action": "allow"}]}, "Name is required"),
        ({"Kind": "service-intentions", "Name": "i", "Sources": [{"Name": "a", "Action": "x"}]}, "Action must be"),
    ],
)
def test_kind_validation(server: ServerProcess, body: dict[str, object], message: str) -> None:
    response = requests.put(f"{server.url}/v1/config", json=body, timeout=10)
    assert response.status_code == 400 and message in response.text


def test_resolver_redirect_is_followed(client: consul.Consul) -> None:
    client.config.set(kind="service-resolver", name="old", config_entry={"Redirect": {"Service": "new"}})
    chain = client.discovery_chain.get("old")["Chain"]
    assert chain["StartNode"] == "resolver:new.default.default.dc1"
    assert list(chain["Targets"]) == ["new.default.default.dc1"]


def test_resolver_failover_targets(client: consul.Consul) -> None:
    client.config.set(kind="service-resolver", name="pay", config_entry={
        "Failover": {"*": {"Datacenters": ["dc2", "dc3"]}}})
    chain = client.discovery_chain.get("pay")["Chain"]
    resolver = chain["Nodes"]["resolver:pay.default.default.dc1"]["Resolver"]
    assert resolver["Failover"] == {"Targets": ["pay.default.default.dc2", "pay.default.default.dc3"]}
    assert chain["Targets"]["pay.default.default.dc2"]["Datacenter"] == "dc2"
