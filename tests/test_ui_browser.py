"""The web console in a real headless browser (Debian's chromium driven by Playwright) against a real server running
examples/hello: overview, a service scaled to 3 live, a KV edit that conflicts, a dead letter retried, and the login
with ACL tokens. Screenshots of the main views land in docs/screenshots/ (1280x800) for the README.

No console errors and no failed requests are allowed, except a live view's long-poll cancelled on purpose when the
page leaves it (net::ERR_ABORTED on /ui/live/, which the console's own script does).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ServerProcess, need_peer

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # a new instance starts, then passes its first health check

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright
except ImportError:  # the test extra installs it; need_peer below says so (and fails under SHIPYARD_REQUIRE_PEERS)
    sync_playwright = None  # type: ignore[assignment]


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def _raw(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _deploy_hello(server: ServerProcess, tmp_path: Path, token: str = "") -> None:
    project = tmp_path / "hello"
    shutil.copytree(ROOT / "examples" / "hello", project)
    env = {**os.environ, "SHIPYARD_HTTP_ADDR": server.addr}
    if token:
        env["SHIPYARD_HTTP_TOKEN"] = token
    done = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "deploy", ".", "--timeout", "90"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()


def _dead_letter(server: ServerProcess, queue: str, body: dict[str, Any]) -> None:
    """A message in `queue` failed by a consumer for good (max_attempts 1), as a broken worker leaves it."""
    from shipyard.bus.http_client import HttpBus

    _http("PUT", f"{server.url}/api/v1/bus/queues/{queue}", json.dumps({"max_attempts": 1}).encode(),
          {"Content-Type": "application/json"})
    _http("POST", f"{server.url}/api/v1/bus/queues/{queue}/enqueue",
          json.dumps({"payload": base64.b64encode(json.dumps(body).encode()).decode()}).encode(),
          {"Content-Type": "application/json"})

    async def fail_one() -> None:
        bus = HttpBus(server.url)
        consumer = await bus.consume(queue)
        delivery = await consumer.get(timeout=10)
        assert delivery is not None
        await delivery.fail("KeyError: 'name'")
        await consumer.close()
        await bus.close()

    # Playwright's sync API runs an event loop in this thread: the bus client gets its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, fail_one()).result(timeout=30)


def _greet_through_gateway(server: ServerProcess) -> None:
    """Turns on the prometheus plugin, then greets through the gateway until the workers have counted a greeting
    (they pick the plugin up from the store a moment after it is written)."""
    _http("POST", f"{server.url}/api/gateway/plugins", b'{"name": "prometheus"}', {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        urllib.request.urlopen(server.gateway_url + "/hello/tester", timeout=10).read()
        with urllib.request.urlopen(server.url + "/api/gateway/metrics", timeout=10) as response:
            if 'requests_total{service="hello"' in response.read().decode():
                return
    raise AssertionError("the gateway never counted a greeting: " + server.log_tail())


class Watched:
    """Every console error and failed request of a page, to assert there were none."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("console", self.console)
        page.on("requestfailed", self.failed)
        page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("dialog", lambda dialog: dialog.accept())  # the console's confirmations: the test says yes

    def console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def failed(self, request: Request) -> None:
        if "/ui/live/" in request.url and request.failure == "net::ERR_ABORTED":
            return  # a live view's long-poll, cancelled by the console when the page leaves that view
        self.problems.append(f"request failed: {request.method} {request.url}: {request.failure}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    need_peer("playwright", sync_playwright is not None, "pip install playwright (the test extra)")
    need_peer("chromium", os.path.exists(CHROMIUM), "apt-get install chromium (scripts/install-peers.sh)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def hello_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "data").start()
    try:
        _deploy_hello(server, tmp_path)
        yield server
    finally:
        server.stop()


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), caret="initial")  # hiding it injects a style the CSP refuses


def test_console_walk_through(browser: Browser, hello_server: ServerProcess) -> None:
    server = hello_server
    _http("PUT", f"{server.url}/v1/kv/config/hello/greeting", b'{"text": "hello", "exclaim": true}')
    _http("PUT", f"{server.url}/v1/kv/config/greeting/text", b"hello")
    _http("POST", f"{server.url}/api/v1/jobs", json.dumps(
        {"name": "greeting", "kind": "worker", "cmd": f"python {ROOT / 'tests' / 'apps' / 'kv_greeting.py'}",
         "instances": 1, "resources": {"cpu": 10, "memory": 64}}).encode(), {"Content-Type": "application/json"})
    _dead_letter(server, "ui-demo", {"nobody": "here"})
    # A service that cannot start: the overview lists it first, with why.
    _http("POST", f"{server.url}/api/v1/jobs", json.dumps(
        {"name": "broken", "cmd": "sh -c 'echo missing DATABASE_URL >&2; exit 3'", "instances": 1,
         "resources": {"cpu": 10, "memory": 32}}).encode(), {"Content-Type": "application/json"})
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    watched = Watched(page)

    # Overview: / redirects to the console; both services are healthy; the first view is small.
    page.goto(server.url + "/")
    assert page.url == server.url + "/ui/"
    services = page.locator("table.services")
    expect(services.locator("tr[data-service=hello] .badge")).to_have_text("passing")
    expect(services.locator("tr[data-service=hello]")).to_contain_text("2/2 passing")
    attention = page.locator("#attention + .scroll")
    expect(attention.locator("tr", has_text="broken").first).to_contain_text("exit code 3", timeout=WAIT_MS)
    expect(attention).to_contain_text("missing DATABASE_URL")
    expect(page.locator(".cards")).not_to_contain_text("0 failing")
    transferred = page.evaluate("performance.getEntriesByType('navigation').concat("
                                "performance.getEntriesByType('resource')).reduce((n, e) => n + e.transferSize, 0)")
    assert 0 < transferred < 200_000, f"first view transferred {transferred} bytes"
    _shot(page, "overview")

    # Keyboard: the first Tab lands on the skip link; the service link is reachable and opens the service.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    services.get_by_role("link", name="hello").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/services/hello")

    # Service page: two healthy instances with passing checks and their output; scale to 3 and watch the third
    # instance turn healthy with no reload (the marker set on this document survives).
    rows = page.locator("table.instances tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#checks-h + .scroll")).to_contain_text("200 OK")
    page.evaluate("window.__same_document = true")
    page.fill("#instances", "3")
    page.get_by_role("button", name="Scale").click()
    expect(page.locator("#flash")).to_contain_text("hello: scaling to 3 instances")
    third = page.locator("table.instances tr", has=page.locator("td:first-child", has_text="2"))
    expect(third.locator(".badge").first).to_have_text("healthy", timeout=WAIT_MS)
    expect(rows).to_have_count(3)
    expect(third.locator(".badge.passing")).to_have_count(1, timeout=WAIT_MS)
    assert page.evaluate("window.__same_document") is True
    expect(page.locator("section.deployment")).to_contain_text("successful", timeout=WAIT_MS)  # its progress, live
    expect(page.locator("#live-logs")).to_be_visible()

    # A rolling restart from the page: its deployment's progress is followed to the end.
    page.get_by_role("button", name="Restart").click()
    deployment = page.locator("section.deployment")
    expect(deployment.locator("h2")).to_contain_text("restart 1")
    expect(deployment.locator("h2")).to_contain_text("successful", timeout=WAIT_MS)
    expect(deployment).to_contain_text("3/3 healthy")
    _shot(page, "service")

    # Logs: a greeting through the gateway reaches the worker, whose stdout the page follows; search filters it.
    _greet_through_gateway(server)
    page.get_by_role("link", name="Overview").click()
    page.locator("table.services").get_by_role("link", name="greeter").click()
    page.select_option("#log-stream", "stdout")
    expect(page.locator("#live-logs")).to_contain_text("greeted tester", timeout=WAIT_MS)
    page.fill("#log-grep", "nobody-said-this")
    page.keyboard.press("Enter")
    expect(page.locator("#live-logs")).to_contain_text("Nothing on stdout matching")

    # KV: values are shown by their content (this one as JSON).
    page.get_by_role("link", name="Key/value").click()
    page.get_by_role("link", name="config/").click()
    page.get_by_role("link", name="hello/").click()
    page.get_by_role("link", name="greeting").click()
    expect(page.locator("pre.value")).to_contain_text('"exclaim": true')
    _shot(page, "kv")

    # The greeting worker's text: someone else changes it while it is open here, so our save is a conflict that
    # shows their value and overwrites nothing; saving again (knowingly) replaces it, and the running worker
    # picks the new text up (its log says so).
    page.get_by_role("link", name="config", exact=True).click()
    page.get_by_role("link", name="greeting/").click()
    page.get_by_role("link", name="text").click()
    expect(page.locator("pre.value")).to_have_text("hello")
    expect(page.locator("#kv-value")).to_have_value("hello")  # the editor opens with the current value
    _http("PUT", f"{server.url}/v1/kv/config/greeting/text", b"changed by someone else")
    page.fill("#kv-value", "mine")
    page.get_by_role("button", name="Save").click()
    conflict = page.locator("#kv-conflict")
    expect(conflict).to_contain_text("Conflict")
    expect(conflict).to_contain_text("changed by someone else")
    assert _raw(f"{server.url}/v1/kv/config/greeting/text?raw") == b"changed by someone else", "no overwrite"
    expect(page.locator("#kv-value")).to_have_value("mine")
    page.get_by_role("button", name="Save anyway").click()
    expect(page.locator("#kv-editor")).to_contain_text("Saved config/greeting/text")
    assert _raw(f"{server.url}/v1/kv/config/greeting/text?raw") == b"mine"
    # A new key beside it (create-only: cas 0), then deleted from the page.
    page.get_by_role("link", name="New key").click()
    expect(page.locator("#kv-key")).to_have_value("config/greeting/")
    page.fill("#kv-key", "config/greeting/extra")
    page.fill("#kv-value", "x")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#kv-editor")).to_contain_text("Saved config/greeting/extra")
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url("**/ui/kv?prefix=config%2Fgreeting%2F")
    expect(page.locator("ul.keys")).not_to_contain_text("extra")
    expect(page.locator("ul.keys")).to_contain_text("text")
    page.get_by_role("link", name="Overview").click()
    page.locator("table.services").get_by_role("link", name="greeting").click()
    page.select_option("#log-stream", "stdout")
    expect(page.locator("#live-logs")).to_contain_text("greeting is now: mine", timeout=WAIT_MS)

    # Gateway: admin-API entities and the hello service's urlprefix route are in the tables.
    json_type = {"Content-Type": "application/json"}
    _http("POST", f"{server.url}/api/gateway/services", b'{"name": "legacy", "url": "http://127.0.0.1:9/v1"}',
          json_type)
    _http("POST", f"{server.url}/api/gateway/services/legacy/routes", b'{"name": "legacy-api", "paths": ["/v1"]}',
          json_type)
    _http("POST", f"{server.url}/api/gateway/consumers", b'{"username": "alice"}', json_type)
    page.get_by_role("link", name="Gateway").click()
    gateway = page.locator("#live-gateway")
    expect(gateway).to_contain_text("/hello")
    expect(gateway.locator("tr", has_text="legacy-api")).to_contain_text("legacy")
    expect(gateway).to_contain_text("http://127.0.0.1:9")
    expect(gateway).to_contain_text("alice")
    expect(page.locator("table.metrics tbody tr").first).to_contain_text("hello")  # the greeting went through it
    _shot(page, "gateway")

    # Bus: the dead letter is listed with why; retry puts it back in its queue, and the page follows.
    page.get_by_role("link", name="Bus").click()
    page.get_by_role("link", name="ui-demo").click()
    dead = page.locator("table.dead tbody tr")
    expect(dead).to_have_count(1)
    expect(dead).to_contain_text("KeyError")
    _shot(page, "bus")
    dead.get_by_role("button", name="Retry").click()
    expect(page.locator("#flash")).to_contain_text("ui-demo: 1 dead letter back in the queue")
    queue_row = page.locator("tr[data-queue=ui-demo]")
    expect(page.locator("table.dead")).to_have_count(0)
    expect(queue_row.locator("td").nth(2)).to_have_text("1")  # depth
    expect(queue_row.locator("td").nth(6)).to_have_text("0")  # dead letters

    # Phone width: nothing overflows the page sideways (wide tables scroll inside their own box).
    page.set_viewport_size({"width": 375, "height": 740})
    page.get_by_role("link", name="Overview").click()
    expect(page.locator("table.services")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    _shot(page, "overview-phone")

    context.close()
    assert watched.problems == []


def test_console_login_with_acl_tokens(browser: Browser, tmp_path: Path) -> None:
    management = str(uuid.uuid4())
    server = ServerProcess(tmp_path / "data", "--acl", "--acl-initial-management", management).start()
    try:
        _login_flow(browser, server, management)
        _forged_writes_are_refused(server, management)
    finally:
        server.stop()


def _acl(server: ServerProcess, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    return _http(method, server.url + path, data, {"X-Consul-Token": token, "Content-Type": "application/json"})


def _login_flow(browser: Browser, server: ServerProcess, management: str) -> None:
    _http("PUT", f"{server.url}/v1/kv/shared/motd", b"welcome", {"X-Consul-Token": management})
    policy = _acl(server, "PUT", "/v1/acl/policy", management,
                  {"Name": "kv-only", "Rules": 'key_prefix "shared/" { policy = "read" }'})
    limited = _acl(server, "PUT", "/v1/acl/token", management, {"Policies": [{"ID": policy["ID"]}]})
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    watched = Watched(page)

    page.goto(server.url + "/ui/")
    page.wait_for_url("**/ui/login")
    page.fill("#token", "not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".flash.err")).to_contain_text("not known")

    # A token that may read shared/ only: the key is there, a service page is a 403 view.
    page.fill("#token", limited["SecretID"])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/ui/")
    cookie = next(c for c in context.cookies() if c["name"] == "shipyard_ui_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.goto(server.url + "/ui/kv?prefix=shared/&key=shared/motd")
    expect(page.locator("pre.value")).to_have_text("welcome")
    response = page.goto(server.url + "/ui/services/consul")
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_contain_text("403")

    # The token is deleted meanwhile: the next view returns to the login with why.
    _acl(server, "DELETE", f"/v1/acl/token/{limited['AccessorID']}", management)
    page.goto(server.url + "/ui/")
    page.wait_for_url("**/ui/login?why=expired")
    expect(page.locator(".flash.err")).to_contain_text("no longer valid")

    # The management token sees everything; log out ends the session.
    page.fill("#token", management)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("h1")).to_have_text("Overview")

    # Access: tokens (never their secrets) and policies; a new token's SecretID is shown once, and it works.
    page.get_by_role("link", name="Access").click()
    expect(page.locator("table.tokens")).to_contain_text("you")
    expect(page.locator("table.tokens")).not_to_contain_text(management)
    page.fill("#tok-desc", "ci reader")
    page.get_by_label("kv-only").check()
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#created-token pre").inner_text().strip()
    assert str(uuid.UUID(secret)) == secret
    [entry] = _http("GET", f"{server.url}/v1/kv/shared/motd", headers={"X-Consul-Token": secret})
    assert entry["Key"] == "shared/motd"
    _shot(page, "access")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/ui/login")
    context.close()
    # The 403 view's own document answer is the one expected "failed to load" console line.
    assert [p for p in watched.problems if "403" not in p] == []


def _status(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _forged_writes_are_refused(server: ServerProcess, management: str) -> None:
    """The console's form posts need the session's CSRF token, and a foreign Origin is refused before that; the
    key is unchanged by both."""
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"shipyard_ui_token={management}"}
    body = b"key=shared/motd&value=forged&cas=0"
    status, text = _status(server.url + "/ui/kv", body, form)
    assert status == 403 and "form token" in text
    status, text = _status(server.url + "/ui/kv", body, {**form, "Origin": "http://evil.example",
                                                             "X-Shipyard-CSRF": "anything"})
    assert status == 403 and "cross-origin" in text
    raw = urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/kv/shared/motd?raw",
                                                        headers={"X-Consul-Token": management}), timeout=10).read()
    assert raw == b"welcome"
