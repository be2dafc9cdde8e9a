#!/usr/bin/env bash
# A real Shipyard cluster on one machine, for trying failover: three "hosts" (network namespaces on a private
# bridge), each running one etcd member (a 3-member etcd cluster) and one `shipyard server`; RabbitMQ on host 1;
# and two agents-only hosts (4 and 5) running `shipyard agent` against the three servers.
#
#   sudo scripts/cluster.sh up         # create the namespaces, start etcd x3, RabbitMQ, servers x3, agents x2
#   sudo scripts/cluster.sh status     # who leads, the members, per host
#   sudo scripts/cluster.sh kill N     # kill -9 the server on host N (1-3), to watch another take over
#   sudo scripts/cluster.sh cut N      # take host N's link down (an agent host 4-5: its instances move away)
#   sudo scripts/cluster.sh restore N  # bring it back (the agent stops what was replaced meanwhile)
#   sudo scripts/cluster.sh down       # stop everything and delete the namespaces
#
# It touches nothing of the machine's own network: the bridge lives in its own namespace (shipyard-lab-hub) and
# the 10.77.0.0/24 addresses exist only inside the namespaces it creates. Reach a host with
#   sudo ip netns exec shipyard-lab-h1 curl http://10.77.0.1:8500/v1/status/leader
# State and logs: $SHIPYARD_LAB_DIR (default /tmp/shipyard-lab).
set -euo pipefail

PREFIX=shipyard-lab
HUB=$PREFIX-hub
HOSTS=(1 2 3)
AGENT_HOSTS=(4 5)
NET=10.77.0
DIR=${SHIPYARD_LAB_DIR:-/tmp/shipyard-lab}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHIPYARD=${SHIPYARD_BIN:-$ROOT/.venv/bin/shipyard}
LEADER_TTL=${SHIPYARD_LAB_LEADER_TTL:-3}

die() { echo "cluster.sh: $*" >&2; exit 1; }
ns() { echo "$PREFIX-h$1"; }
addr() { echo "$NET.$1"; }
in_ns() { local host=$1; shift; ip netns exec "$(ns "$host")" "$@"; }

need() {
  [ "$(id -u)" = 0 ] || die "run as root (network namespaces need it): sudo $0 $*"
  command -v ip >/dev/null || die "ip (iproute2) is missing: apt-get install -y iproute2"
  command -v etcd >/dev/null || die "etcd is missing: apt-get install -y etcd-server"
  command -v curl >/dev/null || die "curl is missing: apt-get install -y curl"
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "RabbitMQ is missing: apt-get install -y rabbitmq-server"
  [ -x "$SHIPYARD" ] || die "no shipyard at $SHIPYARD (make install, or set SHIPYARD_BIN)"
}

# Starts a command in a host's namespace, in its own session (so `down` stops its children too), logging to a
# file; records its pid.
spawn() {
  local host=$1 name=$2; shift 2
  ip netns exec "$(ns "$host")" setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

wait_http() {  # host url what
  local host=$1 url=$2 what=$3
  for _ in $(seq 1 150); do
    if in_ns "$host" curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up (see $DIR/*.log)"
}

wait_tcp() {  # host address port what (the agent's logs port answers only servers: a connection is enough)
  for _ in $(seq 1 300); do
    if in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  die "$4 did not come up (see $DIR/*.log)"
}

network_up() {
  ip netns add "$HUB"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  ip -n "$HUB" link set lo up
  for h in "${HOSTS[@]}" "${AGENT_HOSTS[@]}"; do
    ip netns add "$(ns "$h")"
    # One veth per host: eth0 inside the host, its peer on the hub's bridge.
    ip link add "sylab$h" type veth peer name "sylab${h}p"
    ip link set "sylab$h" netns "$(ns "$h")"
    ip link set "sylab${h}p" netns "$HUB"
    ip -n "$HUB" link set "sylab${h}p" master br0 up
    ip -n "$(ns "$h")" link set "sylab$h" name eth0
    ip -n "$(ns "$h")" addr add "$(addr "$h")/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" link set lo up
  done
}

etcd_up() {
  local cluster=""
  for h in "${HOSTS[@]}"; do cluster+="${cluster:+,}etcd-$h=http://$(addr "$h"):2380"; done
  for h in "${HOSTS[@]}"; do
    spawn "$h" "etcd-$h" etcd --name "etcd-$h" --data-dir "$DIR/etcd-$h" \
      --listen-client-urls "http://$(addr "$h"):2379" --advertise-client-urls "http://$(addr "$h"):2379" \
      --listen-peer-urls "http://$(addr "$h"):2380" --initial-advertise-peer-urls "http://$(addr "$h"):2380" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token shipyard-lab
  done
  for h in "${HOSTS[@]}"; do wait_http "$h" "http://$(addr "$h"):2379/health" "etcd member $h"; done
}

rabbitmq_up() {
  local base=$DIR/rabbitmq
  mkdir -p "$base"
  # guest may connect from other hosts of this private lab (RabbitMQ allows it only from loopback by default).
  printf 'loopback_users = none\nlisteners.tcp.default = %s:5672\n' "$(addr 1)" >"$base/rabbitmq.conf"
  echo '[].' >"$base/enabled_plugins"
  spawn 1 rabbitmq env HOME="$base" RABBITMQ_NODENAME=shipyard-lab@localhost \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" RABBITMQ_DIST_PORT=25673 \
    /usr/lib/rabbitmq/bin/rabbitmq-server
  for _ in $(seq 1 300); do
    if in_ns 1 bash -c "exec 3<>/dev/tcp/$(addr 1)/5672" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  die "RabbitMQ did not come up (see $DIR/rabbitmq.log)"
}

server_up() {
  local h=$1 members
  # Its own host's etcd member first, then the others: a server outlives the loss of its local member.
  members="$(addr "$h"):2379"
  for o in "${HOSTS[@]}"; do [ "$o" = "$h" ] || members+=",$(addr "$o"):2379"; done
  # --insecure-bind: a private lab network without ACLs or TLS; never do this on a real network.
  spawn "$h" "server-$h" "$SHIPYARD" server --bind "$(addr "$h")" --insecure-bind --node "server-$h" \
    --data-dir "$DIR/server-$h" --store "etcd://$members/shipyard" \
    --bus "amqp://guest:guest@$(addr 1):5672/" --leader-ttl "$LEADER_TTL" --gateway-workers 1 --vault-port 0
}

agent_up() {
  local h=$1 servers=()
  for o in "${HOSTS[@]}"; do servers+=(--server "http://$(addr "$o"):8500"); done
  spawn "$h" "agent-$h" "$SHIPYARD" agent "${servers[@]}" --node "agent-$h" --advertise "$(addr "$h")" \
    --meta "host=h$h" --data-dir "$DIR/agent-$h"
}

up() {
  need up
  [ -e "/run/netns/$HUB" ] && die "a lab is already up (scripts/cluster.sh down first)"
  mkdir -p "$DIR"
  network_up
  etcd_up
  rabbitmq_up
  for h in "${HOSTS[@]}"; do server_up "$h"; done
  for h in "${HOSTS[@]}"; do wait_http "$h" "http://$(addr "$h"):8500/v1/status/leader" "server $h"; done
  for h in "${AGENT_HOSTS[@]}"; do agent_up "$h"; done
  for h in "${AGENT_HOSTS[@]}"; do wait_tcp "$h" "$(addr "$h")" 8510 "agent $h"; done
  status
}

status() {
  for h in "${HOSTS[@]}"; do
    local leader
    leader=$(in_ns "$h" curl -fsS --max-time 2 "http://$(addr "$h"):8500/v1/status/leader" 2>/dev/null || echo "down")
    echo "host $h ($(addr "$h")): server-$h says the leader is $leader"
  done
  for h in "${HOSTS[@]}"; do
    if in_ns "$h" "$SHIPYARD" --http-addr "$(addr "$h"):8500" members 2>/dev/null; then return 0; fi
  done
}

link() {  # host up|down
  local h=${1:?which host: 1-5}
  [ -e "/run/netns/$(ns "$h")" ] || die "no host $h"
  ip -n "$(ns "$h")" link set eth0 "$2"
  echo "host $h's link is $2"
}

kill_server() {
  local h=${1:?which host: 1, 2 or 3}
  [ -f "$DIR/server-$h.pid" ] || die "no server on host $h"
  kill -9 -- "-$(cat "$DIR/server-$h.pid")" 2>/dev/null || true
  echo "killed server-$h (kill -9); the others elect a new leader within about ${LEADER_TTL}s"
}

down() {
  [ "$(id -u)" = 0 ] || die "run as root: sudo $0 down"
  for pidfile in "$DIR"/agent-*.pid "$DIR"/server-*.pid "$DIR"/rabbitmq.pid "$DIR"/etcd-*.pid; do
    [ -f "$pidfile" ] || continue
    kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 2
  for pidfile in "$DIR"/*.pid; do
    [ -f "$pidfile" ] || continue
    kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # Whatever still runs inside the lab's namespaces (epmd, instances' shims) goes with them.
  for h in "${HOSTS[@]}" "${AGENT_HOSTS[@]}"; do
    if [ -e "/run/netns/$(ns "$h")" ]; then
      for pid in $(ip netns pids "$(ns "$h")"); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$(ns "$h")"
    fi
  done
  [ -e "/run/netns/$HUB" ] && ip netns del "$HUB"
  echo "lab down (state and logs kept in $DIR; rm -rf it to start afresh)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kill) kill_server "${2:-}" ;;
  cut) link "${2:-}" down ;;
  restore) link "${2:-}" up ;;
  *) die "usage: $0 up|status|kill N|cut N|restore N|down" ;;
esac
