"""Consul's ACL auth methods (type jwt), binding rules, login and logout on a real `shipyard server --acl`: py-consul's
CRUD, a login whose JWT claims pick a service identity, a policy and a role through selectors and `${value.x}`, the
token's powers, logout, and the refusals (bad signature, issuer, audience, expiry, no matching rule, bad definitions).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support import ServerProcess

MANAGEMENT = str(uuid.uuid4())
ISSUER = "https://issuer.example"


def _key_pair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


SIGNER, PUBLIC_PEM = _key_pair()
STRANGER, _ = _key_pair()


def _jwt(key: Any = SIGNER, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "shipyard", "iat": now, "nbf": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("auth") / "data"
    proc = ServerProcess(data_dir, "--acl", "--acl-initial-management", MANAGEMENT, "--no-gateway",
                         "--vault-port", "0").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=server.http_port, token=MANAGEMENT)


def call(server: ServerProcess, method: str, path: str, token: str = "", **kw: Any) -> requests.Response:
    headers = {"X-Consul-Token": token} if token else {}
    return requests.request(method, server.url + path, headers=headers, timeout=10, **kw)


def _method(server: ServerProcess, name: str, **config: Any) -> requests.Response:
    config = {"JWTValidationPubKeys": [PUBLIC_PEM], "BoundIssuer": ISSUER, "BoundAudiences": ["shipyard"],
              "ClaimMappings": {"team": "team", "/svc/name": "svc"}, "ListClaimMappings": {"groups": "groups"},
              **config}
    return call(server, "PUT", "/v1/acl/auth-method", MANAGEMENT,
                json={"Name": name, "Type": "jwt", "MaxTokenTTL": "10m", "Config": config})


def _rule(server: ServerProcess, method: str, bind_type: str, bind_name: str, selector: str = "") -> requests.Response:
    return call(server, "PUT", "/v1/acl/binding-rule", MANAGEMENT, json={
        "AuthMethod": method, "BindType": bind_type, "BindName": bind_name, "Selector": selector})


def test_auth_method_and_binding_rule_crud_through_py_consul(admin: consul.Consul) -> None:
    made = admin.acl.auth_method.create(name="crud-jwt", method_type="jwt", description="first",
                                        config={"JWTValidationPubKeys": [PUBLIC_PEM], "BoundIssuer": ISSUER},
                                        max_token_ttl="1h")
    assert (made["Name"], made["Type"], made["MaxTokenTTL"]) == ("crud-jwt", "jwt", "1h0m0s")
    assert admin.acl.auth_method.read(name="crud-jwt")["Config"]["BoundIssuer"] == ISSUER
    assert next(m for m in admin.acl.auth_method.list() if m["Name"] == "crud-jwt").get("Config") is None  # stubs
    rule = admin.acl.binding_rule.create(auth_method="crud-jwt", bind_type="service", bind_name="svc-a",
                                         selector='value.iss == "x"')
    assert admin.acl.binding_rule.read(binding_rule_id=rule["ID"])["BindName"] == "svc-a"
    assert [r["ID"] for r in admin.acl.binding_rule.list(auth_method="crud-jwt")] == [rule["ID"]]
    assert admin.acl.binding_rule.list(auth_method="no-such-method") == []
    updated = admin.acl.binding_rule.update(binding_rule_id=rule["ID"], auth_method="crud-jwt", bind_type="role",
                                            bind_name="role-b")
    assert (updated["BindType"], updated["Selector"], updated["ModifyIndex"] > rule["ModifyIndex"]) == \
        ("role", "", True)
    assert admin.acl.auth_method.update(name="crud-jwt", method_type="jwt", description="second",
                                        config={"JWTValidationPubKeys": [PUBLIC_PEM]})["Description"] == "second"
    assert admin.acl.auth_method.delete(name="crud-jwt") is True
    assert admin.acl.auth_method.read(name="crud-jwt") is None
    assert admin.acl.binding_rule.read(binding_rule_id=rule["ID"]) is None  # went with its method


def test_login_binds_by_claims_and_logout_ends_the_token(server: ServerProcess, admin: consul.Consul) -> None:
    assert _method(server, "corp").status_code == 200
    policy = call(server, "PUT", "/v1/acl/policy", MANAGEMENT,
                  json={"Name": "reader-payments", "Rules": 'key_prefix "payments/" { policy = "read" }'}).json()
    call(server, "PUT", "/v1/acl/role", MANAGEMENT, json={"Name": "ops-role", "Policies": [{"ID": policy["ID"]}]})
    for bind_type, bind_name, selector in (("service", "${value.svc}", 'value.team == "payments"'),
                                           ("policy", "reader-${value.team}", '"admins" in list.groups'),
                                           ("role", "ops-role", 'value.team == "ops"')):
        assert _rule(server, "corp", bind_type, bind_name, selector).status_code == 200
    bearer = _jwt(team="payments", svc={"name": "ledger"}, groups=["admins", "dev"])
    answer = call(server, "POST", "/v1/acl/login", json={"AuthMethod": "corp", "BearerToken": bearer,
                                                         "Meta": {"pod": "p-1"}})
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert token["AuthMethod"] == "corp" and token["Local"] is True and token["ExpirationTime"]
    assert token["ServiceIdentities"] == [{"ServiceName": "ledger"}]
    assert [p["Name"] for p in token["Policies"]] == ["reader-payments"] and token["Roles"] == []
    assert token["Description"] == 'token created via login: {"pod":"p-1"}'
    secret = token["SecretID"]
    assert call(server, "PUT", "/v1/agent/service/register", secret, json={"Name": "ledger", "Port": 1}).ok
    assert call(server, "PUT", "/v1/agent/service/register", secret, json={"Name": "other", "Port": 1}).status_code \
        == 403
    assert call(server, "GET", "/v1/kv/payments/x", secret).status_code == 404  # may read: just absent
    assert call(server, "PUT", "/v1/kv/payments/x", secret, data=b"v").status_code == 403
    assert call(server, "GET", "/v1/acl/token/self", secret).json()["AuthMethod"] == "corp"
    # The ops team: the role rule alone.
    ops = call(server, "POST", "/v1/acl/login", json={"AuthMethod": "corp", "BearerToken": _jwt(team="ops")}).json()
    assert [r["Name"] for r in ops["Roles"]] == ["ops-role"] and ops["ServiceIdentities"] == []
    # Logout ends the login's token; a token not made by a login cannot log out.
    assert call(server, "POST", "/v1/acl/logout", secret).json() is True
    assert "ACL not found" in call(server, "GET", "/v1/acl/token/self", secret).text
    refused = call(server, "POST", "/v1/acl/logout", MANAGEMENT)
    assert refused.status_code == 403 and "wasn't created via login" in refused.text
    # Deleting the method takes its rules and the tokens logged in through it.
    assert admin.acl.auth_method.delete(name="corp") is True
    assert admin.acl.binding_rule.list(auth_method="corp") == []
    assert call(server, "GET", "/v1/acl/token/self", ops["SecretID"]).status_code == 403


@pytest.mark.parametrize(("bearer", "words"), [
    (_jwt(key=STRANGER, team="payments"), "failed to verify id token signature"),
    (_jwt(team="payments", iss="https://elsewhere"), "invalid issuer claim"),
    (_jwt(team="payments", aud="someone-else"), "aud claim does not match any bound audience"),
    (_jwt(team="payments", exp=int(time.time()) - 3600), "token is expired"),
    (_jwt(team="payments", nbf=int(time.time()) + 3600), "token not valid yet"),
    (_jwt(team="nobody"), "Permission denied"),  # valid, but no rule matches: no token that could do nothing
    ("not-a-jwt", "not a JWT"),
])
def test_login_refusals_are_403_and_make_no_token(server: ServerProcess, bearer: str, words: str) -> None:
    _method(server, "strict")
    _rule(server, "strict", "service", "${value.team}", 'value.team == "payments"')
    before = len(call(server, "GET", "/v1/acl/tokens", MANAGEMENT).json())
    answer = call(server, "POST", "/v1/acl/login", json={"AuthMethod": "strict", "BearerToken": bearer})
    assert answer.status_code == 403 and words in answer.text, answer.text
    assert bearer not in answer.text
    assert len(call(server, "GET", "/v1/acl/tokens", MANAGEMENT).json()) == before


def test_unknown_method_login_is_acl_not_found(server: ServerProcess) -> None:
    answer = call(server, "POST", "/v1/acl/login", json={"AuthMethod": "missing", "BearerToken": _jwt()})
    assert answer.status_code == 403 and "ACL not found" in answer.text


@pytest.mark.parametrize(("body", "words"), [
    ({"Name": "k8s", "Type": "kubernetes", "Config": {}}, "Type should be one of"),
    ({"Name": "bad key", "Type": "jwt", "Config": {"JWTValidationPubKeys": [PUBLIC_PEM]}}, "invalid Name"),
    ({"Name": "nokey", "Type": "jwt", "Config": {"JWTValidationPubKeys": ["-----BEGIN PUBLIC KEY-----\nxx"]}},
     "error parsing public key"),
    ({"Name": "jwks", "Type": "jwt", "Config": {"JWKSURL": "https://example/keys"}}, "not supported by Shipyard"),
    ({"Name": "ttl", "Type": "jwt", "MaxTokenTTL": "5s", "Config": {"JWTValidationPubKeys": [PUBLIC_PEM]}},
     "MaxTokenTTL 5s must be between"),
])
def test_bad_auth_methods_are_400(server: ServerProcess, body: dict[str, Any], words: str) -> None:
    answer = call(server, "PUT", "/v1/acl/auth-method", MANAGEMENT, json=body)
    assert answer.status_code == 400 and words in answer.text, answer.text


@pytest.mark.parametrize(("bind_type", "bind_name", "selector", "words"), [
    ("service", "${value.nope}", "", "unknown variable accessed: value.nope"),
    ("service", "Upper", "", "invalid bind name"),
    ("policy", "p", "value.team ==", "Selector is invalid"),
    ("group", "g", "", "unknown BindType"),
    ("templated-policy", "builtin/nope", "", "does not match existing template name"),
])
def test_bad_binding_rules_are_400(server: ServerProcess, bind_type: str, bind_name: str, selector: str,
                                   words: str) -> None:
    _method(server, "rules")
    answer = _rule(server, "rules", bind_type, bind_name, selector)
    assert answer.status_code == 400 and words in answer.text, answer.text
    assert _rule(server, "absent-method", "service", "x").status_code == 400


def test_auth_method_endpoints_need_acl_rules(server: ServerProcess) -> None:
    assert call(server, "GET", "/v1/acl/auth-methods").status_code == 403
    assert call(server, "PUT", "/v1/acl/auth-method", json={"Name": "x", "Type": "jwt"}).status_code == 403
    assert call(server, "GET", "/v1/acl/binding-rules").status_code == 403
