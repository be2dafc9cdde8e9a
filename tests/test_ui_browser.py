"""The web console in a real headless browser (Debian's chromium driven by Playwright) against the demo: the mediahub
example started by `shipyard up --acl` (ACLs on, default deny) on free ports in a copy of the project.

One browser session walks what an operator does: log in with the management token, see every mediahub service
healthy, open a service (its instances' real CPU and memory, logs), roll out a new version and follow the deployment
to its end in that tab while working in a second one (edit live config a running service reads, through a KV
conflict, and see its effect through the gateway; retry a transcode job the worker dead-lettered; the gateway and
access pages), then scale the service to 3 and watch the third instance turn healthy, all without reloading the
service's tab. In a second session, a token without rights (403 view) that later expires (back to the login, with
why). The waits overlap on purpose: CI's time is short.
Screenshots of the main views land in docs/screenshots/ (1280x800) for the README and docs/console.md.

No console errors and no failed requests are allowed, except a live view's long-poll cancelled on purpose when the
page leaves it (net::ERR_ABORTED on /ui/live/, which the console's own script does), and the 403 view's own answer.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import ServerProcess, free_port, need_peer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mediahub"
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # a new instance starts, then passes its first health check
EXPECT_MS = 15_000
SERVICES = ("auth", "assets", "files", "search", "jobs")
TTL_KEY = "mediahub/auth/token_ttl_seconds"  # live config of the auth service: the lifetime of the tokens it issues
EXPIRING_TTL = 15.0  # seconds the limited token lives: past its 403 view, before its expiry is checked

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright
except ImportError:  # the test extra installs it; need_peer below says so (and fails under SHIPYARD_REQUIRE_PEERS)
    sync_playwright = None  # type: ignore[assignment]


@dataclass
class Mediahub:
    """The demo's platform: its control API (with the management token `up --acl` made) and its gateway."""

    api: str
    gateway: str
    token: str
    project: Path

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"X-Consul-Token": self.token if token is None else token, "Content-Type": "application/json"}
        request = urllib.request.Request(self.api + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def raw(self, path: str) -> bytes:
        request = urllib.request.Request(self.api + path, headers={"X-Consul-Token": self.token})
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())


def _stop(project: Path) -> None:
    """The platform gone at once: the server's process group killed (its gateway workers with it; a graceful stop
    takes seconds and this copy is thrown away), then every instance's shim told to stop its instance."""
    pid_file = project / ".shipyard" / "server.pid"
    pid = int(pid_file.read_text().strip() or 0) if pid_file.is_file() else 0
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)  # `up` starts the server in a session of its own
        except ProcessLookupError:
            pass
    ServerProcess(project / ".shipyard" / "data").stop_instances()


@pytest.fixture(scope="module")
def mediahub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mediahub]:
    # A copy of the example, so the test's databases and server state never mix with a developer's `make demo`.
    project = tmp_path_factory.mktemp("ui") / "mediahub"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".data", ".shipyard", "__pycache__"))
    http_port, gateway_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", f"127.0.0.1:{http_port}", "up", "--acl",
           "--gateway-port", str(gateway_port), "--dns-port", str(free_port()), "--vault-port", str(free_port()),
           str(project)]
    # Not a developer's client settings left by the demo's walk-through (their server, token or CA): `up` here talks
    # to the server it starts.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_HTTP", "CONSUL_HTTP", "SHIPYARD_CACERT",
                                                                      "CONSUL_CACERT"))}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        token = (project / ".shipyard" / "data" / "acl-management-token").read_text().strip()
        yield Mediahub(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gateway_port}", token, project)
    finally:
        _stop(project)


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
    # A live view answers within a second; on a machine as loaded as CI's can be, allow it longer than the default 5 s.
    expect.set_options(timeout=EXPECT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
    expect.set_options(timeout=5_000)  # Playwright's default, for other modules


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the page as it opens, whatever the test scrolled to
    page.screenshot(path=str(SHOTS / f"{name}.png"), caret="initial")  # hiding it injects a style the CSP refuses


def _poll(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


def _user_with_a_broken_upload(gateway: str, sample: bytes) -> User:
    user = User(gateway)
    user.upload(sample[: len(sample) // 2])
    return user


class User:
    """A mediahub user, through the gateway only: signed up, logged in (RS256 JWT), with one asset."""

    def __init__(self, gateway: str) -> None:
        self.http = httpx.Client(base_url=gateway, timeout=30)
        self.email, self.password = f"ui-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery"
        self.http.post("/auth/signup", json={"email": self.email, "password": self.password}).raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {self.log_in()['access_token']}"
        self.asset = self.http.post("/assets", json={"title": "Harbour at dusk"}).raise_for_status().json()["id"]

    def log_in(self) -> dict[str, Any]:
        return self.http.post("/auth/login", json={"email": self.email, "password": self.password}
                              ).raise_for_status().json()

    def upload(self, data: bytes) -> None:
        self.http.put(f"/files/{self.asset}", params={"filename": "harbour.jpg"}, content=data,
                      headers={"Content-Type": "image/jpeg"}).raise_for_status()

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.http.get("/jobs", params={"asset_id": self.asset}).raise_for_status().json())


def test_console_on_the_demo(browser: Browser, mediahub: Mediahub) -> None:
    hub = mediahub
    hub.call("PUT", f"/v1/kv/{TTL_KEY}", b"3600")
    hub.call("POST", "/api/gateway/plugins", {"name": "prometheus"})  # per-route traffic on the gateway page
    # A token that may read mediahub's settings only, for a few seconds: its 403 view now, its expiry later.
    policy = hub.call("PUT", "/v1/acl/policy", {"Name": "settings-reader",
                                                "Rules": 'key_prefix "mediahub/" { policy = "read" }'})
    limited = hub.call("PUT", "/v1/acl/token", {"Description": "settings reader", "Policies": [{"ID": policy["ID"]}],
                                                "ExpirationTTL": f"{EXPIRING_TTL:g}s"})
    # Meanwhile, through the gateway: a user whose upload the transcode worker cannot decode (a JPEG cut short):
    # it fails for good, a dead letter.
    sample = (EXAMPLE / "sample" / "harbour.jpg").read_bytes()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    user_made = pool.submit(_user_with_a_broken_upload, hub.gateway, sample)
    pool.shutdown(wait=False)  # no more work for it; this runs on while the browser logs in

    reader = browser.new_context(viewport={"width": 1280, "height": 800})
    reader_page = reader.new_page()
    reader_watch = Watched(reader_page)
    _log_in(reader_page, hub, limited["SecretID"])
    response = reader_page.goto(hub.api + "/ui/services/search")  # the key is readable, the service is not
    assert response is not None and response.status == 403
    expect(reader_page.locator("h1")).to_contain_text("403")

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    watched = Watched(page)
    _overview(page, hub)
    version = _service_then_rolling(page, hub)
    # The deployment goes on in this tab, followed live; the operator works in another one meanwhile, and comes
    # back to scale the service when it is over.
    other = context.new_page()
    watched_other = Watched(other)
    other.goto(hub.api + "/ui/")
    user = user_made.result(timeout=60)
    _live_config(other, hub, user)
    _rolled_out_then_scaled(page, version)
    _dead_letter_retried(other, hub, user, sample)
    _gateway_and_access(other, hub)
    _third_healthy(page)
    page.close()  # before the log-out in the other tab, which would send its live view to the login
    _phone_overview_with_a_failing_service(other, hub)
    context.close()
    user.http.close()

    # The limited token has expired meanwhile: its next view returns to the login, with why.
    remaining = datetime.fromisoformat(limited["ExpirationTime"]).timestamp() - time.time()
    if remaining > 0:
        reader_page.wait_for_timeout(remaining * 1000 + 100)  # a real expiry: the clock has to pass it
    reader_page.goto(hub.api + "/ui/")
    reader_page.wait_for_url("**/ui/login?why=expired")
    expect(reader_page.locator(".flash.err")).to_contain_text("no longer valid")
    reader.close()

    assert watched.problems + watched_other.problems == []
    assert [p for p in reader_watch.problems if "403" not in p] == []  # the 403 view's own answer is expected
    _forged_writes_are_refused(hub)


def _log_in(page: Page, hub: Mediahub, token: str) -> None:
    page.goto(hub.api + "/")
    page.wait_for_url("**/ui/login")
    page.fill("#token", token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/ui/")


def _overview(page: Page, hub: Mediahub) -> None:
    """Log in with the management token; every mediahub service is healthy; the first view is small."""
    page.goto(hub.api + "/")
    page.wait_for_url("**/ui/login")
    transferred = page.evaluate("performance.getEntriesByType('navigation').concat("
                                "performance.getEntriesByType('resource')).reduce((n, e) => n + e.transferSize, 0)")
    assert 0 < transferred < 200_000, f"the first view (the login) transferred {transferred} bytes"
    page.fill("#token", "not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".flash.err")).to_contain_text("not known")
    page.fill("#token", hub.token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/ui/")
    cookie = next(c for c in page.context.cookies() if c["name"] == "shipyard_ui_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    services = page.locator("table.services")
    for name in (*SERVICES, "transcode"):
        row = services.locator(f"tr[data-service={name}]")
        expect(row.locator(".badge")).to_have_text("passing")
        expect(row).to_contain_text("2/2 passing")
    expect(page.locator("#jobs + .scroll tr", has_text="transcode")).to_contain_text("2/2 running")
    expect(page.locator(".cards")).to_contain_text("0 failing")
    _shot(page, "overview")

    # Keyboard: the first Tab lands on the skip link; the service link is reachable and opens the service.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    services.get_by_role("link", name="search").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/services/search")


def _service_then_rolling(page: Page, hub: Mediahub) -> int:
    """Instances with their checks and real CPU/memory, and logs; then a new version starts rolling out (returned),
    which the page follows live (a marker set on this document survives to the end)."""
    rows = page.locator("table.instances tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#checks-h + .scroll")).to_contain_text("200")
    usage = rows.first.locator(".usage")
    expect(usage).to_have_text(re.compile(r"^(<1|\d+)% · \d+ MiB$"))
    assert int(usage.inner_text().split("·")[1].split()[0]) > 0, "a running Python service has resident memory"
    # Logs: an instance's stderr, followed live; the search filters it.
    expect(page.locator("#live-logs")).to_contain_text("search serving on")
    page.fill("#log-grep", "nobody-said-this")
    page.keyboard.press("Enter")
    expect(page.locator("#live-logs")).to_contain_text("Nothing on stderr matching")
    page.evaluate("window.__same_document = true")

    # A new version, as a user changes a service: its spec with one more env var, through the native API.
    spec = hub.call("GET", "/api/v1/jobs/search")["job"]["spec"]
    spec["env"] = {**spec["env"], "SEARCH_SNIPPET_WORDS": "12"}
    [deployed] = hub.call("POST", "/api/v1/jobs", spec)["deployed"]
    version = int(deployed["job"]["version"])
    expect(page.locator("section.deployment h2")).to_contain_text(f"Deployment v{version}: running")
    return version


def _rolled_out_then_scaled(page: Page, version: int) -> None:
    """Back on the service's tab: the deployment it followed live has ended, every instance on the new version;
    then scaled to 3 (the third instance is watched from here on, see _third_healthy)."""
    deployment = page.locator("section.deployment")
    expect(deployment.locator("h2")).to_contain_text(f"Deployment v{version}: successful", timeout=WAIT_MS)
    expect(deployment).to_contain_text("2/2 healthy")
    rows = page.locator("table.instances tbody tr")
    expect(rows).to_have_count(2, timeout=WAIT_MS)  # the replaced instances are gone
    for i in range(2):
        expect(rows.nth(i).locator("td").nth(5)).to_have_text(str(version))
    _shot(page, "service")
    page.fill("#instances", "3")
    page.get_by_role("button", name="Scale").click()
    expect(page.locator("#flash")).to_contain_text("search: scaling to 3 instances")


def _third_healthy(page: Page) -> None:
    """The third instance has turned healthy on the page, with no reload."""
    rows = page.locator("table.instances tbody tr")
    third = page.locator("table.instances tr", has=page.locator("td:first-child", has_text="2"))
    expect(third.locator(".badge").first).to_have_text("healthy", timeout=WAIT_MS)
    expect(rows).to_have_count(3)
    expect(third.locator(".badge.passing")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("section.deployment")).to_contain_text("successful", timeout=WAIT_MS)
    expect(page.locator("table.instances .badge.healthy")).to_have_count(3)
    assert page.evaluate("window.__same_document") is True


def _live_config(page: Page, hub: Mediahub, user: User) -> None:
    """The auth service's token lifetime, edited here while someone else changes it: the save is a conflict that
    shows their value and overwrites nothing; saving again knowingly replaces it, and the running auth instances
    issue tokens with the new lifetime (seen through the gateway)."""
    page.get_by_role("link", name="Key/value").click()
    page.get_by_role("link", name="mediahub/").click()
    page.get_by_role("link", name="auth/").click()
    page.get_by_role("link", name="token_ttl_seconds").click()
    expect(page.locator("pre.value")).to_have_text("3600")
    expect(page.locator("#kv-value")).to_have_value("3600")  # the editor opens with the current value
    _shot(page, "kv")
    hub.call("PUT", f"/v1/kv/{TTL_KEY}", b"1800")  # someone else, meanwhile
    page.fill("#kv-value", "600")
    page.get_by_role("button", name="Save").click()
    conflict = page.locator("#kv-conflict")
    expect(conflict).to_contain_text("Conflict")
    expect(conflict).to_contain_text("1800")
    assert hub.raw(f"/v1/kv/{TTL_KEY}?raw") == b"1800", "no overwrite"
    expect(page.locator("#kv-value")).to_have_value("600")
    page.get_by_role("button", name="Save anyway").click()
    expect(page.locator("#kv-editor")).to_contain_text(f"Saved {TTL_KEY}")
    assert hub.raw(f"/v1/kv/{TTL_KEY}?raw") == b"600"
    # Both auth instances follow the key: two log-ins in a row (the gateway spreads them over both) get the new
    # lifetime. Spaced out: log-ins are rate-limited to 5 a second per client.
    lifetimes: list[int] = []

    def two_in_a_row() -> bool:
        lifetimes.append(user.log_in()["expires_in"])
        return lifetimes[-2:] == [600, 600]

    _poll("two tokens in a row issued for 600 s", two_in_a_row, timeout=30, interval=0.2)


def _dead_letter_retried(page: Page, hub: Mediahub, user: User, sample: bytes) -> None:
    """The worker dead-lettered the cut-short upload (listed with why); once the user uploads the whole file, a
    retry from the page runs that job again, and it succeeds."""
    page.get_by_role("link", name="Bus").click()
    page.get_by_role("link", name="transcode", exact=True).click()
    dead = page.locator("table.dead tbody tr")
    expect(dead).to_have_count(1, timeout=WAIT_MS)
    expect(dead).to_contain_text("cannot decode")
    _shot(page, "bus")
    [failed] = user.jobs()
    assert failed["status"] == "failed", failed
    user.upload(sample)
    dead.get_by_role("button", name="Retry").click()
    expect(page.locator("#flash")).to_contain_text("transcode: 1 dead letter back in the queue")
    expect(page.locator("table.dead")).to_have_count(0)
    expect(page.locator("tr[data-queue=transcode] td").nth(6)).to_have_text("0")  # dead letters
    done = _poll("the retried job done", lambda: (j := {x["id"]: x for x in user.jobs()}.get(failed["id"])) and
                 j["status"] == "succeeded" and j, timeout=30)
    assert done["attempts"] == 2 and done["result"]["format"] == "JPEG"


def _gateway_and_access(page: Page, hub: Mediahub) -> None:
    """The gateway's routes (mediahub's, with their plugins' consumer) and traffic; tokens and policies."""
    page.get_by_role("link", name="Gateway").click()
    gateway = page.locator("#live-gateway")
    for path in ("/auth/signup", "/assets", "/files", "/search", "/jobs"):
        expect(gateway).to_contain_text(path)
    expect(gateway).to_contain_text("mediahub-users")
    expect(page.locator("table.metrics tbody tr", has_text="auth").first).to_be_visible()  # the log-ins went through
    _shot(page, "gateway")

    page.get_by_role("link", name="Access").click()
    expect(page.locator("table.tokens")).to_contain_text("you")
    expect(page.locator("table.tokens")).not_to_contain_text(hub.token)
    page.fill("#tok-desc", "ci reader")
    page.get_by_label("settings-reader").check()
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#created-token pre").inner_text().strip()
    assert str(uuid.UUID(secret)) == secret
    assert hub.raw(f"/v1/kv/{TTL_KEY}?raw") == b"600"
    assert hub.call("GET", f"/v1/kv/{TTL_KEY}", token=secret)[0]["Key"] == TTL_KEY  # the new token works
    _shot(page, "access")


def _phone_overview_with_a_failing_service(page: Page, hub: Mediahub) -> None:
    """A service that cannot start is listed first, with why; at phone width nothing overflows sideways (wide
    tables scroll inside their own box). Log out ends the session."""
    hub.call("POST", "/api/v1/jobs", {"name": "broken", "cmd": "sh -c 'echo missing DATABASE_URL >&2; exit 3'",
                                      "instances": 1, "resources": {"cpu": 10, "memory": 32}})
    page.set_viewport_size({"width": 375, "height": 740})
    page.get_by_role("link", name="Overview").click()
    attention = page.locator("#attention + .scroll")
    expect(attention.locator("tr", has_text="broken").first).to_contain_text("exit code 3", timeout=WAIT_MS)
    expect(attention).to_contain_text("missing DATABASE_URL")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    _shot(page, "overview-phone")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/ui/login")


def _status(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _forged_writes_are_refused(hub: Mediahub) -> None:
    """The console's form posts need the session's CSRF token, and a foreign Origin is refused before that; the
    key is unchanged by both."""
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"shipyard_ui_token={hub.token}"}
    body = f"key={TTL_KEY}&value=1&cas=0".encode()
    status, text = _status(hub.api + "/ui/kv", body, form)
    assert status == 403 and "form token" in text
    status, text = _status(hub.api + "/ui/kv", body, {**form, "Origin": "http://evil.example",
                                                       "X-Shipyard-CSRF": "anything"})
    assert status == 403 and "cross-origin" in text
    assert hub.raw(f"/v1/kv/{TTL_KEY}?raw") == b"600"
