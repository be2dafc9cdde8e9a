#!/usr/bin/env bash
# Installs the Debian peers that tests and benchmarks talk to (etcd, nginx, wrk), only where missing.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)  # -base: no system service on port 53
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # scrapes an agent's gateway metrics in a test
[ -x /usr/bin/chromium ] || need+=(chromium)  # the web console's browser tests (Playwright drives it)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing peers (${need[*]}); not root, so not installing them: tests that need them will skip" >&2
  exit 0
fi
echo "installing peers: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages start their own daemons; the tests start private ones on free ports.
for svc in etcd nginx prometheus; do
  (service "$svc" stop || true) >/dev/null 2>&1
done
