{{/*
engram.name: the chart name (or nameOverride), cut to 63 characters because label values and DNS
labels stop there.
*/}}
{{- define "engram.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
engram.fullname: the prefix of every object name. Cut to 40 characters, not 63: the chart appends
suffixes ("-redis-headless", 15 characters) and the Redis StatefulSet's name must stay within 52 (its
pods get a "controller-revision-hash" label of name + "-" + 10 characters).
If the release name already contains the chart name it is used alone (release "engram" -> "engram").
*/}}
{{- define "engram.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
engram.chart: chart name and version for the helm.sh/chart label ("+" is not allowed in label values).
*/}}
{{- define "engram.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
engram.labels: the recommended app.kubernetes.io labels on every object. Takes a dict with the root
context (ctx) and the component (chat, operator, redis, ...), so each workload can be selected alone.
*/}}
{{- define "engram.labels" -}}
helm.sh/chart: {{ include "engram.chart" .ctx }}
{{ include "engram.selectorLabels" . }}
{{- if .ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: engram
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
engram.selectorLabels: the immutable subset used in selectors (name, instance, component). Never add a
label here that can change between upgrades: Deployment selectors cannot be edited.
*/}}
{{- define "engram.selectorLabels" -}}
app.kubernetes.io/name: {{ include "engram.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
engram.image: "repository:tag" for the Engram image (chat service, operator and test hook share it).
The tag defaults to the chart's appVersion; a digest, when set, wins over the tag.
*/}}
{{- define "engram.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
engram.chat.fullname / operator / redis: object names per component.
*/}}
{{- define "engram.chat.fullname" -}}
{{- printf "%s-chat" (include "engram.fullname" .) }}
{{- end }}

{{- define "engram.operator.fullname" -}}
{{- printf "%s-operator" (include "engram.fullname" .) }}
{{- end }}

{{- define "engram.redis.fullname" -}}
{{- printf "%s-redis" (include "engram.fullname" .) }}
{{- end }}

{{- define "engram.redis.headless" -}}
{{- printf "%s-redis-headless" (include "engram.fullname" .) }}
{{- end }}

{{/*
engram.redis.sentinel.fullname / headless: the Sentinels' StatefulSet and headless Service (redis.mode=sentinel).
*/}}
{{- define "engram.redis.sentinel.fullname" -}}
{{- printf "%s-sentinel" (include "engram.fullname" .) }}
{{- end }}

{{- define "engram.redis.sentinel.headless" -}}
{{- printf "%s-sentinel-headless" (include "engram.fullname" .) }}
{{- end }}

{{/*
engram.redis.mode: the topology (standalone, sentinel or cluster), checked: the bundled sentinel mode needs at
least two replicas (one to promote, one more to keep a copy), the bundled cluster mode at least three primaries
(Redis Cluster's own minimum) each with redis.cluster.replicasPerPrimary replicas.
*/}}
{{- define "engram.redis.mode" -}}
{{- $mode := .Values.redis.mode | default "standalone" }}
{{- if and (eq $mode "sentinel") .Values.redis.enabled (lt (int .Values.redis.replicas) 2) }}
{{- fail (printf "redis.mode=sentinel needs redis.replicas >= 2 (got %d): a failover promotes one replica and keeps another" (int .Values.redis.replicas)) }}
{{- end }}
{{- if and (eq $mode "sentinel") (not .Values.redis.enabled) (empty .Values.externalRedis.sentinel.hosts) }}
{{- fail "redis.mode=sentinel with redis.enabled=false needs externalRedis.sentinel.hosts (host:port of each Sentinel)" }}
{{- end }}
{{- if and (eq $mode "cluster") .Values.redis.enabled }}
{{- $nodes := int .Values.redis.cluster.nodes }}
{{- $group := add1 (int .Values.redis.cluster.replicasPerPrimary) }}
{{- if or (lt $nodes (mul 3 $group)) (ne (mod $nodes $group) 0) }}
{{- fail (printf "redis.mode=cluster needs redis.cluster.nodes to be a multiple of replicasPerPrimary+1 (%d) and at least 3 primaries' worth (%d); got %d" $group (mul 3 $group) $nodes) }}
{{- end }}
{{- end }}
{{- $mode }}
{{- end }}

{{/*
engram.redis.sentinel.hosts: the Sentinels' stable DNS names (bundled: one per pod of the Sentinel StatefulSet),
as a list of host names without port.
*/}}
{{- define "engram.redis.sentinel.hostList" -}}
{{- $hosts := list }}
{{- range $i := until (int .Values.redis.sentinel.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc" (include "engram.redis.sentinel.fullname" $) $i (include "engram.redis.sentinel.headless" $) $.Release.Namespace) }}
{{- end }}
{{- join " " $hosts }}
{{- end }}

{{/*
engram.redis.sentinels: ENGRAM_REDIS_SENTINELS, "host:port,host:port,...".
*/}}
{{- define "engram.redis.sentinels" -}}
{{- if .Values.redis.enabled }}
{{- $port := int .Values.redis.sentinel.port }}
{{- $addresses := list }}
{{- range $host := splitList " " (include "engram.redis.sentinel.hostList" .) }}
{{- $addresses = append $addresses (printf "%s:%d" $host $port) }}
{{- end }}
{{- join "," $addresses }}
{{- else }}
{{- join "," .Values.externalRedis.sentinel.hosts }}
{{- end }}
{{- end }}

{{/*
engram.redis.podHostList: every Redis pod's stable DNS name, space-separated (sentinel mode's start scripts
ask them for their ROLE when no Sentinel answers; cluster mode's bootstrap Job and rejoin step reach each node
by it).
*/}}
{{- define "engram.redis.podHostList" -}}
{{- $hosts := list }}
{{- range $i := until (int (include "engram.redis.podCount" .)) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc" (include "engram.redis.fullname" $) $i (include "engram.redis.headless" $) $.Release.Namespace) }}
{{- end }}
{{- join " " $hosts }}
{{- end }}

{{/*
engram.redis.podCount: the Redis StatefulSet's size: redis.cluster.nodes in cluster mode, else the primary and
its redis.replicas.
*/}}
{{- define "engram.redis.podCount" -}}
{{- if eq (include "engram.redis.mode" .) "cluster" }}
{{- int .Values.redis.cluster.nodes }}
{{- else }}
{{- add1 (int .Values.redis.replicas) }}
{{- end }}
{{- end }}

{{/*
engram.redis.primaryHost: pod 0's stable DNS name: the primary of a fresh install, and the one replicas
follow when no Sentinel answers yet.
*/}}
{{- define "engram.redis.primaryHost" -}}
{{- printf "%s-0.%s.%s.svc" (include "engram.redis.fullname" .) (include "engram.redis.headless" .) .Release.Namespace }}
{{- end }}

{{/*
engram.chat.serviceAccountName / engram.operator.serviceAccountName: the ServiceAccount each workload
runs as. The chat service needs no Kubernetes API access; the operator's is bound to its RBAC.
*/}}
{{- define "engram.chat.serviceAccountName" -}}
{{- if .Values.chat.serviceAccount.create }}
{{- default (include "engram.chat.fullname" .) .Values.chat.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.chat.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "engram.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "engram.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
engram.redis.secretName: the Secret holding the Redis users' names and passwords, whether the chart
generated it (bundled Redis) or the user brought it (redis.auth.existingSecret, externalRedis).
Keys: admin-username, admin-password, service-username, service-password (+ replication-password and
exporter-password for the bundled Redis).
*/}}
{{- define "engram.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (printf "%s-auth" (include "engram.redis.fullname" .)) .Values.redis.auth.existingSecret }}
{{- else }}
{{- required "externalRedis.existingSecret is required when redis.enabled=false" .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{/*
engram.redis.url: the URL of the Redis primary that the chat service and the operator use. For the
bundled Redis it is the "<fullname>-redis" Service, which always selects pod 0 (the primary); in cluster mode
a seed node (the headless Service's name, or externalRedis.url).
*/}}
{{- define "engram.redis.url" -}}
{{- if and .Values.redis.enabled (eq (include "engram.redis.mode" .) "cluster") }}
{{- /* A seed only: the headless name resolves to every pod; the client learns the cluster's map from any of them. */ -}}
{{- printf "redis://%s.%s.svc:%d" (include "engram.redis.headless" .) .Release.Namespace (int .Values.redis.service.port) }}
{{- else if and .Values.redis.enabled (eq (include "engram.redis.mode" .) "sentinel") }}
{{- /* The Sentinels give the primary; the URL only gives the database. */ -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "engram.redis.headless" .) .Release.Namespace (int .Values.redis.service.port) }}
{{- else if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:%d/0" (include "engram.redis.fullname" .) .Release.Namespace (int .Values.redis.service.port) }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled=false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/*
engram.redis.replicaUrls: comma-separated URLs of every replica. The operator applies tenant ACL users
to each of them, because Redis does not replicate ACLs.
*/}}
{{- define "engram.redis.replicaUrls" -}}
{{- if has (include "engram.redis.mode" .) (list "sentinel" "cluster") }}
{{- /* none: the operator asks the Sentinels (sentinel mode) or the cluster's slot map (cluster mode) for every node */ -}}
{{- else if .Values.redis.enabled }}
{{- $urls := list }}
{{- range $i := untilStep 1 (int (add1 .Values.redis.replicas)) 1 }}
{{- $urls = append $urls (printf "redis://%s-%d.%s.%s.svc:%d/0" (include "engram.redis.fullname" $) $i (include "engram.redis.headless" $) $.Release.Namespace (int $.Values.redis.service.port)) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," .Values.externalRedis.replicaUrls }}
{{- end }}
{{- end }}

{{/*
engram.llm.secretName: the Secret with the model API key (key "api-key"), or "" when none is used.
*/}}
{{- define "engram.llm.secretName" -}}
{{- if .Values.config.llm.existingSecret }}
{{- .Values.config.llm.existingSecret }}
{{- else if .Values.config.llm.apiKey }}
{{- printf "%s-llm" (include "engram.fullname" .) }}
{{- end }}
{{- end }}

{{/*
engram.commonEnv: the environment every Engram process (chat service, operator) shares: where Redis is,
how to log in, and the key namespace.
*/}}
{{- define "engram.commonEnv" -}}
{{- $mode := include "engram.redis.mode" . }}
- name: ENGRAM_REDIS_URL
  value: {{ include "engram.redis.url" . | quote }}
- name: ENGRAM_NAMESPACE
  value: {{ .Values.config.keyNamespace | quote }}
- name: ENGRAM_REDIS_MODE
  value: {{ $mode | quote }}
{{- if eq $mode "sentinel" }}
- name: ENGRAM_REDIS_SENTINELS
  value: {{ include "engram.redis.sentinels" . | quote }}
- name: ENGRAM_REDIS_SENTINEL_SERVICE
  value: {{ ternary .Values.redis.sentinel.masterName .Values.externalRedis.sentinel.masterName .Values.redis.enabled | quote }}
{{- if .Values.redis.enabled }}
- name: ENGRAM_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "engram.redis.secretName" . }}
      key: sentinel-password
{{- else }}
{{- with .Values.externalRedis.sentinel.usernameKey }}
- name: ENGRAM_REDIS_SENTINEL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "engram.redis.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- with .Values.externalRedis.sentinel.passwordKey }}
- name: ENGRAM_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "engram.redis.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- end }}
- name: ENGRAM_COMMIT_DURABILITY
  value: {{ .Values.config.commitDurability | default (ternary "local" "replicated" (eq $mode "standalone")) | quote }}
- name: ENGRAM_COMMIT_REPLICA_TIMEOUT_MS
  value: {{ .Values.config.commitReplicaTimeoutMs | quote }}
{{- end }}

{{/*
engram.podSecurityContext / engram.containerSecurityContext: the "restricted" Pod Security Standard.
Workloads merge their own values on top (runAsUser of an upstream image, fsGroup for volumes).
*/}}
{{- define "engram.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
engram.checksum: a hash of a rendered template, put in a pod annotation so the pods roll when their
configuration changes.
*/}}
{{- define "engram.checksum" -}}
{{- include (print .ctx.Template.BasePath "/" .file) .ctx | sha256sum }}
{{- end }}

{{/*
engram.redis.aclCommands: an allow-list of command names as ACL rules ("ping fcall" -> "+ping +fcall").
*/}}
{{- define "engram.redis.aclCommands" -}}
{{- $rules := list }}
{{- range . }}
{{- $rules = append $rules (printf "+%s" (lower .)) }}
{{- end }}
{{- join " " $rules }}
{{- end }}
