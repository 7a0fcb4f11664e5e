#!/usr/bin/env bash
# The whole Engram stack on one machine, no cluster: redis-server (AOF on, data under ./.run/redis),
# REPLICAS chat service replicas, and HAProxy round-robin in front of them (no session affinity).
# Ctrl-C (or SIGTERM) stops everything; the next run finds the conversations of this one. Started in the
# background by a non-interactive shell, it inherits SIGINT ignored, which bash cannot trap: stop it
# with SIGTERM there.
#
#   REPLICAS=3 scripts/run-local.sh          (what `make run` does)
#
# Environment (all optional):
#   REPLICAS=3               service replicas
#   PORT=8080                the load balancer's port: the page is http://127.0.0.1:$PORT/
#   BIND=127.0.0.1           address the load balancer listens on
#   REPLICA_BASE_PORT=8101   replica i listens on REPLICA_BASE_PORT+i-1 (its /metrics is there)
#   REDIS_PORT=6390          the local redis-server (in sentinel mode: the first primary)
#   REDIS_MODE=standalone    standalone: one redis-server; sentinel: a primary and 2 replicas (REDIS_PORT+1, +2)
#                            watched by 3 redis-sentinel (SENTINEL_BASE_PORT..+2): kill the primary, the
#                            replicas keep answering after a failover of about 2 s (docs/design.md);
#                            cluster: a Redis Cluster of 3 primaries + 3 replicas (REDIS_PORT..REDIS_PORT+5, made
#                            by redis-cli --cluster create, data in RUN_DIR/cluster): kill a primary, its replica
#                            takes over its slots. Sentinel and cluster mode commit with ENGRAM_COMMIT_DURABILITY=
#                            replicated unless it is set
#   SENTINEL_BASE_PORT=26390 sentinel mode: the Sentinels' ports
#   CLUSTER_BUS_BASE_PORT    cluster mode: node n's cluster bus port is CLUSTER_BUS_BASE_PORT+n (default
#                            REDIS_PORT+10000, Redis' own rule)
#   RUN_DIR=.run             data, logs, rendered configs
#   WORKERS=1                uvicorn workers per replica
#   STOP_GRACE=5             seconds each process gets after SIGTERM on Ctrl-C before it is SIGKILLed
#   LB_AFFINITY=none         none: round-robin per request; session: HAProxy hashes the X-Session-Id header
#                            so a conversation stays on one replica (for the benchmark's comparison only)
#   ENGRAM_AUTH=required     default: API keys checked; a tenant "demo" is created (its key kept in
#                            RUN_DIR/demo-api-key, mode 0600) and the page URL printed carries it.
#                            ENGRAM_AUTH=disabled serves everyone as tenant "default". Any ENGRAM_* is passed on.
set -euo pipefail

started_at="$EPOCHREALTIME"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

REPLICAS="${REPLICAS:-3}"
PORT="${PORT:-8080}"
BIND="${BIND:-127.0.0.1}"
REPLICA_BASE_PORT="${REPLICA_BASE_PORT:-8101}"
REDIS_PORT="${REDIS_PORT:-6390}"
REDIS_MODE="${REDIS_MODE:-standalone}"
SENTINEL_BASE_PORT="${SENTINEL_BASE_PORT:-26390}"
RUN_DIR="${RUN_DIR:-.run}"
WORKERS="${WORKERS:-1}"
LB_AFFINITY="${LB_AFFINITY:-none}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
export ENGRAM_AUTH="${ENGRAM_AUTH:-required}"

say() { printf '[run-local] %s\n' "$*"; }
die() { printf '[run-local] error: %s\n' "$*" >&2; exit 1; }

[[ "$REPLICAS" =~ ^[1-9][0-9]*$ ]] || die "REPLICAS must be a positive number, got '$REPLICAS'"
case "$REDIS_MODE" in
    standalone) redis_ports=("$REDIS_PORT") sentinel_ports=() bus_ports=() ;;
    sentinel) redis_ports=("$REDIS_PORT" $((REDIS_PORT + 1)) $((REDIS_PORT + 2)))
        sentinel_ports=("$SENTINEL_BASE_PORT" $((SENTINEL_BASE_PORT + 1)) $((SENTINEL_BASE_PORT + 2))) bus_ports=() ;;
    cluster)
        CLUSTER_BUS_BASE_PORT="${CLUSTER_BUS_BASE_PORT:-$((REDIS_PORT + 10000))}"
        [[ "$CLUSTER_BUS_BASE_PORT" =~ ^[1-9][0-9]*$ ]] && ((CLUSTER_BUS_BASE_PORT + 5 <= 65535)) \
            || die "CLUSTER_BUS_BASE_PORT must be a port number up to 65530, got '$CLUSTER_BUS_BASE_PORT'"
        redis_ports=() sentinel_ports=() bus_ports=()
        for ((n = 0; n < 6; n++)); do redis_ports+=($((REDIS_PORT + n))) bus_ports+=($((CLUSTER_BUS_BASE_PORT + n))); done ;;
    *) die "REDIS_MODE must be standalone, sentinel or cluster, got '$REDIS_MODE'" ;;
esac
case "$LB_AFFINITY" in
    none) balance="balance roundrobin" lb_mode="round-robin per request, no affinity" ;;
    session) balance="balance hdr(X-Session-Id)" lb_mode="sticky per session: hash of the X-Session-Id header" ;;
    *) die "LB_AFFINITY must be none or session, got '$LB_AFFINITY'" ;;
esac

# --- what is missing gets installed -------------------------------------------------------------------
find_bin() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }
missing=()
[[ -n "$(find_bin redis-server)" ]] || missing+=(redis-server)
[[ -n "$(find_bin haproxy)" ]] || missing+=(haproxy)
[[ "$REDIS_MODE" != sentinel || -n "$(find_bin redis-sentinel)" ]] || missing+=(redis-sentinel)
[[ "$REDIS_MODE" != cluster || -n "$(find_bin redis-cli)" ]] || missing+=(redis-tools)
if ((${#missing[@]})); then
    say "installing ${missing[*]} with apt-get"
    sudo=""
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root or sudo to install ${missing[*]}"
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
REDIS_SERVER="$(find_bin redis-server)"
HAPROXY="$(find_bin haproxy)"
[[ -n "$REDIS_SERVER" && -n "$HAPROXY" ]] || die "redis-server or haproxy is still missing"

if [[ ! -x "$PYTHON" ]]; then
    uv="$("$REPO/scripts/ensure-uv.sh")" || die "no $PYTHON and no uv to create it (see above)"
    say "creating the virtual environment with uv sync"
    "$uv" sync --frozen --quiet --compile-bytecode
fi

# --- ports must be free ---------------------------------------------------------------------------------
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports=("$PORT" "${redis_ports[@]}" "${sentinel_ports[@]}" "${bus_ports[@]}")
for ((i = 0; i < REPLICAS; i++)); do ports+=($((REPLICA_BASE_PORT + i))); done
for port in "${ports[@]}"; do
    port_busy "$port" && die "port $port is in use (another 'make run'?); choose others with PORT=, REPLICA_BASE_PORT=, REDIS_PORT=, SENTINEL_BASE_PORT=, CLUSTER_BUS_BASE_PORT="
done

data_dir=redis
[[ "$REDIS_MODE" == cluster ]] && data_dir=cluster
mkdir -p "$RUN_DIR/$data_dir" "$RUN_DIR/logs" "$RUN_DIR/metrics"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"

# --- stop everything on Ctrl-C or SIGTERM, in bounded time ------------------------------------------------
# The load balancer and replicas get SIGTERM first (uvicorn finishes in-flight turns), then Redis, so no
# commit is cut off by its store going away (a terminal's Ctrl-C also reaches every child at once: that
# order holds for a signal sent to this script alone, as `kill` or a supervisor sends it). Whatever has not exited after STOP_GRACE seconds is
# SIGKILLed and named: a stuck replica or a keep-alive client cannot hold Ctrl-C hostage.
STOP_GRACE="${STOP_GRACE:-5}"
[[ "$STOP_GRACE" =~ ^[0-9]+$ ]] || die "STOP_GRACE must be a whole number of seconds, got '$STOP_GRACE'"
pids=()
names=()
alive() { kill -0 "$1" 2>/dev/null; }
stop_group() {  # stop_group INDEX...: TERM them, wait up to STOP_GRACE s, KILL (and name) what is left
    local index deadline=$((SECONDS + STOP_GRACE)) left
    for index in "$@"; do kill -TERM "${pids[$index]}" 2>/dev/null || true; done
    while :; do
        left=()
        for index in "$@"; do alive "${pids[$index]}" && left+=("$index"); done
        ((${#left[@]} == 0)) && return 0
        ((SECONDS < deadline)) || break
        sleep 0.1
    done
    for index in "${left[@]}"; do
        say "${names[$index]} (pid ${pids[$index]}) did not stop within ${STOP_GRACE}s of SIGTERM: killing it"
        # a replica's uvicorn workers are its children: take them with it
        pkill -KILL -P "${pids[$index]}" 2>/dev/null || true
        kill -KILL "${pids[$index]}" 2>/dev/null || true
    done
}
cleanup() {
    trap - INT TERM EXIT
    local index front=() back=()
    for index in "${!pids[@]}"; do
        if [[ "${names[$index]}" == redis ]]; then back+=("$index"); else front+=("$index"); fi
    done
    say "stopping ${#pids[@]} processes"
    ((${#front[@]} == 0)) || stop_group "${front[@]}"
    ((${#back[@]} == 0)) || stop_group "${back[@]}"
    wait 2>/dev/null || true
    say "stopped; conversations are kept in $RUN_DIR/$data_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME LOGFILE COMMAND...
    local name="$1" log="$2"
    shift 2
    "$@" >>"$log" 2>&1 &
    pids+=($!)
    names+=("$name")
}

wait_until() {  # wait_until WHAT PID SECONDS COMMAND...: until COMMAND succeeds, or PID exits
    local what="$1" pid="$2" seconds="$3" deadline=$((SECONDS + $3))
    shift 3
    until "$@" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || die "$what exited; see $RUN_DIR/logs/"
        ((SECONDS < deadline)) || die "$what did not come up within ${seconds}s (logs in $RUN_DIR/logs)"
        sleep 0.1
    done
}

redis_ping() ( exec 3<>"/dev/tcp/127.0.0.1/${1:-$REDIS_PORT}" && printf 'PING\r\n' >&3 && read -r -t 1 reply <&3 && [[ "$reply" == +PONG* ]] )
# sentinel_ready PORT: the Sentinel knows the primary, 2 replicas and 2 other Sentinels
sentinel_ready() (
    exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'SENTINEL MASTER engram\r\n' >&3 || exit 1
    fields=() line=""
    while read -r -t 1 line <&3; do
        line="${line%$'\r'}"; fields+=("$line")
        [[ "$line" == failover-timeout ]] && break
    done
    for ((j = 0; j < ${#fields[@]}; j++)); do
        case "${fields[j]}" in num-slaves) slaves="${fields[j + 2]}" ;; num-other-sentinels) others="${fields[j + 2]}" ;; esac
    done
    [[ "${slaves:-0}" -ge 2 && "${others:-0}" -ge 2 ]]
)
http_ok() (  # http_ok PORT PATH: a 200 from a plain HTTP/1.0 GET
    exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3 \
        && read -r -t 2 status <&3 && [[ "$status" == *" 200 "* ]]
)

# --- redis ------------------------------------------------------------------------------------------------
# An aclfile: the tenants' ACL users (ACL SAVEd by `engram tenant`) survive restarts of this Redis.
# Sentinel mode: node 0 starts as the primary, the others as its replicas (each node keeps its AOF, so a node
# that was a replica when you stopped holds what the primary had); the Sentinels get fresh configs each run.
# Cluster mode: each node keeps its AOF and nodes.conf in RUN_DIR/cluster/node-N (a cluster's keys are laid out
# per tenant hash slot, so it never shares the other modes' data), and the next run re-forms the same cluster.
redis_env=(ENGRAM_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0")
for ((n = 0; n < ${#redis_ports[@]}; n++)); do
    node_dir="$RUN_DIR/redis"
    ((n == 0)) || node_dir="$RUN_DIR/redis-$n"
    follow=()
    ((n == 0)) || [[ "$REDIS_MODE" == cluster ]] || follow=(--replicaof 127.0.0.1 "$REDIS_PORT")
    if [[ "$REDIS_MODE" == cluster ]]; then
        node_dir="$RUN_DIR/cluster/node-$n"
        follow=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
            --cluster-port "${bus_ports[n]}")
    fi
    mkdir -p "$node_dir"
    touch "$node_dir/users.acl"
    start redis "$RUN_DIR/logs/redis${n/#0/}.log" "$REDIS_SERVER" --port "${redis_ports[n]}" --bind 127.0.0.1 \
        --dir "$node_dir" --appendonly yes --appendfsync everysec --save "" --protected-mode yes \
        --aclfile "$node_dir/users.acl" "${follow[@]}"
    wait_until "redis-server ${redis_ports[n]}" "${pids[-1]}" 10 redis_ping "${redis_ports[n]}"
done
if [[ "$REDIS_MODE" == sentinel ]]; then
    REDIS_SENTINEL="$(find_bin redis-sentinel)"
    sentinels=""
    for ((n = 0; n < ${#sentinel_ports[@]}; n++)); do
        dir="$RUN_DIR/sentinel-$n"
        mkdir -p "$dir"
        printf '%s\n' "port ${sentinel_ports[n]}" "bind 127.0.0.1" "dir $dir" \
            "sentinel monitor engram 127.0.0.1 $REDIS_PORT 2" "sentinel down-after-milliseconds engram 1000" \
            "sentinel failover-timeout engram 3000" >"$dir/sentinel.conf"
        start redis "$RUN_DIR/logs/sentinel-$n.log" "$REDIS_SENTINEL" "$dir/sentinel.conf"
        sentinels+="${sentinels:+,}127.0.0.1:${sentinel_ports[n]}"
    done
    for port in "${sentinel_ports[@]}"; do wait_until "redis-sentinel $port" "${pids[-1]}" 30 sentinel_ready "$port"; done
    # A turn is acknowledged once a replica has it: a primary killed right after answering loses nothing
    # (with local durability the last turns before a kill -9 can be lost; docs/design.md). Override freely.
    redis_env+=(ENGRAM_REDIS_MODE=sentinel ENGRAM_REDIS_SENTINELS="$sentinels"
        ENGRAM_COMMIT_DURABILITY="${ENGRAM_COMMIT_DURABILITY:-replicated}")
fi
if [[ "$REDIS_MODE" == cluster ]]; then
    REDIS_CLI="$(find_bin redis-cli)"
    cli() { "$REDIS_CLI" -h 127.0.0.1 -p "$1" "${@:2}"; }
    formed=0  # nodes that already belong to a cluster of more than themselves (a previous run's)
    for port in "${redis_ports[@]}"; do
        [[ "$(cli "$port" CLUSTER INFO | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" -gt 1 ]] && formed=$((formed + 1))
    done
    if ((formed == 0)); then
        nodes=()
        for port in "${redis_ports[@]}"; do nodes+=("127.0.0.1:$port"); done
        cli "$REDIS_PORT" --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
            >>"$RUN_DIR/logs/cluster-create.log" 2>&1 \
            || die "redis-cli --cluster create failed; see $RUN_DIR/logs/cluster-create.log"
    elif ((formed < ${#redis_ports[@]})); then
        die "only $formed of ${#redis_ports[@]} nodes in $RUN_DIR/cluster belong to a cluster: remove $RUN_DIR/cluster to start afresh"
    fi
    # cluster_ready: every node says cluster_state:ok, knows all 6 nodes and sees 3 of them as replicas (gossip
    # has spread), and 3 primaries serve slots, each with a replica in sync (a replicated commit's WAIT has one)
    cluster_ready() {
        local port info serving=0
        for port in "${redis_ports[@]}"; do
            info="$(cli "$port" CLUSTER INFO | tr -d '\r')" || return 1
            [[ "$info" == *cluster_state:ok* && "$info" == *"cluster_known_nodes:${#redis_ports[@]}"* ]] || return 1
            [[ "$(cli "$port" CLUSTER NODES | awk '$3 ~ /slave/ && $3 !~ /fail/' | wc -l)" -eq 3 ]] || return 1
        done
        for port in "${redis_ports[@]}"; do
            info="$(cli "$port" INFO replication | tr -d '\r')" || return 1
            if [[ "$info" == *role:master* ]] && cli "$port" CLUSTER NODES | grep -q "myself,master.* connected [0-9]"; then
                [[ "$info" == *state=online* ]] || return 1  # a replica connected and in sync
                serving=$((serving + 1))
            fi
        done
        ((serving == 3))
    }
    wait_until "the Redis Cluster" "${pids[0]}" 60 cluster_ready
    redis_env=(ENGRAM_REDIS_MODE=cluster ENGRAM_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
        ENGRAM_COMMIT_DURABILITY="${ENGRAM_COMMIT_DURABILITY:-replicated}")
fi

# --- the demo tenant (the same reconcile code as the operator, applied to Redis only) ------------------------
page_fragment=""
if [[ "$ENGRAM_AUTH" == "required" ]]; then
    key_file="$RUN_DIR/demo-api-key"
    tenant() { env "${redis_env[@]}" "$PYTHON" -m engram.tenancy.cli tenant "$@"; }
    if [[ -s "$key_file" ]] && tenant list 2>/dev/null | grep -q '^demo\b'; then
        demo_key="$(<"$key_file")"
    elif tenant list 2>/dev/null | grep -q '^demo\b'; then
        demo_key="$(tenant rotate-key demo 2>>"$RUN_DIR/logs/tenant.log")" || die "could not rotate the demo tenant's key"
    else
        demo_key="$(tenant create demo 2>>"$RUN_DIR/logs/tenant.log")" || die "could not create the demo tenant"
    fi
    (umask 077 && printf '%s\n' "$demo_key" >"$key_file")
    # In the fragment: the browser keeps it (localStorage) and never sends it in a request line or log.
    page_fragment="#key=$demo_key"
fi

# --- replicas ---------------------------------------------------------------------------------------------
servers=""
replica_pids=()
for ((i = 1; i <= REPLICAS; i++)); do
    port=$((REPLICA_BASE_PORT + i - 1))
    metrics_dir="$RUN_DIR/metrics/replica-$i"
    mkdir -p "$metrics_dir"
    start "replica-$i" "$RUN_DIR/logs/replica-$i.log" env \
        "${redis_env[@]}" PROMETHEUS_MULTIPROC_DIR="$metrics_dir" \
        "$PYTHON" -m engram.server serve --host 127.0.0.1 --port "$port" --workers "$WORKERS"
    replica_pids+=("${pids[-1]}")
    servers+="    server replica-$i 127.0.0.1:$port check"$'\n'
done
for ((i = 1; i <= REPLICAS; i++)); do
    wait_until "replica $i" "${replica_pids[i - 1]}" 90 http_ok $((REPLICA_BASE_PORT + i - 1)) /readyz
done

# --- load balancer ----------------------------------------------------------------------------------------
template="$REPO/deploy/local/haproxy.cfg.template"
config="$RUN_DIR/haproxy.cfg"
awk -v bind="$BIND" -v port="$PORT" -v servers="$servers" -v balance="$balance" '
    /\{\{SERVERS\}\}/ { printf "%s", servers; next }
    { gsub(/\{\{BIND\}\}/, bind); gsub(/\{\{PORT\}\}/, port); gsub(/\{\{BALANCE\}\}/, balance); print }
' "$template" >"$config"
"$HAPROXY" -c -q -f "$config" || die "rendered $config is invalid"
start haproxy "$RUN_DIR/logs/haproxy.log" "$HAPROXY" -db -f "$config"
wait_until "haproxy" "${pids[-1]}" 10 http_ok "$PORT" /healthz

host="$BIND"
[[ "$host" == "0.0.0.0" ]] && host="127.0.0.1"
echo
say "Engram is running: $REPLICAS replicas behind HAProxy ($lb_mode)"
say "  chat page   http://$host:$PORT/$page_fragment"
[[ -n "$page_fragment" ]] && say "  API key     tenant demo (also in $RUN_DIR/demo-api-key): send it as 'Authorization: Bearer <key>'"
say "  API         http://$host:$PORT/v1/chat   (OpenAPI: http://$host:$PORT/openapi.json)"
for ((i = 1; i <= REPLICAS; i++)); do
    say "  metrics     replica $i: http://127.0.0.1:$((REPLICA_BASE_PORT + i - 1))/metrics"
done
if [[ "$REDIS_MODE" == cluster ]]; then
    say "  cluster     3 primaries + 3 replicas on ports $REDIS_PORT-$((REDIS_PORT + 5)), seed redis://127.0.0.1:$REDIS_PORT (AOF on, data in $RUN_DIR/cluster)"
else
    say "  redis       redis://127.0.0.1:$REDIS_PORT/0   (AOF on, data in $RUN_DIR/redis)"
fi
[[ "$REDIS_MODE" == sentinel ]] && say "  sentinel    replicas on ports $((REDIS_PORT + 1)), $((REDIS_PORT + 2)); Sentinels $sentinels (service engram)"
say "  logs        $RUN_DIR/logs/"
say "  load test   $PYTHON -m engram.server loadgen --url http://$host:$PORT --sessions 20 --turns 10 --concurrency 5${page_fragment:+ --api-key \$(cat $RUN_DIR/demo-api-key)}"
ready_in="$(awk -v a="$started_at" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
say "ready in ${ready_in}s. Press Ctrl-C to stop everything."

# --- watch until Ctrl-C -----------------------------------------------------------------------------------
declare -A reported=()
while true; do
    sleep 1 &
    wait $! || true
    for index in "${!pids[@]}"; do
        if [[ -z "${reported[$index]:-}" ]] && ! kill -0 "${pids[$index]}" 2>/dev/null; then
            reported[$index]=1
            say "${names[$index]} exited; see $RUN_DIR/logs/${names[$index]}.log"
        fi
    done
done
