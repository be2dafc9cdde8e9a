"""`make demo`: runs the mediahub example platform with `shipyard up`, checks its gateway answers, and prints the
gateway URL, the API docs and a copy-paste walk-through (curl through the gateway, the CLI on the control API).

By default the platform is locked as one running off loopback would be: ACLs on with default deny (every service on
its own scoped token, the management token printed once and kept 0600 in the project's .shipyard/data) and TLS on
the control API and the gateway, with a CA made for the demo. `--no-tls`, `--no-acl` (or `--insecure` for both)
give the plain-HTTP platform. It never touches a server it did not start: the client settings of the caller's shell
(CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN... left by an earlier walk-through) are dropped before anything runs.

Runs in the foreground until Ctrl-C (or SIGTERM), then `shipyard down` stops the services and the server it started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
console = Console(highlight=False, soft_wrap=True)
MANAGEMENT_TOKEN_FILE = Path(".shipyard") / "data" / "acl-management-token"  # where `shipyard up --acl` keeps it
DNS_TOKEN_DESCRIPTION = "make demo: the DNS interface's token (builtin/dns)"
# What a shell's earlier walk-through may have exported: the demo's own clients must not follow them elsewhere.
CLIENT_VARIABLES = [f"{prefix}_{name}" for prefix in ("SHIPYARD", "CONSUL") for name in (
    "HTTP_ADDR", "HTTP_TOKEN", "HTTP_TOKEN_FILE", "HTTP_SSL", "HTTP_SSL_VERIFY", "CACERT", "CAPATH", "CLIENT_CERT",
    "CLIENT_KEY")]


@dataclass(frozen=True)
class Demo:
    """This run's addresses and what locks them (None: that protection is off)."""

    project: Path
    http_port: int
    dns_port: int
    gateway: str  # the URL the walk-through uses
    api: str  # the control API the walk-through's CLI uses
    ca_file: Path | None  # TLS: the demo CA
    token_file: Path | None  # ACLs: the management token

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def shipyard(addr: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args])
    if check and done.returncode != 0:
        raise SystemExit(done.returncode)
    return done


def wait_for_routes(gateway: str, timeout: float = 15.0, verify: ssl.SSLContext | bool = True) -> int:
    """The gateway follows the store by watch: its routes to the new services appear a moment after they are
    healthy. A request without a token is refused by the jwt plugin (401) once they have."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{gateway}/assets", timeout=2, verify=verify).status_code
        except httpx.HTTPError:
            status = 0
        if status == 401:
            return status
        time.sleep(0.1)
    return status


def shown(path: Path) -> str:
    """A path as the walk-through prints it: relative when under the shell's directory (shorter), else absolute."""
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def walkthrough(gateway: str, project: Path) -> str:
    """The curl session the README shows, with this run's gateway address and the sample image's path."""
    json_field = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"{}\"])'"
    return f"""\
  GW={gateway}
  # 1. sign up (the first account is the admin), then log in: the token is an RS256 JWT the gateway verifies
  curl -s -X POST $GW/auth/signup -H 'Content-Type: application/json' \\
       -d '{{"email": "ada@example.com", "password": "correct horse battery"}}'
  TOKEN=$(curl -s -X POST $GW/auth/login -H 'Content-Type: application/json' \\
       -d '{{"email": "ada@example.com", "password": "correct horse battery"}}' | {json_field.format("access_token")})
  AUTH="Authorization: Bearer $TOKEN"
  # 2. create an asset
  ASSET=$(curl -s -X POST $GW/assets -H "$AUTH" -H 'Content-Type: application/json' \\
       -d '{{"title": "Harbour at dusk", "description": "Fishing boats coming in", "tags": ["sea", "boats"]}}' \\
       | {json_field.format("id")})
  # 3. upload its file (streamed to disk by the files service); a job is planned for it
  curl -s -T {shown(project / "sample" / "harbour.jpg")} -H "$AUTH" -H 'Content-Type: image/jpeg' \\
       "$GW/files/$ASSET?filename=harbour.jpg"
  # 4. search
  curl -s -H "$AUTH" "$GW/search?q=harbour"
  # 5. wait for its job (checksum, type, size, thumbnail: a second or two), then see what it found
  until curl -s -H "$AUTH" "$GW/jobs?asset_id=$ASSET" | grep -Eq '"(succeeded|failed)"'; do sleep 1; done
  curl -s -H "$AUTH" "$GW/jobs?asset_id=$ASSET"
  curl -s -H "$AUTH" "$GW/assets/$ASSET"
  curl -s -H "$AUTH" -o thumbnail.png "$GW/files/$ASSET/thumbnail"
  curl -s -H "$AUTH" -o harbour-copy.jpg "$GW/files/$ASSET\""""


def client_exports(demo: Demo) -> str:
    """What the walk-through's shell needs to reach this run's platform: where the control API is, the CA that
    signed its certificates (for the CLI, Consul's tools and curl), the management token (ACLs deny the rest)."""
    lines = [f"  export CONSUL_HTTP_ADDR={demo.api}"
             + (f" CONSUL_CACERT={shown(demo.ca_file)}" if demo.ca_file else "")
             + "   # the CLI (and Consul's own tools) find the control API" + (", trust the demo CA" if demo.ca_file
                                                                              else "")]
    if demo.ca_file:
        lines.append("  export CURL_CA_BUNDLE=$CONSUL_CACERT   # curl trusts the demo CA too")
    if demo.token_file:
        lines.append(f"  export CONSUL_HTTP_TOKEN=$(cat {shown(demo.token_file)})   # ACLs (default deny): the "
                     "management token")
    return "\n".join(lines)


def platform_commands(demo: Demo) -> str:
    """The CLI and Consul's interfaces on the same platform."""
    cli = shown(Path(sys.executable).parent / "shipyard") if (Path(sys.executable).parent / "shipyard").exists() \
        else "shipyard"
    token = ' -H "X-Consul-Token: $CONSUL_HTTP_TOKEN"' if demo.token_file else ""
    return f"""\
  {cli} ps                                        # instances, ports, restarts, last exit
  {cli} logs transcode                            # the worker's output
  {cli} kv put mediahub/files/max_upload_mb 5     # live config: uploads over 5 MB now get 413
  curl -s{token} "$CONSUL_HTTP_ADDR/v1/health/service/assets?passing"   # Consul's health API
  dig @127.0.0.1 -p {demo.dns_port} assets.service.consul SRV   # Consul's DNS interface
  # kill -9 a PID from ps: the other instance keeps serving, and the killed one comes back"""


def setup_tls(project: Path, https_port: int, gateway_tls_port: int) -> Path:
    """A CA and a server certificate for this demo (made once, in the project's .shipyard/tls), handed to the
    server `shipyard up` starts through its environment: HTTPS on the control API and TLS on the gateway."""
    from shipyard.tls import CertRequest, create_ca_files, create_cert_files

    folder = project / ".shipyard" / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "consul-agent-ca.pem").exists():
        create_ca_files(folder)
    cert, key = folder / "dc1-server-consul-0.pem", folder / "dc1-server-consul-0-key.pem"
    if not cert.exists():
        create_cert_files(folder, CertRequest(kind="server"))
    os.environ.update({
        "SHIPYARD_TLS_CERT": str(cert), "SHIPYARD_TLS_KEY": str(key),
        "SHIPYARD_TLS_CA": str(folder / "consul-agent-ca.pem"),
        "SHIPYARD_HTTPS_PORT": str(https_port), "SHIPYARD_GATEWAY_TLS_PORT": str(gateway_tls_port),
        "SHIPYARD_GATEWAY_TLS_CERT": str(cert), "SHIPYARD_GATEWAY_TLS_KEY": str(key),
    })
    return folder / "consul-agent-ca.pem"


def give_dns_a_token(addr: str, token_file: Path) -> None:
    """Under default deny the DNS interface names nothing until the agent has a token to answer with: as Consul's
    guides do, a token of the builtin/dns templated policy set as the agent's `dns` token (not the default token,
    which would open the HTTP API's catalog to anonymous callers too). Tokens of earlier runs are replaced."""
    headers = {"X-Consul-Token": token_file.read_text().strip()}
    with httpx.Client(base_url=f"http://{addr}", headers=headers, timeout=10) as api:
        for old in api.get("/v1/acl/tokens").raise_for_status().json():
            if old.get("Description") == DNS_TOKEN_DESCRIPTION:
                api.delete(f"/v1/acl/token/{old['AccessorID']}").raise_for_status()
        made = api.put("/v1/acl/token", json={"Description": DNS_TOKEN_DESCRIPTION,
                                              "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]})
        api.put("/v1/agent/token/dns", json={"Token": made.raise_for_status().json()["SecretID"]}).raise_for_status()


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=HERE / "mediahub", help="The example to run.")
    parser.add_argument("--http-port", type=int, default=8500, help="Control API, plain HTTP (loopback).")
    parser.add_argument("--https-port", type=int, default=8501, help="Control API over HTTPS.")
    parser.add_argument("--dns-port", type=int, default=8600)
    parser.add_argument("--gateway-port", type=int, default=8080, help="Gateway, plain HTTP.")
    parser.add_argument("--gateway-tls-port", type=int, default=8443, help="Gateway over TLS.")
    parser.add_argument("--vault-port", type=int, default=8200, help="The secrets engine (dev mode).")
    parser.add_argument("--exit-when-healthy", action="store_true", help="Show it working, then stop.")
    parser.add_argument("--no-tls", dest="tls", action="store_false",
                        help="No HTTPS on the control API and no TLS on the gateway (plain HTTP only).")
    parser.add_argument("--no-acl", dest="acl", action="store_false", help="No ACLs: anyone on loopback may do all.")
    parser.add_argument("--insecure", action="store_true", help="Both --no-tls and --no-acl.")
    # The former opt-ins, now the default: accepted so that an older `DEMO_ARGS=--tls` still runs.
    parser.add_argument("--tls", dest="tls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--acl", dest="acl", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.insecure:
        args.tls = args.acl = False
    return args


def check_ports(args: argparse.Namespace) -> None:
    ports = [(args.http_port, "--http-port"), (args.dns_port, "--dns-port"), (args.gateway_port, "--gateway-port"),
             (args.vault_port, "--vault-port")]
    if args.tls:
        ports += [(args.https_port, "--https-port"), (args.gateway_tls_port, "--gateway-tls-port")]
    for port, option in ports:
        if port_taken(port):
            raise SystemExit(f"error: port {port} is in use (another server?); pass {option} N "
                             f"(make demo DEMO_ARGS='{option} N')")


def prepare(args: argparse.Namespace) -> Demo:
    """The environment the server `shipyard up` starts inherits (it has no flags of its own for these), and this
    run's addresses."""
    for name in CLIENT_VARIABLES:
        os.environ.pop(name, None)
    os.environ["SHIPYARD_DNS_PORT"] = str(args.dns_port)
    os.environ["SHIPYARD_GATEWAY_PORT"] = str(args.gateway_port)
    project = args.project.resolve()
    ca_file = setup_tls(project, args.https_port, args.gateway_tls_port) if args.tls else None
    return Demo(
        project=project, http_port=args.http_port, dns_port=args.dns_port,
        gateway=f"https://localhost:{args.gateway_tls_port}" if ca_file else f"http://127.0.0.1:{args.gateway_port}",
        api=f"https://127.0.0.1:{args.https_port}" if ca_file else f"127.0.0.1:{args.http_port}",
        ca_file=ca_file, token_file=project / MANAGEMENT_TOKEN_FILE if args.acl else None)


def announce(demo: Demo) -> None:
    if demo.ca_file is not None:
        leader = httpx.get(f"{demo.api}/v1/status/leader", verify=demo.verify, timeout=5).status_code
        console.print(f"GET {demo.api}/v1/status/leader with the demo CA -> {leader} (TLS on the control API)")
    status = wait_for_routes(demo.gateway, verify=demo.verify)
    console.print(f"GET {demo.gateway}/assets without a token -> {status}"
                  + (" (the gateway's jwt plugin at work)" if status == 401 else " (routes not ready?)"))
    locks = " and ".join(["ACLs on (default deny)" if demo.token_file else "no ACLs",
                          f"TLS (the demo CA: {demo.ca_file})" if demo.ca_file else "plain HTTP"])
    control, gw = demo.api if "://" in demo.api else f"http://{demo.api}", demo.gateway
    console.print(f"""
Shipyard is running mediahub from {demo.project}, with {locks}:
  services auth, assets, files, search, jobs (2 instances each) and the transcode worker (2), behind the gateway.

  Gateway:   [bold]{gw}[/bold]
  API docs:  [bold]{gw}/docs[/bold]   (every service's operations, merged; JSON at {gw}/docs/openapi.json)
  Control:   {control}   (Consul /v1, Marathon /v2, native /api, the web console /ui/)

Try the walk-through (copy-paste into a shell in {Path.cwd()}):""")
    # Plain print: the commands must reach the terminal exactly as written (no markup, no wrapping).
    print(f"{client_exports(demo)}\n{walkthrough(demo.gateway, demo.project)}\n\nAnd the platform:\n"
          f"{platform_commands(demo)}", flush=True)
    console.print("Press Ctrl-C to stop.")


def main() -> None:
    args = options()
    check_ports(args)
    demo = prepare(args)
    addr = f"127.0.0.1:{args.http_port}"  # `up` and `down` use the plain loopback port, as the services do
    try:
        shipyard(addr, "up", "--vault-port", str(args.vault_port), *(["--acl"] if args.acl else []),
                 str(demo.project))
        if demo.token_file is not None:
            give_dns_a_token(addr, demo.token_file)
        announce(demo)
        if not args.exit_when_healthy:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping…")
        pid_file = demo.project / ".shipyard" / "server.pid"
        server_pid = int(pid_file.read_text().strip() or 0) if pid_file.is_file() else 0
        shipyard(addr, "down", str(demo.project), check=False)
        wait_for_exit(server_pid)


def wait_for_exit(pid: int, timeout: float = 15.0) -> None:
    """`down` signals the server; waiting for it to be gone lets a next `make demo` start at once on its data dir."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same way on SIGTERM as on Ctrl-C
    main()
