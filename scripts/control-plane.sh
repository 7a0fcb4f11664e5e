#!/usr/bin/env bash
# A local Kubernetes control plane made of real processes (no containers, no kubelet):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and kwok faking 3 nodes.
#
#   scripts/control-plane.sh start DIR    start everything, write DIR/kubeconfig (admin), return when ready
#   scripts/control-plane.sh stop DIR     stop everything start DIR started (TERM, bounded wait, then KILL)
#   scripts/control-plane.sh status DIR   which components run (exit 1 if any is down)
#
# Binaries come from scripts/build-control-plane.sh's cache (ENGRAM_CONTROL_PLANE_BIN overrides the directory).
# Every component listens on 127.0.0.1 on a free port. Each `start` is a fresh cluster: DIR's etcd data, logs and
# certificates are made anew. Layout: DIR/kubeconfig, DIR/pki/, DIR/logs/<component>.log, DIR/run/<component>.pid,
# DIR/env (ports, for scripts and tests).
#
# Storage: a default StorageClass `engram-static` (provisioner kubernetes.io/no-provisioner, Immediate binding)
# and ENGRAM_CONTROL_PLANE_PVS (12) static hostPath PersistentVolumes of it (10Gi each, Retain), so a StatefulSet's
# claims with no class bind at once. Nothing mounts them: kwok runs no containers.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Stop order: the reverse of the start order, so nothing loses its API server while it still runs.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
STOP_GRACE_SECONDS="${ENGRAM_CONTROL_PLANE_STOP_GRACE:-10}"
READY_TIMEOUT_SECONDS="${ENGRAM_CONTROL_PLANE_READY_TIMEOUT:-60}"
NODES="${ENGRAM_CONTROL_PLANE_NODES:-3}"
PVS="${ENGRAM_CONTROL_PLANE_PVS:-12}"

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() { die "usage: $0 start|stop|status DIR"; }

now_ms() { date +%s%3N; }

# --- process handling ----------------------------------------------------------------------------------------------

# The pid of a component if its pid file names a live process that still runs that component's binary (a recycled
# pid is never signalled).
live_pid() {
  local dir="$1" name="$2" pid
  [[ -f "$dir/run/$name.pid" ]] || return 1
  pid="$(<"$dir/run/$name.pid")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "/$name " || return 1
  echo "$pid"
}

# Start a component in its own session (so its whole process group can be signalled) with its output in a log.
launch() {
  local name="$1"
  shift
  # A non-interactive bash runs background jobs in its own process group, so setsid does not need to fork: $! is
  # the component itself, leader of a new process group.
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/run/$name.pid"
}

# Whether a process group still has a member that is not a zombie. Once start has returned, the components' parent is
# init, which may take seconds to reap them: an exited component counts as gone.
group_alive() {
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

stop_component() {
  local dir="$1" name="$2" pid waited=0
  if ! pid="$(live_pid "$dir" "$name")"; then
    rm -f "$dir/run/$name.pid"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  while group_alive "$pid"; do
    if ((waited >= STOP_GRACE_SECONDS * 10)); then
      log "$name (pid $pid) still running after ${STOP_GRACE_SECONDS}s: KILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  # A KILLed group is gone at once, bar the reaping; a short bounded wait covers a D-state straggler.
  for _ in $(seq 50); do group_alive "$pid" || break; sleep 0.1; done
  rm -f "$dir/run/$name.pid"
}

stop_all() {
  local dir="$1" i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop_component "$dir" "${COMPONENTS[i]}"; done
}

# --- set-up helpers ------------------------------------------------------------------------------------------------

# N distinct free TCP ports on 127.0.0.1, held open together while chosen so they differ.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# A certificate signed by the local CA: ECDSA P-256 keys (fast to make, accepted by every component).
issue_cert() {
  local name="$1" subject="$2" ext="$3"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subject" \
    -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 3650 \
    -extfile <(printf '%s\n' "$ext") -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr"
}

make_pki() {
  mkdir -p "$PKI"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=engram-local-ca" -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    2>/dev/null
  # The in-cluster names too, so a client that reaches the API server as kubernetes.default.svc verifies it.
  issue_cert apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
    "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment")"
  # The admin identity: group system:masters passes every RBAC check (as a cluster's admin.conf does).
  issue_cert admin "/O=system:masters/CN=engram-admin" \
    "$(printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment")"
  # ServiceAccount tokens: the API server signs (TokenRequest) with the private key and verifies with the public
  # one; kube-controller-manager signs the legacy token Secrets with the same private key.
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null
  openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

write_kubeconfig() {
  local b64="base64 -w0"
  cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: engram-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: engram-admin
  user:
    client-certificate-data: $($b64 <"$PKI/admin.crt")
    client-key-data: $($b64 <"$PKI/admin.key")
contexts:
- name: engram-local
  context:
    cluster: engram-local
    user: engram-admin
current-context: engram-local
EOF
  chmod 600 "$DIR/kubeconfig"
}

# kwok's configuration: which stages a fake node and a fake pod go through. Without stages kwok does nothing.
write_kwok_config() {
  cat >"$DIR/kwok.yaml" <<'EOF'
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
# A configuration file replaces kwok's built-in defaults instead of merging with them, so the parallelism
# settings must be given (zero is refused).
options:
  enableCRDs: []
  podPlayStageParallelism: 4
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 1
  nodeLeaseDurationSeconds: 40
---
# A new fake node becomes Ready, keeping any allocatable/capacity its manifest set.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: engram-node-ready
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - {key: '.status.conditions.[] | select( .type == "Ready" ) | .status', operator: NotIn, values: ['True']}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - {type: {{ .type | Quote }}, status: {{ .status | Quote }}, reason: {{ .reason | Quote }}, message: {{ .message | Quote }}, lastHeartbeatTime: {{ $now | Quote }}, lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      addresses:
      - {type: InternalIP, address: {{ NodeIP | Quote }}}
      - {type: Hostname, address: {{ .metadata.name | Quote }}}
      allocatable:
      {{ with .status.allocatable }}{{ YAML . 1 }}{{ else }}  {cpu: "16", memory: 64Gi, pods: "110"}{{ end }}
      capacity:
      {{ with .status.capacity }}{{ YAML . 1 }}{{ else }}  {cpu: "16", memory: 64Gi, pods: "110"}{{ end }}
      nodeInfo:
        architecture: amd64
        operatingSystem: linux
        kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
        containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
      phase: Running
---
# A scheduled pod that is not being deleted: its containers "run" and it is Ready at once.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: engram-pod-ready
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.status.phase', operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: PodScheduled, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ range .spec.readinessGates }}
      - {type: {{ .conditionType | Quote }}, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, started: true, restartCount: 0, state: {running: {startedAt: {{ $now | Quote }}}}}
      {{ end }}
      initContainerStatuses:
      {{ range .spec.initContainers }}
      - {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, restartCount: 0, state: {terminated: {exitCode: 0, reason: Completed, startedAt: {{ $now | Quote }}, finishedAt: {{ $now | Quote }}}}}
      {{ end }}
      {{ with NodeIPsWith .spec.nodeName }}
      hostIP: {{ index . 0 | Quote }}
      hostIPs: [{ip: {{ index . 0 | Quote }}}]
      {{ end }}
      {{ with PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
      podIP: {{ index . 0 | Quote }}
      podIPs: [{ip: {{ index . 0 | Quote }}}]
      {{ end }}
      phase: Running
      startTime: {{ $now | Quote }}
---
# A Job's pod (a Helm hook, a test) "exits 0" a moment after it runs, so the Job completes.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: engram-job-pod-complete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.status.phase', operator: In, values: [Running]}
    - {key: '.metadata.ownerReferences.[].kind', operator: In, values: [Job]}
  delay: {durationMilliseconds: 1000}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Ready, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: false, started: false, restartCount: 0, state: {terminated: {exitCode: 0, reason: Completed, startedAt: {{ $now | Quote }}, finishedAt: {{ $now | Quote }}}}}
      {{ end }}
      phase: Succeeded
---
# A pod being deleted goes at once (a kubelet would stop its containers, then remove it).
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: engram-pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: Exists}
  next:
    finalizers: {empty: true}
    delete: true
EOF
}

# Fake nodes (kwok manages those annotated kwok.x-k8s.io/node=fake), the default StorageClass and static PVs.
cluster_objects() {
  local i
  for ((i = 1; i <= NODES; i++)); do
    # One zone per node, so topology spread over zones has somewhere to spread.
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    topology.kubernetes.io/zone: zone-$i
    type: kwok
status:
  allocatable: {cpu: "16", memory: 64Gi, pods: "110"}
  capacity: {cpu: "16", memory: 64Gi, pods: "110"}
EOF
  done
  cat <<'EOF'
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: engram-static
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
EOF
  for ((i = 1; i <= PVS; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: engram-static-pv-$i
spec:
  storageClassName: engram-static
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: $DIR/pv/$i, type: DirectoryOrCreate}
EOF
  done
}

# Wait until CMD succeeds, up to the start deadline.
wait_for() {
  local what="$1"
  shift
  until "$@" >/dev/null 2>&1; do
    if (($(now_ms) > DEADLINE_MS)); then
      log "timed out waiting for $what"
      return 1
    fi
    check_alive
    sleep 0.2
  done
}

# A component that exited during start-up fails the start at once, with its log's tail.
check_alive() {
  local name
  for name in "${STARTED[@]}"; do
    if ! live_pid "$DIR" "$name" >/dev/null; then
      log "$name exited; last lines of $DIR/logs/$name.log:"
      tail -n 20 "$DIR/logs/$name.log" >&2 || true
      exit 1
    fi
  done
}

healthz() { curl -fsS --max-time 2 -k "https://127.0.0.1:$1/healthz"; }

# --- commands ------------------------------------------------------------------------------------------------------

start() {
  local bin t0 name
  t0="$(now_ms)"
  DEADLINE_MS=$((t0 + READY_TIMEOUT_SECONDS * 1000))
  bin="${ENGRAM_CONTROL_PLANE_BIN:-}"
  if [[ -z "$bin" ]]; then
    bin="$("$HERE/build-control-plane.sh" --print)" || die "control-plane binaries not built: run scripts/build-control-plane.sh"
  fi
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    [[ -x "$bin/$name" ]] || die "missing $bin/$name"
  done
  for name in "${COMPONENTS[@]}"; do
    if live_pid "$DIR" "$name" >/dev/null; then die "$name already runs for $DIR (stop it first)"; fi
  done
  # A fresh cluster every start: old data, certificates and logs go.
  rm -rf "$DIR/etcd" "$DIR/pki" "$DIR/logs" "$DIR/run" "$DIR/pv" "$DIR/kubeconfig" "$DIR/env"
  mkdir -p "$DIR/logs" "$DIR/run" "$DIR/pv" "$DIR/apiserver-certs"
  PKI="$DIR/pki"
  make_pki
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KWOK_PORT <<<"$(free_ports 6)"
  write_kubeconfig
  write_kwok_config
  printf 'API_URL=https://127.0.0.1:%s\nETCD_URL=http://127.0.0.1:%s\nKUBECONFIG=%s\nBIN_DIR=%s\n' \
    "$API_PORT" "$ETCD_PORT" "$DIR/kubeconfig" "$bin" >"$DIR/env"

  STARTED=()
  # Whatever fails from here stops what was started, so a failed start leaves no process behind.
  trap 'rc=$?; if ((rc != 0)); then log "start failed: stopping what was started"; stop_all "$DIR"; fi' EXIT

  # etcd: fsync off (a test cluster's data need not survive a power cut, and fsync dominates on a busy disk).
  launch etcd "$bin/etcd" --name=engram --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="engram=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level=warn
  STARTED+=(etcd)

  # kube-apiserver, after envtest's flags (etcd, cert dir, service-account issuer and keys, RBAC, a service range)
  # plus a client CA for the admin's certificate; the default admission plugins stay on (ServiceAccount included,
  # since kube-controller-manager creates the default ServiceAccounts here).
  launch kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --cert-dir="$DIR/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.96.0.0/16 \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --allow-privileged=true --profiling=false
  STARTED+=(kube-apiserver)
  wait_for "etcd" curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
  wait_for "kube-apiserver /readyz" "$bin/kubectl" --kubeconfig="$DIR/kubeconfig" get --raw=/readyz

  # kube-controller-manager signs ServiceAccount token Secrets with the same key and puts the CA in every
  # namespace's kube-root-ca.crt; garbage collection, ReplicaSets, StatefulSets, Jobs, PV binding are its work.
# HPAs are synced every 2 s instead of 15 s, so a test waits seconds, not a quarter of a minute, for one to act.
  launch kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$DIR/kubeconfig" \
    --authentication-kubeconfig="$DIR/kubeconfig" --authorization-kubeconfig="$DIR/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --horizontal-pod-autoscaler-sync-period=2s \
    --profiling=false
  STARTED+=(kube-controller-manager)
  launch kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig="$DIR/kubeconfig" \
    --authentication-kubeconfig="$DIR/kubeconfig" --authorization-kubeconfig="$DIR/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --leader-elect=false --profiling=false
  STARTED+=(kube-scheduler)
  launch kwok "$bin/kwok" --kubeconfig="$DIR/kubeconfig" --config="$DIR/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr=10.244.0.0/16 --node-ip=10.240.0.1 \
    --server-address="127.0.0.1:$KWOK_PORT"
  STARTED+=(kwok)

  cluster_objects | "$bin/kubectl" --kubeconfig="$DIR/kubeconfig" apply -f - >/dev/null
  log "API server ready on https://127.0.0.1:$API_PORT after $(($(now_ms) - t0)) ms"
  # Ready for work: the controllers and scheduler answer, the default ServiceAccount exists (pods can be admitted)
  # and every fake node is Ready.
  wait_for "kube-controller-manager /healthz" healthz "$KCM_PORT"
  wait_for "kube-scheduler /healthz" healthz "$SCHED_PORT"
  wait_for "the default ServiceAccount" "$bin/kubectl" --kubeconfig="$DIR/kubeconfig" get serviceaccount default
  wait_for "$NODES Ready nodes" nodes_ready "$bin"
  trap - EXIT
  log "control plane ready in $(($(now_ms) - t0)) ms (kubeconfig: $DIR/kubeconfig)"
}

nodes_ready() {
  local ready
  ready="$("$1/kubectl" --kubeconfig="$DIR/kubeconfig" get nodes \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')"
  ((ready == NODES))
}

status() {
  local name pid down=0
  for name in "${COMPONENTS[@]}"; do
    if pid="$(live_pid "$DIR" "$name")"; then
      echo "$name running (pid $pid)"
    else
      echo "$name stopped"
      down=1
    fi
  done
  return "$down"
}

(($# == 2)) || usage
DIR="$2"
case "$1" in
  start)
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    start
    ;;
  stop)
    [[ -d "$DIR" ]] || exit 0
    DIR="$(cd "$DIR" && pwd)"
    stop_all "$DIR"
    log "stopped"
    ;;
  status)
    DIR="$(cd "$DIR" && pwd)"
    status
    ;;
  *) usage ;;
esac
