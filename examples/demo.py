"""`make demo`: runs the mediahub example platform with `shipyard up`, checks its gateway answers, and prints the
gateway URL, the API docs and a copy-paste curl walk-through.

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
from pathlib import Path

import httpx
from rich.console import Console

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
console = Console(highlight=False, soft_wrap=True)


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


def walkthrough(gateway: str, project: Path) -> str:
    """The curl session the README shows, with this run's gateway address and the sample image's path."""
    sample = project / "sample" / "harbour.jpg"
    try:
        sample_path = os.path.relpath(sample)
    except ValueError:
        sample_path = str(sample)
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
  curl -s -T {shlex.quote(sample_path)} -H "$AUTH" -H 'Content-Type: image/jpeg' "$GW/files/$ASSET?filename=harbour.jpg"
  # 4. search
  curl -s -H "$AUTH" "$GW/search?q=harbour"
  # 5. watch the job finish (checksum, type, size, thumbnail), then see what it found
  curl -s -H "$AUTH" "$GW/jobs?asset_id=$ASSET"
  curl -s -H "$AUTH" "$GW/assets/$ASSET"
  curl -s -H "$AUTH" -o thumbnail.png "$GW/files/$ASSET/thumbnail"
  curl -s -H "$AUTH" -o harbour-copy.jpg "$GW/files/$ASSET\""""


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", type=Path, default=HERE / "mediahub", help="The example to run.")
    parser.add_argument("--http-port", type=int, default=8500)
    parser.add_argument("--dns-port", type=int, default=8600)
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument("--exit-when-healthy", action="store_true", help="Show it working, then stop.")
    parser.add_argument("--tls", action="store_true",
                        help="HTTPS on the control API (--https-port) and TLS on the gateway (--gateway-tls-port), "
                             "with a CA made for the demo (plain HTTP stays on loopback for the CLI and services).")
    parser.add_argument("--acl", action="store_true",
                        help="ACLs on with default deny: every service uses its own scoped token; the management "
                             "token is printed once and kept in the project's .shipyard/data.")
    parser.add_argument("--https-port", type=int, default=8501)
    parser.add_argument("--gateway-tls-port", type=int, default=8443)
    args = parser.parse_args()
    ports = [(args.http_port, "--http-port"), (args.dns_port, "--dns-port"), (args.gateway_port, "--gateway-port")]
    if args.tls:
        ports += [(args.https_port, "--https-port"), (args.gateway_tls_port, "--gateway-tls-port")]
    for port, option in ports:
        if port_taken(port):
            raise SystemExit(f"error: port {port} is in use (another server?); pass {option} N "
                             f"(make demo DEMO_ARGS='{option} N')")
    project = args.project.resolve()
    addr = f"127.0.0.1:{args.http_port}"
    api, gateway = f"http://{addr}", f"http://127.0.0.1:{args.gateway_port}"
    # A server `shipyard up` starts inherits these (it has no flags of its own for them).
    os.environ["SHIPYARD_DNS_PORT"] = str(args.dns_port)
    os.environ["SHIPYARD_GATEWAY_PORT"] = str(args.gateway_port)
    shipyard_cmd = ".venv/bin/shipyard" + ("" if args.http_port == 8500 else f" --http-addr {addr}")
    ca_file = setup_tls(project, args.https_port, args.gateway_tls_port) if args.tls else None
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    if ca_file is not None:
        gateway = f"https://localhost:{args.gateway_tls_port}"
    try:
        shipyard(addr, "up", *(["--acl"] if args.acl else []), str(project))
        if ca_file is not None:
            https_api = f"https://127.0.0.1:{args.https_port}"
            leader = httpx.get(f"{https_api}/v1/status/leader", verify=verify, timeout=5).status_code
            console.print(f"GET {https_api}/v1/status/leader with the demo CA -> {leader} (TLS on the control API)")
            api = f"{https_api} (CA: {ca_file}; plain {api} on loopback)"
        status = wait_for_routes(gateway, verify=verify)
        console.print(f"GET {gateway}/assets without a token -> {status}"
                      + (" (the gateway's jwt plugin at work)" if status == 401 else " (routes not ready?)"))
        console.print(f"""
Shipyard is running mediahub from {project}:
  services auth, assets, files, search, jobs (2 instances each) and the transcode worker (2), behind the gateway.

  Gateway:   [bold]{gateway}[/bold]
  API docs:  [bold]{gateway}/docs[/bold]   (every service's operations, merged; JSON at {gateway}/docs/openapi.json)
  Control:   {api}   (Consul /v1, Marathon /v2, native /api; there is no web UI yet)

Try the walk-through (copy-paste into a shell in {Path.cwd()}):
{f"  export CURL_CA_BUNDLE={ca_file}   # curl trusts the demo CA{chr(10)}" if ca_file else ""}\
{walkthrough(gateway, project)}

And the platform:
{f"  export SHIPYARD_HTTP_TOKEN=$(cat {project}/.shipyard/data/acl-management-token)   # ACLs: default deny{chr(10)}"
 if args.acl else ""}\
  {shipyard_cmd} ps
  {shipyard_cmd} logs transcode
  {shipyard_cmd} kv put mediahub/files/max_upload_mb 5       # live config: uploads over 5 MB now get 413
  kill -9 <a PID from ps>                                    # the other instance keeps serving; it comes back
Press Ctrl-C to stop.""")
        if not args.exit_when_healthy:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping…")
        pid_file = project / ".shipyard" / "server.pid"
        server_pid = int(pid_file.read_text().strip() or 0) if pid_file.is_file() else 0
        shipyard(addr, "down", str(project), check=False)
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
