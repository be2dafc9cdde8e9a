"""The console's Secrets page, Access edits, gateway certificates and traffic charts, against one real server (ACLs
on, the secrets engine in dev mode, the gateway with its workers), driven over HTTP as a browser's htmx would.

Secrets: listed by path with the viewer's own Vault token, values only in the answer to a click and only with `read`.
Access: tokens and policies edited and deleted with `acl = "write"`; bad rules come back in the form with the line.
Gateway: certificates with subject, SANs, SNIs and days left (never the key); per-route charts from the sampled
history.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import ServerProcess, free_port

MANAGEMENT = str(uuid.uuid4())
VAULT_ROOT = "console-root"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    vault_port = free_port()
    proc = ServerProcess(tmp_path_factory.mktemp("ui") / "data", "--acl", "--acl-initial-management", MANAGEMENT,
                         "--vault-port", str(vault_port), "--vault-dev", "--vault-dev-root-token-id", VAULT_ROOT)
    proc.vault_url = f"http://127.0.0.1:{vault_port}"  # type: ignore[attr-defined]
    proc.start()
    deadline = time.monotonic() + 30  # the engine listens after the control API answers
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", vault_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.stop()


class Console:
    """A logged-in console session: the cookies a browser keeps, the CSRF header htmx sends."""

    def __init__(self, server: ServerProcess, token: str) -> None:
        self.url = server.url
        self.http = requests.Session()
        page = self.http.get(f"{self.url}/ui/login", timeout=10).text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf is not None
        answer = self.http.post(f"{self.url}/ui/login", data={"csrf": csrf.group(1), "token": token}, timeout=10,
                                allow_redirects=False)
        assert answer.status_code == 303 and answer.headers["Location"] == "/ui/", answer.text
        self.csrf = self.csrf_of(self.get("/ui/").text)

    @staticmethod
    def csrf_of(page: str) -> str:
        found = re.search(r'"X-Shipyard-CSRF": "([0-9a-f]+)"', page)
        assert found is not None
        return found.group(1)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, data: Any = None, *, htmx: bool = True, csrf: bool = True) -> requests.Response:
        headers = {"HX-Request": "true"} if htmx else {}
        if csrf:
            headers["X-Shipyard-CSRF"] = self.csrf
        return self.http.post(self.url + path, data=data or {}, headers=headers, timeout=30, allow_redirects=False)


def _vault(server: ServerProcess, method: str, path: str, token: str = VAULT_ROOT, body: Any = None) -> Any:
    answer = requests.request(method, f"{server.vault_url}/v1/{path}",  # type: ignore[attr-defined]
                              headers={"X-Vault-Token": token}, json=body, timeout=10)
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else None


def _consul(server: ServerProcess, method: str, path: str, body: Any = None, token: str = MANAGEMENT) -> Any:
    answer = requests.request(method, server.url + path, headers={"X-Consul-Token": token}, json=body, timeout=10)
    assert answer.status_code in (200, 201, 204), answer.text
    return answer.json() if answer.content else None


# ---- secrets ----------------------------------------------------------------------------------------------------

APP_POLICY = """
path "secret/metadata/" { capabilities = ["list"] }
path "secret/metadata/app/*" { capabilities = ["list"] }
path "secret/data/app/db" { capabilities = ["read"] }
"""


def test_secrets_listed_by_path_revealed_on_click_only_with_read(server: ServerProcess) -> None:
    _vault(server, "POST", "secret/data/app/db", body={"data": {"password": "s3cret-db-pw", "port": 5432}})
    _vault(server, "POST", "secret/data/app/api", body={"data": {"key": "k-api-123"}})
    _vault(server, "POST", "secret/data/other/x", body={"data": {"v": "x-other"}})
    _vault(server, "POST", "sys/mounts/kv1", body={"type": "kv"})
    _vault(server, "POST", "kv1/team/a", body={"v": "kv1-value"})
    _vault(server, "PUT", "sys/policies/acl/app-reader", body={"policy": APP_POLICY})
    limited = _vault(server, "POST", "auth/token/create", body={"policies": ["app-reader"]})["auth"]["client_token"]
    console = Console(server, MANAGEMENT)

    # No Vault token yet: the form, nothing else; a token the engine does not know is said at once.
    page = console.get("/ui/secrets").text
    assert 'name="token"' in page and "app/" not in page
    bad = console.post("/ui/secrets/token", {"token": "not-a-token"}, htmx=False)
    assert bad.status_code == 303 and bad.headers["Location"] == "/ui/secrets?why=bad"
    assert "not known to the secrets engine" in console.get(bad.headers["Location"]).text
    kept = console.post("/ui/secrets/token", {"token": limited}, htmx=False)
    assert kept.status_code == 303
    cookie = kept.headers["Set-Cookie"]
    assert "shipyard_ui_vault=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/ui/" in cookie

    # Mounts the token's policies reach (not kv1/); folders by prefix; names, never values, before a click.
    page = console.get("/ui/secrets").text
    assert "app-reader" in page and 'href="/ui/secrets?mount=secret/"' in page and "kv1/" not in page
    assert "app/" in page and "other/" in page
    page = console.get("/ui/secrets", params={"mount": "secret/", "prefix": "app/"}).text
    assert "<code>db</code>" in page and "<code>api</code>" in page and page.count(">Reveal</button>") == 2
    assert "s3cret-db-pw" not in page and "k-api-123" not in page
    tricky = console.get("/ui/secrets", params={"mount": "secret/", "prefix": "app/../other/"})
    assert tricky.status_code == 400 and "invalid path" in tricky.text and "x-other" not in tricky.text
    denied = console.get("/ui/secrets", params={"mount": "secret/", "prefix": "other/"})
    assert denied.status_code == 403 and "do not allow listing secret/metadata/other/" in denied.text

    # The click: values with `read`, the 403 view without (as a fragment for htmx, a 403 page otherwise).
    shown = console.post("/ui/secrets/reveal", {"mount": "secret/", "path": "app/db"})
    assert shown.status_code == 200 and "s3cret-db-pw" in shown.text and "5432" in shown.text
    assert shown.headers["Cache-Control"] == "no-store"
    refused = console.post("/ui/secrets/reveal", {"mount": "secret/", "path": "app/api"})
    assert "403" in refused.text and "do not allow reading secret/app/api" in refused.text
    assert "k-api-123" not in refused.text
    assert console.post("/ui/secrets/reveal", {"mount": "secret/", "path": "app/api"}, htmx=False).status_code == 403
    forged = console.post("/ui/secrets/reveal", {"mount": "secret/", "path": "app/db"}, csrf=False)
    assert "form token" in forged.text and "s3cret-db-pw" not in forged.text

    # The root token reaches every mount, KV v1 included; forgetting the token is back to the form.
    console.post("/ui/secrets/token", {"token": VAULT_ROOT}, htmx=False)
    assert "kv1/" in console.get("/ui/secrets").text
    assert "<code>a</code>" in console.get("/ui/secrets", params={"mount": "kv1/", "prefix": "team/"}).text
    assert "kv1-value" in console.post("/ui/secrets/reveal", {"mount": "kv1/", "path": "team/a"}).text
    console.post("/ui/secrets/forget", htmx=False)
    assert 'name="token"' in console.get("/ui/secrets").text


# ---- access ------------------------------------------------------------------------------------------------------


def test_tokens_and_policies_edited_and_deleted_with_acl_write(server: ServerProcess) -> None:
    console = Console(server, MANAGEMENT)
    bad_rules = 'key_prefix "shared/" {\n  policy = "sideways"\n}\n'
    refused = console.post("/ui/access/policies", {"name": "ui-made", "description": "", "rules": bad_rules})
    assert "line 2" in refused.text and 'aria-invalid="true"' in refused.text
    assert "policy = &#34;sideways&#34;" in refused.text  # what was typed is kept in the form
    made = console.post("/ui/access/policies", {"name": "ui-made", "rules": 'key_prefix "a/" { policy = "read" }'})
    assert made.headers.get("HX-Redirect") == "/ui/access"
    policy = _consul(server, "GET", "/v1/acl/policy/name/ui-made")
    edited = console.post(f"/ui/access/policies/{policy['ID']}",
                          {"name": "ui-made", "description": "edited", "rules": 'key_prefix "b/" { policy = "write" }'})
    assert "Saved policy ui-made" in edited.text
    assert _consul(server, "GET", f"/v1/acl/policy/{policy['ID']}")["Rules"] == 'key_prefix "b/" { policy = "write" }'

    token = _consul(server, "PUT", "/v1/acl/token", {"Description": "before", "Policies": [{"Name": "ui-made"}],
                                                      "ServiceIdentities": [{"ServiceName": "web"}]})
    page = console.get("/ui/access").text
    assert f"/ui/access/tokens/{token['AccessorID']}/delete" in page and ">Edit policy</button>" in page
    assert token["SecretID"] not in page and 'name="policy" value="ui-made" checked' not in page
    form = console.get(f"/ui/access/tokens/{token['AccessorID']}/edit").text  # fetched by the Edit button
    assert 'name="policy" value="ui-made" checked' in form and token["SecretID"] not in form
    assert "Delete policy" in console.get(f"/ui/access/policies/{policy['ID']}/edit").text
    saved = console.post(f"/ui/access/tokens/{token['AccessorID']}", {"description": "after"})
    assert saved.headers.get("HX-Redirect") == "/ui/access"
    after = _consul(server, "GET", f"/v1/acl/token/{token['AccessorID']}")
    assert after["Description"] == "after" and not after.get("Policies")
    assert after["ServiceIdentities"] == [{"ServiceName": "web"}]  # what the form does not show is kept

    # A token that may only read ACLs sees no edit forms, and its forged writes are refused.
    reader_policy = _consul(server, "PUT", "/v1/acl/policy", {"Name": "acl-reader", "Rules": 'acl = "read"'})
    reader = _consul(server, "PUT", "/v1/acl/token", {"Policies": [{"ID": reader_policy["ID"]}]})
    looker = Console(server, reader["SecretID"])
    page = looker.get("/ui/access").text
    assert "Edit policy" not in page and "/delete" not in page and "ui-made" in page
    assert "Permission denied" in looker.get(f"/ui/access/policies/{policy['ID']}/edit").text
    assert "Permission denied" in looker.post(f"/ui/access/tokens/{token['AccessorID']}/delete").text
    assert _consul(server, "GET", f"/v1/acl/token/{token['AccessorID']}")["Description"] == "after"

    assert console.post(f"/ui/access/tokens/{token['AccessorID']}/delete").headers.get("HX-Redirect") == "/ui/access"
    assert requests.get(f"{server.url}/v1/acl/token/{token['AccessorID']}", timeout=10,
                        headers={"X-Consul-Token": MANAGEMENT}).status_code == 403
    assert console.post(f"/ui/access/policies/{policy['ID']}/delete").headers.get("HX-Redirect") == "/ui/access"
    assert requests.get(f"{server.url}/v1/acl/policy/{policy['ID']}", timeout=10,
                        headers={"X-Consul-Token": MANAGEMENT}).status_code == 404
    # The builtin policy and the anonymous token offer no Delete; a forged one is the API's refusal, in words.
    page = console.get("/ui/access/policies/00000000-0000-0000-0000-000000000001/edit").text
    assert "Save policy" in page and "/ui/access/policies/00000000-0000-0000-0000-000000000001/delete" not in page
    page = console.get("/ui/access").text
    assert "/ui/access/tokens/00000000-0000-0000-0000-000000000002/delete" not in page
    builtin = console.post("/ui/access/policies/00000000-0000-0000-0000-000000000001/delete")
    assert "not permitted" in builtin.text


# ---- gateway ------------------------------------------------------------------------------------------------------


def _certificate(name: str, days_left: float) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now + dt.timedelta(days=days_left))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("www." + name)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_gateway_certificates_with_days_left_never_the_key(server: ServerProcess) -> None:
    keys = []
    for name, days, snis in (("valid.example.test", 200.5, ["valid.example.test"]),
                             ("soon.example.test", 10.5, ["soon.example.test", "*.soon.example.test"]),
                             ("old.example.test", -3.5, [])):
        cert, key = _certificate(name, days)
        keys.append(key)
        _consul(server, "POST", "/api/gateway/certificates", {"cert": cert, "key": key, "snis": snis})
    console = Console(server, MANAGEMENT)
    page = console.get("/ui/gateway").text
    section = page[page.index('id="gw-certs"'):]
    assert "CN=valid.example.test" in section and "www.soon.example.test" in section
    assert '<span class="tag">*.soon.example.test</span>' in section
    rows = re.findall(r'<tr class="cert (\w+)"', section)
    assert rows == ["expired", "expiring", "valid"]  # soonest to expire first
    assert "expired 3 d ago" in section and '<span class="badge expiring">10 d</span>' in section
    assert "PRIVATE KEY" not in page and all(key.splitlines()[1] not in page for key in keys)


def test_gateway_charts_per_route_from_the_sampled_history(server: ServerProcess) -> None:
    admin = f"{server.url}/api/gateway"
    _consul(server, "POST", "/api/gateway/services", {"name": "ctl", "url": f"{server.url}/v1/status"})
    _consul(server, "POST", "/api/gateway/services/ctl/routes", {"name": "ctl-route", "paths": ["/ctl"]})
    _consul(server, "POST", "/api/gateway/services", {"name": "gone", "url": f"http://127.0.0.1:{free_port()}"})
    _consul(server, "POST", "/api/gateway/services/gone/routes", {"name": "gone-route", "paths": ["/gone"]})
    _consul(server, "POST", "/api/gateway/plugins", {"name": "prometheus"})
    console = Console(server, MANAGEMENT)

    # Traffic on both routes until the console's history holds a chart point of each.
    deadline, charts = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        for path in ("/ctl/leader", "/gone/x"):
            requests.get(server.gateway_url + path, timeout=10)
        page = console.get("/ui/live/gateway", params={"h": "stale"}).text  # the live view's own request
        charts = page[page.index('id="gw-charts"'):page.index('id="gw-certs"')]
        if _chart_row(charts, "gone-route") and _chart_row(charts, "ctl-route"):
            break
        time.sleep(0.5)
    gone, ctl = _chart_row(charts, "gone-route"), _chart_row(charts, "ctl-route")
    assert '<svg class="spark"' in gone and "<polyline" in gone and "req/s" in gone
    assert "<span>100 %</span>" in gone  # every request to a closed port is a 502
    assert "<span>0 %</span>" in ctl
    assert 'aria-label="ctl-route: latency p50, p95, p99"' in ctl
    routes = page[page.index('id="gw-routes"'):page.index('id="gw-svc"')]
    assert re.search(r"<td>ctl-route</td>.*?<td>ctl</td></tr>", routes)  # the route's service, referenced by name
    assert requests.get(f"{admin}/metrics", headers={"X-Consul-Token": MANAGEMENT}, timeout=10).ok


def _chart_row(charts: str, route: str) -> str:
    """The charts table's row of a route, once it has a drawn line ("" before)."""
    found = re.search(rf'<tr data-route="{route}">.*?</tr>', charts, re.DOTALL)
    return found.group(0) if found and "<polyline" in found.group(0) else ""
