"""Consul's ?filter= language: a table of (expression, record, expected) in process, then the endpoints over HTTP.

The table holds what Consul's API docs ("Filtering") show: every operator form, the selector examples
(ServiceMeta.foo and ServiceMeta["foo"]), values as bare selectors, numbers, double-quoted and raw backtick strings,
the precedence example, and filters of the kinds its endpoint pages describe; then go-bexpr 0.1.2's behaviours that
Consul inherits (any-element lists, absent map keys, typed values, its refusal texts).
"""

from __future__ import annotations

from typing import Any

import consul
import pytest
import requests

from shipyard.registry.filter import (
    AGENT_SERVICE,
    CHECK_SERVICE_NODE,
    HEALTH_CHECK,
    NODE,
    SERVICE_NODE,
    FilterError,
    compile_filter,
)
from support import ServerProcess

REDIS = {"ID": "redis1", "Service": "redis", "Tags": ["primary", "v1"], "Meta": {"env": "qa", "version": "4.0"},
         "Port": 6379, "Address": "10.1.2.3", "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
         "TaggedAddresses": {"lan": {"Address": "10.1.2.3", "Port": 6379}}, "Datacenter": "dc1"}
WEB = {"ID": "web1", "Service": "web", "Tags": [], "Meta": {"env": "prod"}, "Port": 80, "Address": "",
       "Weights": {"Passing": 10, "Warning": 1}, "EnableTagOverride": True, "Datacenter": "dc1"}
NODE_A = {"ID": "a0", "Node": "node-a", "Address": "10.0.0.1", "Datacenter": "dc1",
          "TaggedAddresses": {"lan": "10.0.0.1", "wan": "198.18.0.1"}, "Meta": {"os": "linux", "rack": "r1"}}
CHECK_OK = {"Node": "node-a", "CheckID": "service:redis1", "Name": "redis", "Status": "passing", "Notes": "",
            "Output": "ok", "ServiceID": "redis1", "ServiceName": "redis", "ServiceTags": ["primary"],
            "Type": "ttl", "Interval": "0s", "Timeout": "0s", "ExposedPort": 0, "Definition": {}}
CHECK_BAD = {**CHECK_OK, "CheckID": "serfHealth", "Status": "critical", "ServiceID": "", "ServiceName": "",
             "ServiceTags": []}
ENTRY = {"Node": NODE_A, "Service": REDIS, "Checks": [CHECK_BAD, CHECK_OK]}
INSTANCE = {"Node": "node-a", "Address": "10.0.0.1", "NodeMeta": {"os": "linux"}, "ServiceID": "redis1",
            "ServiceName": "redis", "ServiceTags": ["primary", "v1"], "ServiceMeta": {"version": "4.0"},
            "ServicePort": 6379, "ServiceWeights": {"Passing": 1, "Warning": 1}}

CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # As Consul's docs write them: services by Meta, instances by node meta and tag, health by status.
    ("Meta.env == qa", AGENT_SERVICE, REDIS, True),
    ("Meta.env == qa", AGENT_SERVICE, WEB, False),
    ('Meta.env == "qa"', AGENT_SERVICE, REDIS, True),
    ("Meta.env == `qa`", AGENT_SERVICE, REDIS, True),
    ('ServiceMeta["version"] == "4.0"', SERVICE_NODE, INSTANCE, True),
    ("ServiceMeta.version == `4.0`", SERVICE_NODE, INSTANCE, True),
    ('NodeMeta.os == linux and ServiceTags contains "primary"', SERVICE_NODE, INSTANCE, True),
    ('"v1" in ServiceTags and ServicePort == 6379', SERVICE_NODE, INSTANCE, True),
    ("Service.Meta.env == qa", CHECK_SERVICE_NODE, ENTRY, True),
    ("Checks.Status == critical", CHECK_SERVICE_NODE, ENTRY, True),  # any element of a list
    ("Checks.Status != passing", CHECK_SERVICE_NODE, ENTRY, True),  # ...also for !=: serfHealth is not passing
    ("Checks.Status == warning", CHECK_SERVICE_NODE, ENTRY, False),
    ("Node.Meta.rack == r1 and Service.Port == 6379", CHECK_SERVICE_NODE, ENTRY, True),
    ("Meta.os == linux", NODE, NODE_A, True),
    ("TaggedAddresses.wan == `198.18.0.1`", NODE, NODE_A, True),
    ("Address matches `^10\\.0\\.`", NODE, NODE_A, True),  # backticks: Go's raw string, no escapes
    ('Node not matches "^node-"', NODE, NODE_A, False),
    ("Status == passing", HEALTH_CHECK, CHECK_OK, True),
    ('ServiceName != "" and Status == passing', HEALTH_CHECK, CHECK_OK, True),
    # operators
    ('"primary" in Tags', AGENT_SERVICE, REDIS, True),
    ('"primary" not in Tags', AGENT_SERVICE, REDIS, False),
    ('Tags contains "v2"', AGENT_SERVICE, REDIS, False),
    ('Tags not contains "v2"', AGENT_SERVICE, REDIS, True),
    ('"edi" in Service', AGENT_SERVICE, REDIS, True),  # a string: substring
    ('"env" in Meta', AGENT_SERVICE, REDIS, True),  # a map: its keys
    ('"qa" in Meta', AGENT_SERVICE, REDIS, False),
    ("Tags is empty", AGENT_SERVICE, WEB, True),
    ("Tags is not empty", AGENT_SERVICE, REDIS, True),
    ("Meta is empty", AGENT_SERVICE, REDIS, False),
    ("Port == 6379", AGENT_SERVICE, REDIS, True),
    ("Port != 6379", AGENT_SERVICE, REDIS, False),
    ('Port == "6379"', AGENT_SERVICE, REDIS, True),  # values take the field's type
    ('Port == "0x18eb"', AGENT_SERVICE, REDIS, True),  # ...as strconv.ParseInt(v, 0, 64) reads them
    ("EnableTagOverride == true", AGENT_SERVICE, WEB, True),
    ("EnableTagOverride == false", AGENT_SERVICE, REDIS, True),
    ("Weights.Passing == 10", AGENT_SERVICE, WEB, True),
    ("TaggedAddresses.lan.Port == 6379", AGENT_SERVICE, REDIS, True),
    ('Service matches "^re"', AGENT_SERVICE, REDIS, True),
    ('Service not matches "^re"', AGENT_SERVICE, REDIS, False),
    # absent map keys: ==, in and is not empty are false, every other operator true (go-bexpr 0.1.2)
    ("Meta.missing == x", AGENT_SERVICE, REDIS, False),
    ("Meta.missing != x", AGENT_SERVICE, REDIS, True),
    ('"x" in Meta.missing', AGENT_SERVICE, REDIS, False),
    ('"x" not in Meta.missing', AGENT_SERVICE, REDIS, True),
    ("Meta.missing matches `.`", AGENT_SERVICE, REDIS, True),
    # boolean logic, precedence (docs: "a and not b or c" is "(a and (not b)) or c"), grouping, whitespace
    ("Service == redis and not Port == 1 or Port == 2", AGENT_SERVICE, REDIS, True),
    ("(Service == redis and (not Port == 1)) or Port == 2", AGENT_SERVICE, REDIS, True),
    ("Service == web and not Port == 1 or Port == 2", AGENT_SERVICE, REDIS, False),
    ("Service == redis and (Port == 1 or Port == 6379)", AGENT_SERVICE, REDIS, True),
    ("Service == redis and Port == 1 or Port == 6379", AGENT_SERVICE, WEB, False),
    ("not not Service == redis", AGENT_SERVICE, REDIS, True),
    ("not (Service == redis)", AGENT_SERVICE, REDIS, False),
    ("  ( Service==redis )  ", AGENT_SERVICE, REDIS, True),
    ("Service == redis\nand\tPort == 6379", AGENT_SERVICE, REDIS, True),
    ('Service == "re\\x64is"', AGENT_SERVICE, REDIS, True),  # Go string escapes
    ("Service == `re\\x64is`", AGENT_SERVICE, REDIS, False),  # backticks: raw, escapes not expanded
]


@pytest.mark.parametrize(("expression", "schema", "record", "expected"), CASES,
                         ids=[c[0] + ("" if c[3] else " (false)") for c in CASES])
def test_filter_table(expression: str, schema: dict[str, Any], record: dict[str, Any], expected: bool) -> None:
    assert compile_filter(expression, schema).matches(record) is expected


ERRORS = [
    ("Foo == 1", AGENT_SERVICE, 'Selector "Foo" is not valid'),
    ("Service.Foo == 1", CHECK_SERVICE_NODE, 'Selector "Service.Foo" is not valid'),
    ("Port == abc", AGENT_SERVICE,
     'Failed to coerce value "abc" for selector "Port": strconv.ParseInt: parsing "abc": invalid syntax'),
    ("EnableTagOverride == yes", AGENT_SERVICE,
     'Failed to coerce value "yes" for selector "EnableTagOverride": strconv.ParseBool: parsing "yes": invalid syntax'),
    ("Tags == x", AGENT_SERVICE, 'Invalid match operator "Equal" for selector "Tags"'),
    ("Service is empty", AGENT_SERVICE, 'Invalid match operator "Is Empty" for selector "Service"'),
    ("Port contains 1", AGENT_SERVICE, 'Invalid match operator "In" for selector "Port"'),
    ("Meta.env ==", AGENT_SERVICE, "1:12 (11): no match found, expected:"),
    ('Meta.env == "qa', AGENT_SERVICE, "1:13 (12): rule string: Unterminated string literal"),
    ("(Port == 1", AGENT_SERVICE, "1:11 (10): rule grouping: Unmatched parentheses"),
    ("Port == 1a", AGENT_SERVICE, "rule number: Invalid number literal"),
    ("Meta[env] == x", AGENT_SERVICE, "rule index: Invalid index"),
    ('Meta["env" == x', AGENT_SERVICE, "rule index: Unclosed index expression"),
    ('"x" in "y"', AGENT_SERVICE, "rule match: Invalid selector"),
    ("Service == redis and", AGENT_SERVICE, "no match found"),
    ('Address matches "^10\\.0"', NODE, "rule string: invalid syntax"),  # \. is no Go string escape
    ('Service matches "("', AGENT_SERVICE, 'Failed to compile regular expression "(": error parsing regexp:'),
]


@pytest.mark.parametrize(("expression", "schema", "text"), ERRORS, ids=[e[0] for e in ERRORS])
def test_filter_refusals(expression: str, schema: dict[str, Any], text: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(expression, schema)
    assert str(caught.value).startswith("Failed to create boolean expression evaluator: ")
    assert text in str(caught.value)


def test_filter_select_keeps_order() -> None:
    records = [REDIS, WEB, {**REDIS, "ID": "redis2", "Meta": {"env": "prod"}}]
    assert [r["ID"] for r in compile_filter("Meta.env == prod", AGENT_SERVICE).select(records)] == ["web1", "redis2"]


# ---- over HTTP: every endpoint that takes ?filter= -------------------------------------------------------------


def test_filter_on_every_endpoint(server: ServerProcess, client: consul.Consul) -> None:
    node = client.agent.self()["Config"]["NodeName"]
    client.agent.service.register("flt-a", service_id="flt-a", tags=["keep"], meta={"env": "qa"},
                                  check=consul.Check.ttl("30s"))
    client.agent.service.register("flt-b", service_id="flt-b", tags=["drop"], meta={"env": "prod"})
    client.agent.check.ttl_pass("service:flt-a")
    try:
        assert set(client.agent.services(filter_expr="Meta.env == qa")) == {"flt-a"}
        assert set(client.agent.checks(filter_expr='ServiceID == "flt-a"')) == {"service:flt-a"}
        assert client.agent.checks(filter_expr='CheckID == "serfHealth"') == {}
        _, nodes = client.catalog.nodes(filter_expr=f"Node == `{node}`")
        assert [n["Node"] for n in nodes] == [node]
        _, services = client.catalog.services(filter_expr='ServiceTags contains "keep"')
        assert set(services) == {"flt-a"}
        _, instances = client.catalog.service("flt-b", filter_expr="ServiceMeta.env == qa")
        assert instances == []
        _, entries = client.health.service("flt-a", filter_expr="Checks.Status == passing and Service.Tags "
                                                                "contains keep")
        assert [e["Service"]["ID"] for e in entries] == ["flt-a"]
        _, checks = client.health.checks("flt-a", filter_expr="Status == critical")
        assert checks == []
        _, checks = client.health.state("any", filter_expr='ServiceName == "flt-a"')
        assert [c["CheckID"] for c in checks] == ["service:flt-a"]
        _, checks = client.health.node(node, filter_expr="CheckID == serfHealth")
        assert [c["CheckID"] for c in checks] == ["serfHealth"]
        _, found = client.catalog.node(node, filter_expr="Service == `flt-b`")
        assert set(found["Services"]) == {"flt-b"}
    finally:
        client.agent.service.deregister("flt-a")
        client.agent.service.deregister("flt-b")


@pytest.mark.parametrize("path", ["/v1/agent/services", "/v1/agent/checks", "/v1/catalog/nodes",
                                  "/v1/catalog/services", "/v1/catalog/service/x", "/v1/health/service/x",
                                  "/v1/health/checks/x", "/v1/health/state/any", "/v1/health/node/x"])
def test_bad_filter_is_consuls_400(server: ServerProcess, path: str) -> None:
    answer = requests.get(server.url + path, params={"filter": "Nope == 1"}, timeout=10)
    assert answer.status_code == 400
    assert answer.text == 'Failed to create boolean expression evaluator: Selector "Nope" is not valid'
    blocking = requests.get(server.url + path, params={"filter": "(", "index": "1"}, timeout=10)
    assert blocking.status_code == 400
