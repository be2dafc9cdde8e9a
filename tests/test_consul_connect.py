"""Connect against a real server: intentions (exact, by ID, match, check, precedence, errors) and the CA (roots,
configuration, rotation, leaf certificates with SPIFFE URI SANs that verify against the active root)."""

from __future__ import annotations

import datetime as dt

import consul
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from support import ServerProcess


def test_exact_crud_and_list(client: consul.Consul) -> None:
    assert client.connect.intentions.upsert(source="web", destination="db", action="allow", description="d") is True
    found = client.connect.intentions.read(source="web", destination="db")
    assert (found["SourceName"], found["DestinationName"], found["Action"], found["Precedence"]) == \
        ("web", "db", "allow", 9)
    assert any(i["SourceName"] == "web" for i in client.connect.intentions.list())
    entry = client.config.get(kind="service-intentions", name="db")  # stored as Consul 1.9+ stores them
    assert [s["Name"] for s in entry["Sources"]] == ["web"]
    assert client.connect.intentions.delete(source="web", destination="db") is True
    assert client.connect.intentions.read(source="web", destination="db") is None


def test_check_follows_precedence(client: consul.Consul) -> None:
    client.connect.intentions.upsert(source="*", destination="vault", action="deny")
    client.connect.intentions.upsert(source="api", destination="vault", action="allow")
    assert client.connect.intentions.check(source="api", destination="vault") is True
    assert client.connect.intentions.check(source="other", destination="vault") is False
    assert client.connect.intentions.check(source="other", destination="unmentioned") is True  # default allow
    matched = client.connect.intentions.match(by="destination", name="vault")
    assert [(i["SourceName"], i["Precedence"]) for i in matched["vault"]] == [("api", 9), ("*", 8)]


def test_legacy_id_endpoints(server: ServerProcess) -> None:
    api = f"{server.url}/v1/connect/intentions"
    body = {"SourceName": "legacy-src", "DestinationName": "legacy-dst", "Action": "deny"}
    created = requests.post(api, json=body, timeout=10).json()
    got = requests.get(f"{api}/{created['ID']}", timeout=10).json()
    assert (got["ID"], got["Action"]) == (created["ID"], "deny")
    assert requests.post(api, json=body, timeout=10).status_code == 400  # the same pair twice
    assert requests.put(f"{api}/{created['ID']}", json={**body, "Action": "allow"}, timeout=10).status_code == 200
    assert requests.get(f"{api}/{created['ID']}", timeout=10).json()["Action"] == "allow"
    assert requests.delete(f"{api}/{created['ID']}", timeout=10).status_code == 200
    missing = requests.get(f"{api}/{created['ID']}", timeout=10)
    assert missing.status_code == 404 and missing.text == "Intention not found"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/connect/intentions/exact?source=a&destination=b", {"Action": "maybe"}, "Action must be set"),
        ("/v1/connect/intentions/exact?source=a", {"Action": "allow"}, "'destination' not set"),
    ],
)
def test_bad_intentions_are_400(server: ServerProcess, path: str, body: dict[str, str], message: str) -> None:
    response = requests.put(server.url + path, json=body, timeout=10)
    assert response.status_code == 400 and message in response.text


def _root(server: ServerProcess) -> tuple[dict[str, object], x509.Certificate]:
    roots = requests.get(f"{server.url}/v1/connect/ca/roots", timeout=10).json()
    (active,) = [r for r in roots["Roots"] if r["Active"]]
    assert active["ID"] == roots["ActiveRootID"] and "PrivateKey" not in active
    return roots, x509.load_pem_x509_certificate(active["RootCert"].encode())


def test_leaf_is_signed_by_the_active_root_with_a_spiffe_uri(fresh_server: ServerProcess) -> None:
    roots, root = _root(fresh_server)
    leaf = requests.get(f"{fresh_server.url}/v1/agent/connect/ca/leaf/billing", timeout=10).json()
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    cert.verify_directly_issued_by(root)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    expected = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/billing"
    assert uris == [expected] and leaf["ServiceURI"] == expected and leaf["Service"] == "billing"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(hours=71) < life < dt.timedelta(hours=73)  # LeafCertTTL 72h by default
    again = requests.get(f"{fresh_server.url}/v1/agent/connect/ca/leaf/billing", timeout=10).json()
    assert again["SerialNumber"] == leaf["SerialNumber"]  # kept, not re-issued per request
    agent_roots = requests.get(f"{fresh_server.url}/v1/agent/connect/ca/roots", timeout=10).json()
    assert agent_roots["ActiveRootID"] == roots["ActiveRootID"]


def test_configuration_update_and_key_rotation(fresh_server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=fresh_server.http_port)
    original = c.connect.ca.configuration()
    assert original["Provider"] == "consul" and original["Config"]["LeafCertTTL"] == "72h"
    assert c.connect.ca.update_configuration(provider="consul", config={"LeafCertTTL": "24h"}) is True
    assert c.connect.ca.configuration()["Config"]["LeafCertTTL"] == "24h"
    first, _ = _root(fresh_server)
    config = {"LeafCertTTL": "24h", "PrivateKeyType": "ec", "PrivateKeyBits": 384}
    assert c.connect.ca.update_configuration(provider="consul", config=config) is True
    rotated, root = _root(fresh_server)
    assert rotated["ActiveRootID"] != first["ActiveRootID"] and len(rotated["Roots"]) == 2
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.key_size == 384
    leaf = requests.get(f"{fresh_server.url}/v1/agent/connect/ca/leaf/after-rotation", timeout=10).json()
    x509.load_pem_x509_certificate(leaf["CertPEM"].encode()).verify_directly_issued_by(root)


def test_another_provider_is_refused(client: consul.Consul) -> None:
    with pytest.raises(consul.ConsulException, match="built-in"):
        client.connect.ca.update_configuration(provider="vault", config={})


def test_intentions_list_takes_a_filter(client: consul.Consul, server: ServerProcess) -> None:
    client.connect.intentions.upsert(source="f-src", destination="f-dst", action="deny")
    client.connect.intentions.upsert(source="g-src", destination="f-dst", action="allow")
    found = client.connect.intentions.list(filter_expr='DestinationName == "f-dst" and Action == deny')
    assert [i["SourceName"] for i in found] == ["f-src"]
    bad = requests.get(f"{server.url}/v1/connect/intentions", params={"filter": "Nope == 1"}, timeout=10)
    assert bad.status_code == 400
