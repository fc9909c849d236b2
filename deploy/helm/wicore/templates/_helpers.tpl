{{/*
Names, labels and the pieces every WiCore pod shares.
*/}}

{{- define "wicore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name: <release>-wicore, or the release name when it holds "wicore". */}}
{{- define "wicore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wicore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "wicore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wicore.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "wicore.labels" -}}
helm.sh/chart: {{ include "wicore.chart" .ctx }}
{{ include "wicore.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: wicore
{{- end }}

{{/* Labels of the release's own pods (NetworkPolicies let these in). */}}
{{- define "wicore.releasePods" -}}
app.kubernetes.io/name: {{ include "wicore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wicore.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "wicore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wicore.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wicore.workerName" -}}
{{- printf "%s-worker-%s" (include "wicore.fullname" .ctx) .class.name }}
{{- end }}

{{/* Where files land in every WiCore container. */}}
{{- define "wicore.configPath" -}}/etc/wicore/config.yaml{{- end }}
{{- define "wicore.stateDir" -}}/var/lib/wicore{{- end }}
{{- define "wicore.nvmeDir" -}}/var/lib/wicore-nvme{{- end }}
{{- define "wicore.homeDir" -}}/home/wicore{{- end }}

{{- define "wicore.internalSecretName" -}}
{{- .Values.internal.existingSecret | default (printf "%s-internal-token" (include "wicore.fullname" .)) }}
{{- end }}

{{- define "wicore.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "wicore.fullname" .)) }}
{{- end }}

{{- define "wicore.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "wicore.fullname" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* worker.model for the chart's model.source. */}}
{{- define "wicore.modelSpec" -}}
{{- if eq .Values.model.source "bundled" }}smollm2{{ else }}{{ .Values.model.path }}{{ end }}
{{- end }}

{{/*
Refuses values that cannot work, saying which key and what to use instead (`helm install`
fails before anything is created).
*/}}
{{- define "wicore.checkValues" -}}
{{- $cfg := .Values.config | default dict }}
{{- $owned := dict
  "state_dir" "state_dir is the pods' emptyDir (/var/lib/wicore)"
  "cache_dir" "use model.cacheDir"
  "gateway.host" "each service binds 0.0.0.0 in its own container"
  "gateway.api_keys_file" "use gateway.apiKeys.existingSecret"
  "gateway.tls_cert" "use gateway.tls.existingSecret"
  "gateway.tls_key" "use gateway.tls.existingSecret"
  "gateway.tls_client_ca" "use gateway.tls.mtls"
  "scheduler.host" "the chart points it at the scheduler's Service"
  "worker.host" "each service binds 0.0.0.0 in its own container"
  "worker.advertise_address" "each worker advertises its pod IP"
  "worker.tier_address" "each worker uses the tier on its node"
  "worker.model" "use model.source and model.path"
  "worker.device" "use workers[].device"
  "tier.host" "the chart points it at the tier's Service"
  "tier.node" "each tier is named after its node"
  "tier.nvme_dir" "use tier.nvme"
  "redis.url" "use redis.enabled or redis.url"
  "redis.cluster" "use redis.cluster"
  "redis.password" "use redis.auth.existingSecret (a password never goes into values)"
  "redis.tls_ca_file" "use redis.tls.existingSecret"
  "redis.tls_cert_file" "use redis.tls.existingSecret and redis.tls.clientCert"
  "redis.tls_key_file" "use redis.tls.existingSecret and redis.tls.clientCert"
  "internal.token" "use internal.existingSecret (a token never goes into values)"
  "internal.token_file" "use internal.existingSecret"
  "observability.metrics_host" "every pod's metrics listen on 0.0.0.0"
}}
{{- $sources := list (dict "where" "config" "data" $cfg) }}
{{- range $i, $class := .Values.workers }}
{{- $sources = append $sources (dict "where" (printf "workers[%d].extraConfig" $i) "data" ((get $class "extraConfig") | default dict)) }}
{{- end }}
{{- range $source := $sources }}
{{- range $key, $why := $owned }}
{{- $parts := splitList "." $key }}
{{- $node := $source.data }}
{{- if eq (len $parts) 2 }}
{{- $node = (get $source.data (first $parts)) | default dict }}
{{- end }}
{{- if and (kindIs "map" $node) (hasKey $node (last $parts)) }}
{{- fail (printf "%s.%s: set by the chart; %s" $source.where $key $why) }}
{{- end }}
{{- end }}
{{- end }}
{{- $names := list }}
{{- range $i, $class := .Values.workers }}
{{- if has $class.name $names }}
{{- fail (printf "workers[%d].name: %q is used twice" $i $class.name) }}
{{- end }}
{{- $names = append $names $class.name }}
{{- $res := (get $class "resources") | default dict }}
{{- if and (eq $class.device "cpu") (or (hasKey ((get $res "limits") | default dict) "nvidia.com/gpu") (hasKey ((get $res "requests") | default dict) "nvidia.com/gpu")) }}
{{- fail (printf "workers[%d].resources: a cpu class must not ask for nvidia.com/gpu (use device: gpu:0)" $i) }}
{{- end }}
{{- if gt (len (include "wicore.workerName" (dict "ctx" $ "class" $class))) 52 }}
{{- fail (printf "workers[%d].name: %s is longer than 52 characters (a StatefulSet's limit); shorten the name or fullnameOverride" $i (include "wicore.workerName" (dict "ctx" $ "class" $class))) }}
{{- end }}
{{- end }}
{{- if ne .Values.model.source "bundled" }}
{{- $mount := trimSuffix "/" .Values.model.mountPath }}
{{- if not (or (eq .Values.model.path $mount) (hasPrefix (printf "%s/" $mount) .Values.model.path)) }}
{{- fail (printf "model.path: %q must be model.mountPath (%s) or a directory under it" .Values.model.path $mount) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.pvc.claimName: required with model.source: pvc" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.hostPath.path: required with model.source: hostPath" }}
{{- end }}
{{- end }}
{{- if and .Values.model.baked (ne .Values.model.source "bundled") }}
{{- fail "model.baked: only with model.source: bundled (the image holds SmolLM2 only)" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) }}
{{- fail "redis.url: required with redis.enabled: false (redis://host:6379/0 or rediss://...)" }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.url }}
{{- fail "redis.url: only for an external Redis (redis.enabled: false); the in-chart one is found by its Service" }}
{{- end }}
{{- if .Values.redis.cluster }}
{{- fail "redis.cluster: the in-chart Redis is one node; use an external Redis Cluster (redis.enabled: false)" }}
{{- end }}
{{- if .Values.redis.tls.existingSecret }}
{{- fail "redis.tls.existingSecret: the in-chart Redis speaks plaintext inside the release; TLS is for an external one" }}
{{- end }}
{{- else }}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}
{{- fail "redis.auth.existingSecret: required for an external Redis with redis.auth.enabled" }}
{{- end }}
{{- if and .Values.redis.tls.existingSecret (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tls.existingSecret: needs a rediss:// redis.url" }}
{{- end }}
{{- end }}
{{- if and .Values.gateway.tls.enabled (not .Values.gateway.tls.existingSecret) }}
{{- fail "gateway.tls.existingSecret: required with gateway.tls.enabled (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and .Values.gateway.tls.mtls (not .Values.gateway.tls.enabled) }}
{{- fail "gateway.tls.mtls: needs gateway.tls.enabled" }}
{{- end }}
{{- end }}

{{/* The services' config file (config.yaml): the values' `config` plus what the chart sets. */}}
{{- define "wicore.configData" -}}
{{- $fullname := include "wicore.fullname" . }}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- range $section := list "gateway" "scheduler" "worker" "tier" "redis" "internal" "observability" }}
{{- if not (kindIs "map" (get $cfg $section)) }}
{{- $_ := set $cfg $section dict }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "state_dir" (include "wicore.stateDir" .) }}
{{- $_ = set $cfg "cache_dir" .Values.model.cacheDir }}
{{- $gw := $cfg.gateway }}
{{- $_ = set $gw "host" "0.0.0.0" }}
{{- if .Values.gateway.apiKeys.existingSecret }}
{{- $_ = set $gw "api_keys_file" (printf "/etc/wicore/api-keys/%s" .Values.gateway.apiKeys.key) }}
{{- end }}
{{- if .Values.gateway.tls.enabled }}
{{- $_ = set $gw "tls_cert" "/etc/wicore/tls/tls.crt" }}
{{- $_ = set $gw "tls_key" "/etc/wicore/tls/tls.key" }}
{{- if .Values.gateway.tls.mtls }}
{{- $_ = set $gw "tls_client_ca" "/etc/wicore/tls/ca.crt" }}
{{- end }}
{{- end }}
{{- /* scheduler.host and tier.host are how the others dial them; each binds 0.0.0.0 through its own env. */}}
{{- $_ = set $cfg.scheduler "host" (printf "%s-scheduler" $fullname) }}
{{- $_ = set $cfg.worker "host" "0.0.0.0" }}
{{- $_ = set $cfg.worker "model" (include "wicore.modelSpec" .) }}
{{- $_ = set $cfg.tier "host" (printf "%s-tier" $fullname) }}
{{- $_ = set $cfg.tier "nvme_dir" (include "wicore.nvmeDir" .) }}
{{- if not .Values.tier.enabled }}
{{- $_ = set $cfg.worker "kv_offload" false }}
{{- $_ = set $cfg.scheduler "prefetch" false }}
{{- end }}
{{- $_ = set $cfg.redis "url" (include "wicore.redisUrl" .) }}
{{- $_ = set $cfg.redis "cluster" .Values.redis.cluster }}
{{- $_ = set $cfg.internal "token_file" (printf "/etc/wicore/internal/%s" .Values.internal.existingSecretKey) }}
{{- $_ = set $cfg.observability "metrics_host" "0.0.0.0" }}
{{- if and .Values.jaeger.enabled (not (get $cfg.observability "otlp_endpoint")) }}
{{- $_ = set $cfg.observability "otlp_endpoint" (printf "http://%s-jaeger:4317" $fullname) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Environment variables from config-shaped data: WICORE_SECTION__KEY (values as JSON, which the services read as YAML). */}}
{{- define "wicore.envFromConfig" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .data }}
{{- $name := printf "%s%s" $prefix (upper $key) }}
{{- if kindIs "map" $value }}
{{- include "wicore.envFromConfig" (dict "prefix" (printf "%s__" $name) "data" $value) }}
{{- else }}
- name: {{ $name }}
  value: {{ toJson $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every WiCore container; call with (dict "ctx" $ "service" "gateway").
The image sets WICORE_STATE_DIR and WICORE_CACHE_DIR (the environment wins over the config
file), so they are set here to the same paths as the file.
*/}}
{{- define "wicore.env" -}}
{{- $ctx := .ctx }}
- name: WICORE_{{ upper .service }}__HOST
  value: "0.0.0.0"
- name: WICORE_STATE_DIR
  value: {{ include "wicore.stateDir" $ctx | quote }}
- name: WICORE_CACHE_DIR
  value: {{ $ctx.Values.model.cacheDir | quote }}
{{- if $ctx.Values.redis.auth.enabled }}
- name: WICORE_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "wicore.redisSecretName" $ctx }}
      key: {{ $ctx.Values.redis.auth.existingSecretKey }}
{{- end }}
{{- if $ctx.Values.redis.tls.existingSecret }}
- name: WICORE_REDIS__TLS_CA_FILE
  value: {{ printf "/etc/wicore/redis-tls/%s" $ctx.Values.redis.tls.caKey | quote }}
{{- if $ctx.Values.redis.tls.clientCert }}
- name: WICORE_REDIS__TLS_CERT_FILE
  value: "/etc/wicore/redis-tls/tls.crt"
- name: WICORE_REDIS__TLS_KEY_FILE
  value: "/etc/wicore/redis-tls/tls.key"
{{- end }}
{{- end }}
{{- with $ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of every WiCore container. */}}
{{- define "wicore.volumeMounts" -}}
- name: config
  mountPath: {{ include "wicore.configPath" . }}
  subPath: config.yaml
  readOnly: true
- name: internal-token
  mountPath: /etc/wicore/internal
  readOnly: true
- name: state
  mountPath: {{ include "wicore.stateDir" . }}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ include "wicore.homeDir" . }}
{{- if .Values.redis.tls.existingSecret }}
- name: redis-tls
  mountPath: /etc/wicore/redis-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes of every WiCore pod. */}}
{{- define "wicore.volumes" -}}
- name: config
  configMap:
    name: {{ include "wicore.fullname" . }}-config
- name: internal-token
  secret:
    secretName: {{ include "wicore.internalSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.internal.existingSecretKey }}
        path: {{ .Values.internal.existingSecretKey }}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if .Values.redis.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The model (workers and the gateway): its volume and the cache the bundled one converts into. */}}
{{- define "wicore.modelMounts" -}}
{{- if ne .Values.model.source "bundled" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if not .Values.model.baked }}
- name: cache
  mountPath: {{ .Values.model.cacheDir }}
{{- end }}
{{- end }}

{{- define "wicore.modelVolumes" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- if not .Values.model.baked }}
- name: cache
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Pod-level settings every WiCore pod shares. */}}
{{- define "wicore.podSpec" -}}
serviceAccountName: {{ include "wicore.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template annotations: a config change rolls every WiCore pod. */}}
{{- define "wicore.podAnnotations" -}}
checksum/config: {{ include "wicore.configData" . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "wicore.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .period | default 10 }}
timeoutSeconds: 5
failureThreshold: {{ .failures | default 3 }}
{{- end }}

{{/*
Where the tier DaemonSet runs. placement: workers: on every node a worker class may run on
(one node-affinity term per class, from its nodeSelector and required node affinity; a class
with neither runs anywhere, and so does the tier) with every class's tolerations.
*/}}
{{- define "wicore.tierPlacement" -}}
{{- if eq .Values.tier.placement "custom" }}
{{- with .Values.tier.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tier.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tier.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- else }}
{{- $terms := list }}
{{- $anywhere := false }}
{{- $tolerations := list }}
{{- range $class := .Values.workers }}
{{- $exprs := list }}
{{- range $key, $value := ((get $class "nodeSelector") | default dict) }}
{{- $exprs = append $exprs (dict "key" $key "operator" "In" "values" (list $value)) }}
{{- end }}
{{- $classTerms := dig "nodeAffinity" "requiredDuringSchedulingIgnoredDuringExecution" "nodeSelectorTerms" list ((get $class "affinity") | default dict) }}
{{- if $classTerms }}
{{- range $term := $classTerms }}
{{- $copy := deepCopy $term }}
{{- $_ := set $copy "matchExpressions" (concat ((get $copy "matchExpressions") | default list) $exprs) }}
{{- $terms = append $terms $copy }}
{{- end }}
{{- else if $exprs }}
{{- $terms = append $terms (dict "matchExpressions" $exprs) }}
{{- else }}
{{- $anywhere = true }}
{{- end }}
{{- range $toleration := ((get $class "tolerations") | default list) }}
{{- if not (has $toleration $tolerations) }}
{{- $tolerations = append $tolerations $toleration }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $terms (not $anywhere) }}
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        {{- toYaml $terms | nindent 8 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
