{{/* ---------------------------------------------------------------- names */}}

{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of a component's objects: dict "ctx" $ "component" "web". */}}
{{- define "parley.componentName" -}}
{{- printf "%s-%s" (include "parley.fullname" .ctx | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "parley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the chart manages (generated and given-as-value secrets). */}}
{{- define "parley.secretName" -}}
{{- include "parley.fullname" . -}}
{{- end -}}

{{/* --------------------------------------------------------------- labels */}}

{{/* dict "ctx" $ "component" "web" */}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ include "parley.chart" .ctx }}
{{ include "parley.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: parley
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* metadata: name, namespace, labels, annotations of an object. */}}
{{- define "parley.metadata" -}}
name: {{ .name | default (include "parley.componentName" .) }}
namespace: {{ .ctx.Release.Namespace }}
labels:
  {{- include "parley.labels" . | nindent 2 }}
{{- $annotations := merge (deepCopy (.annotations | default dict)) (deepCopy (.ctx.Values.commonAnnotations | default dict)) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Components whose pods talk to Postgres and Redis. */}}
{{- define "parley.appComponents" -}}
[web, realtime, worker, migrate, test]
{{- end -}}

{{/* ---------------------------------------------------------------- image */}}

{{- define "parley.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if .Values.image.registry -}}{{- $repo = printf "%s/%s" .Values.image.registry $repo -}}{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------- public URLs */}}

{{- define "parley.scheme" -}}
{{- if .Values.config.tls -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- define "parley.publicUrl" -}}
{{- if .Values.config.publicUrl -}}
{{- .Values.config.publicUrl -}}
{{- else -}}
{{- printf "%s://%s" (include "parley.scheme" .) (first .Values.config.hosts | default "localhost") -}}
{{- end -}}
{{- end -}}

{{/* Public hosts plus in-cluster Service names; the pod IP is added in the pod's env. */}}
{{- define "parley.allowedHosts" -}}
{{- $hosts := concat .Values.config.hosts .Values.config.extraAllowedHosts -}}
{{- range $component := list "web" "realtime" -}}
{{- $svc := include "parley.componentName" (dict "ctx" $ "component" $component) -}}
{{- $hosts = concat $hosts (list $svc (printf "%s.%s.svc" $svc $.Release.Namespace) (printf "%s.%s.svc.%s" $svc $.Release.Namespace $.Values.clusterDomain)) -}}
{{- end -}}
{{- $hosts | uniq | join "," -}}
{{- end -}}

{{- define "parley.csrfTrustedOrigins" -}}
{{- $origins := list -}}
{{- range .Values.config.hosts -}}
{{- $origins = append $origins (printf "%s://%s" (include "parley.scheme" $) .) -}}
{{- end -}}
{{- concat $origins .Values.config.extraCsrfTrustedOrigins | uniq | join "," -}}
{{- end -}}

{{/* -------------------------------------------------------------- secrets */}}

{{/*
The data of the chart's Secret, base64-encoded, as YAML. Computed once per render (kept in
.Values.__parleySecretData) so that the migration hook's copy holds the same values, and
read back from the live Secret with `lookup`, so that generated values survive upgrades.
Rendering without a cluster (helm template, --dry-run) generates new ones each time.
*/}}
{{- define "parley.secretData" -}}
{{- if not (hasKey .Values "__parleySecretData") -}}
{{- $live := dict -}}
{{- $found := lookup "v1" "Secret" .Release.Namespace (include "parley.secretName" .) -}}
{{- if and $found (hasKey $found "data") -}}{{- $live = $found.data | default dict -}}{{- end -}}
{{- $data := dict -}}
{{- if not .Values.secretKey.existingSecret -}}
{{- $_ := set $data "secret-key" (get $live "secret-key" | default (randAlphaNum 64 | b64enc)) -}}
{{- end -}}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.existingSecret) -}}
{{- $_ := set $data "postgres-password" (get $live "postgres-password" | default (randAlphaNum 32 | b64enc)) -}}
{{- end -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) -}}
{{- $_ := set $data "redis-password" (get $live "redis-password" | default (randAlphaNum 32 | b64enc)) -}}
{{- end -}}
{{- if and .Values.externalDatabase.url (not .Values.externalDatabase.existingSecret) -}}
{{- $_ := set $data "database-url" (.Values.externalDatabase.url | b64enc) -}}
{{- end -}}
{{- if and .Values.externalRedis.url (not .Values.externalRedis.existingSecret) -}}
{{- $_ := set $data "redis-url" (.Values.externalRedis.url | b64enc) -}}
{{- end -}}
{{- if and .Values.externalRedis.channelLayer.urls (not .Values.externalRedis.channelLayer.existingSecret) -}}
{{- $_ := set $data "channel-layer-url" (join "," .Values.externalRedis.channelLayer.urls | b64enc) -}}
{{- end -}}
{{- if and .Values.externalRedis.broker.url (not .Values.externalRedis.broker.existingSecret) -}}
{{- $_ := set $data "celery-broker-url" (.Values.externalRedis.broker.url | b64enc) -}}
{{- end -}}
{{- if and .Values.email.url (not .Values.email.existingSecret) -}}
{{- $_ := set $data "email-url" (.Values.email.url | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "__parleySecretData" $data -}}
{{- end -}}
{{- $data := get .Values "__parleySecretData" -}}
{{- if $data -}}{{- toYaml $data -}}{{- end -}}
{{- end -}}

{{/* A secretKeyRef: dict "existing" NAME "existingKey" KEY "secret" CHART-SECRET "key" KEY */}}
{{- define "parley.secretKeyRef" -}}
secretKeyRef:
  name: {{ .existing | default .secret }}
  key: {{ ternary .existingKey .key (not (empty .existing)) }}
{{- end -}}

{{/*
The environment every Parley container shares: dict "ctx" $ "secret" CHART-SECRET-NAME.
Non-secret settings come from the ConfigMap (envFrom); `$(VAR)` references below expand
against it.
*/}}
{{- define "parley.env" -}}
{{- $ := .ctx -}}
{{- $secret := .secret -}}
{{- $v := $.Values -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: PARLEY_NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
# Kubelet probes and Prometheus address pods by IP: Django must accept that Host.
- name: ALLOWED_HOSTS
  value: "$(PARLEY_PUBLIC_HOSTS),$(POD_IP)"
- name: SECRET_KEY
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.secretKey.existingSecret "existingKey" $v.secretKey.existingSecretKey "secret" $secret "key" "secret-key") | nindent 4 }}
{{- if $v.postgresql.enabled }}
# libpq reads PGPASSWORD, so the password needs no URL-encoding.
- name: PGPASSWORD
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.postgresql.auth.existingSecret "existingKey" $v.postgresql.auth.existingSecretKey "secret" $secret "key" "postgres-password") | nindent 4 }}
- name: DATABASE_URL
  value: {{ printf "postgres://%s@%s:5432/%s" $v.postgresql.auth.username (include "parley.componentName" (dict "ctx" $ "component" "postgresql")) $v.postgresql.auth.database | quote }}
{{- else if or $v.externalDatabase.existingSecret $v.externalDatabase.url }}
- name: DATABASE_URL
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.externalDatabase.existingSecret "existingKey" $v.externalDatabase.existingSecretKey "secret" $secret "key" "database-url") | nindent 4 }}
{{- end }}
{{- if $v.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.redis.auth.existingSecret "existingKey" $v.redis.auth.existingSecretKey "secret" $secret "key" "redis-password") | nindent 4 }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "parley.componentName" (dict "ctx" $ "component" "redis")) | quote }}
{{- else if or $v.externalRedis.existingSecret $v.externalRedis.url }}
- name: REDIS_URL
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.externalRedis.existingSecret "existingKey" $v.externalRedis.existingSecretKey "secret" $secret "key" "redis-url") | nindent 4 }}
{{- end }}
{{- if or $v.externalRedis.channelLayer.existingSecret $v.externalRedis.channelLayer.urls }}
- name: CHANNEL_LAYER_URL
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.externalRedis.channelLayer.existingSecret "existingKey" $v.externalRedis.channelLayer.existingSecretKey "secret" $secret "key" "channel-layer-url") | nindent 4 }}
{{- end }}
{{- if $v.externalRedis.channelLayer.sentinel.existingSecret }}
- name: CHANNEL_LAYER_SENTINEL_PASSWORD
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.externalRedis.channelLayer.sentinel.existingSecret "existingKey" $v.externalRedis.channelLayer.sentinel.existingSecretKey "secret" $secret "key" "channel-layer-sentinel-password") | nindent 4 }}
{{- end }}
{{- if or $v.externalRedis.broker.existingSecret $v.externalRedis.broker.url }}
- name: CELERY_BROKER_URL
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.externalRedis.broker.existingSecret "existingKey" $v.externalRedis.broker.existingSecretKey "secret" $secret "key" "celery-broker-url") | nindent 4 }}
{{- end }}
{{- if or $v.email.existingSecret $v.email.url }}
- name: EMAIL_URL
  valueFrom:
    {{- include "parley.secretKeyRef" (dict "existing" $v.email.existingSecret "existingKey" $v.email.existingSecretKey "secret" $secret "key" "email-url") | nindent 4 }}
{{- end }}
{{- end -}}

{{/* dict "ctx" $ "configMap" NAME (default: the chart's ConfigMap) */}}
{{- define "parley.envFrom" -}}
- configMapRef:
    name: {{ .configMap | default (include "parley.fullname" .ctx) }}
{{- with .ctx.Values.config.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------- pod spec */}}

{{/* checksum/config and checksum/secret: a changed setting rolls the pods. */}}
{{- define "parley.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "parley.secretData" . | sha256sum }}
{{- end -}}

{{- define "parley.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "parley.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{- define "parley.tmpVolume" -}}
- name: tmp
  emptyDir:
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end -}}

{{- define "parley.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Scheduling of a component: dict "ctx" $ "component" "web" "values" .Values.web */}}
{{- define "parley.scheduling" -}}
{{- $ := .ctx -}}
{{- $component := .component -}}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if $.Values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range $key, $when := dict "kubernetes.io/hostname" $.Values.topologySpread.nodes "topology.kubernetes.io/zone" $.Values.topologySpread.zones }}
  - topologyKey: {{ $key }}
    maxSkew: 1
    whenUnsatisfiable: {{ $when }}
    labelSelector:
      matchLabels:
        {{- include "parley.selectorLabels" (dict "ctx" $ "component" $component) | nindent 8 }}
    # Spread each rollout's pods, not old and new together.
    matchLabelKeys:
      - pod-template-hash
  {{- end }}
{{- end }}
{{- end -}}

{{/* A probe: dict "handler" (dict ...) "timings" .Values.web.livenessProbe */}}
{{- define "parley.probe" -}}
{{- toYaml (merge (deepCopy .handler) (deepCopy .timings)) -}}
{{- end -}}

{{/* The `parley migrate` container (hook Job or init container):
dict "ctx" $ "secret" SECRET-NAME "configMap" CONFIGMAP-NAME */}}
{{- define "parley.migrateContainer" -}}
{{- $ := .ctx -}}
- name: migrate
  image: {{ include "parley.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  args:
    - migrate
    - --noinput
    {{- with $.Values.migrations.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  envFrom:
    {{- include "parley.envFrom" (dict "ctx" $ "configMap" .configMap) | nindent 4 }}
  env:
    {{- include "parley.env" (dict "ctx" $ "secret" .secret) | nindent 4 }}
    - name: DB_POOL
      value: "false"
  resources:
    {{- toYaml $.Values.migrations.resources | nindent 4 }}
  securityContext:
    {{- include "parley.containerSecurityContext" $ | nindent 4 }}
  volumeMounts:
    {{- include "parley.tmpVolumeMount" $ | nindent 4 }}
{{- end -}}

{{/* Init containers of a Deployment (migrations in initContainer mode). */}}
{{- define "parley.initContainers" -}}
{{- if and .Values.migrations.enabled (eq .Values.migrations.mode "initContainer") }}
initContainers:
  {{- include "parley.migrateContainer" (dict "ctx" . "secret" (include "parley.secretName" .)) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------ validation */}}

{{- define "parley.validate" -}}
{{- if and .Values.postgresql.enabled (or .Values.externalDatabase.url .Values.externalDatabase.existingSecret) -}}
{{- fail "postgresql.enabled and externalDatabase.* both set: choose one database" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) -}}
{{- fail "redis.enabled and externalRedis.url/existingSecret both set: choose one Redis" -}}
{{- end -}}
{{- if lt (int .Values.realtime.drain.hardLimitSeconds) (int .Values.realtime.drain.seconds) -}}
{{- fail "realtime.drain.hardLimitSeconds must be at least realtime.drain.seconds" -}}
{{- end -}}
{{- $rt := .Values.realtime -}}
{{- if and $rt.terminationGracePeriodSeconds (le (int $rt.terminationGracePeriodSeconds) (add $rt.drain.preStopSleepSeconds $rt.drain.hardLimitSeconds | int)) -}}
{{- fail "realtime.terminationGracePeriodSeconds must exceed realtime.drain.preStopSleepSeconds + realtime.drain.hardLimitSeconds, or the kubelet kills sockets before they are drained" -}}
{{- end -}}
{{- $web := .Values.web -}}
{{- if and $web.terminationGracePeriodSeconds (le (int $web.terminationGracePeriodSeconds) (add $web.preStopSleepSeconds $web.gracefulTimeoutSeconds | int)) -}}
{{- fail "web.terminationGracePeriodSeconds must exceed web.preStopSleepSeconds + web.gracefulTimeoutSeconds" -}}
{{- end -}}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) -}}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" -}}
{{- end -}}
{{- if and (or .Values.ingress.enabled .Values.httpRoute.enabled) (not .Values.config.hosts) -}}
{{- fail "an Ingress or HTTPRoute needs config.hosts" -}}
{{- end -}}
{{- end -}}

{{- define "parley.realtimeTerminationGrace" -}}
{{- $rt := .Values.realtime -}}
{{- $rt.terminationGracePeriodSeconds | default (add $rt.drain.preStopSleepSeconds $rt.drain.hardLimitSeconds 5) -}}
{{- end -}}

{{- define "parley.webTerminationGrace" -}}
{{- $web := .Values.web -}}
{{- $web.terminationGracePeriodSeconds | default (add $web.preStopSleepSeconds $web.gracefulTimeoutSeconds 5) -}}
{{- end -}}

{{/* ------------------------------------------------------ HPA, PDB per component */}}

{{/* dict "ctx" $ "component" "web" "values" .Values.web */}}
{{- define "parley.hpa" -}}
{{- $ := .ctx -}}
{{- $a := .values.autoscaling -}}
{{- if $a.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  {{- include "parley.metadata" (dict "ctx" $ "component" .component) | nindent 2 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "parley.componentName" (dict "ctx" $ "component" .component) }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  # Several metrics: the HPA follows whichever asks for the most replicas.
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- if $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- end }}
    {{- if and $a.connections $a.connections.enabled }}
    - type: Pods
      pods:
        metric:
          name: {{ $a.connections.metricName }}
        target:
          type: AverageValue
          averageValue: {{ $a.connections.averageValue | quote }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* A PDB only when more than one replica runs: with one, it would block node drains. */}}
{{- define "parley.pdb" -}}
{{- $ := .ctx -}}
{{- $v := .values -}}
{{- $replicas := ternary $v.autoscaling.minReplicas $v.replicaCount $v.autoscaling.enabled | int -}}
{{- if and $v.pdb.create (gt $replicas 1) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  {{- include "parley.metadata" (dict "ctx" $ "component" .component) | nindent 2 }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "parley.selectorLabels" (dict "ctx" $ "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Ingress to web or realtime: from the ingress controller, Prometheus, `helm test` and
the load test. */}}
{{- define "parley.servingNetworkPolicy" -}}
{{- $ := .ctx -}}
{{- $np := $.Values.networkPolicy }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  {{- include "parley.metadata" (dict "ctx" $ "component" .component) | nindent 2 }}
spec:
  podSelector:
    matchLabels:
      {{- include "parley.selectorLabels" (dict "ctx" $ "component" .component) | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    {{- if $np.ingressFrom }}
    - from:
        {{- toYaml $np.ingressFrom | nindent 8 }}
      ports:
        - port: http
          protocol: TCP
    {{- end }}
    {{- if $np.metricsFrom }}
    - from:
        {{- toYaml $np.metricsFrom | nindent 8 }}
      ports:
        - port: http
          protocol: TCP
    {{- end }}
    - from:
        - podSelector:
            matchLabels:
              {{- include "parley.selectorLabels" (dict "ctx" $ "component" "test") | nindent 14 }}
      ports:
        - port: http
          protocol: TCP
    {{- if $.Values.loadtest.enabled }}
    # The load test's pods call the Services directly (loadtest.host empty).
    - from:
        - podSelector:
            matchLabels:
              {{- include "parley.selectorLabels" (dict "ctx" $ "component" "loadtest") | nindent 14 }}
      ports:
        - port: http
          protocol: TCP
    {{- end }}
{{- end -}}

{{/* The in-cluster Postgres or Redis accepts Parley's own pods only. */}}
{{- define "parley.datastoreNetworkPolicy" -}}
{{- $ := .ctx }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  {{- include "parley.metadata" (dict "ctx" $ "component" .component) | nindent 2 }}
spec:
  podSelector:
    matchLabels:
      {{- include "parley.selectorLabels" (dict "ctx" $ "component" .component) | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- include "parley.selectorLabels" (dict "ctx" $) | nindent 14 }}
            matchExpressions:
              - key: app.kubernetes.io/component
                operator: In
                values: {{ include "parley.appComponents" $ }}
      ports:
        - port: {{ .port }}
          protocol: TCP
{{- end -}}

{{/* ------------------------------------------------------------ load test */}}

{{/* Object names of the load test: dict "ctx" $ "suffix" "loadtest-master" (at most 15 characters). */}}
{{- define "parley.loadtestName" -}}
{{- printf "%s-%s" (include "parley.fullname" .ctx | trunc 47 | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "parley.loadtestImage" -}}
{{- $img := .Values.loadtest.image -}}
{{- $repo := $img.repository -}}
{{- $registry := $img.registry | default .Values.image.registry -}}
{{- if $registry -}}{{- $repo = printf "%s/%s" $registry $repo -}}{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo ($img.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* The URL Locust's HTTP users call: loadtest.host, or the web Service. */}}
{{- define "parley.loadtestHost" -}}
{{- if .Values.loadtest.host -}}
{{- .Values.loadtest.host -}}
{{- else -}}
{{- printf "http://%s:%v" (include "parley.componentName" (dict "ctx" $ "component" "web")) .Values.web.service.port -}}
{{- end -}}
{{- end -}}

{{/* The WebSocket URL: loadtest.wsUrl; the realtime Service when host is in-cluster too;
otherwise empty (the locustfile derives it from the host: same origin, /ws/chat/). */}}
{{- define "parley.loadtestWsUrl" -}}
{{- if .Values.loadtest.wsUrl -}}
{{- .Values.loadtest.wsUrl -}}
{{- else if not .Values.loadtest.host -}}
{{- printf "ws://%s:%v/ws/chat/" (include "parley.componentName" (dict "ctx" $ "component" "realtime")) .Values.realtime.service.port -}}
{{- end -}}
{{- end -}}

{{/* Ports of loadtest.host and loadtest.wsUrl that are set (external URLs), as a list. */}}
{{- define "parley.loadtestExternalPorts" -}}
{{- $ports := list -}}
{{- range $url := list .Values.loadtest.host .Values.loadtest.wsUrl -}}
{{- if $url -}}
{{- $u := urlParse $url -}}
{{- $port := ternary "443" "80" (has $u.scheme (list "https" "wss")) -}}
{{- if regexMatch ":[0-9]+$" $u.host -}}{{- $port = regexFind "[0-9]+$" $u.host -}}{{- end -}}
{{- $ports = append $ports (int $port) -}}
{{- end -}}
{{- end -}}
{{- $ports | uniq | toJson -}}
{{- end -}}

{{/* The Locust options of a run, for the master or the standalone pod. */}}
{{- define "parley.loadtestRunArgs" -}}
{{- $lt := .Values.loadtest -}}
- --headless
- --locustfile
- /app/loadtests/locustfile.py
- --host
- {{ include "parley.loadtestHost" . | quote }}
{{- with include "parley.loadtestWsUrl" . }}
- --ws-url
- {{ . | quote }}
{{- end }}
{{- if and (not $lt.host) .Values.config.tls }}
# The Services speak plain HTTP behind the ingress where TLS ends; without this header
# Django would redirect every request to https (SECURE_SSL_REDIRECT).
- --http-header
- "X-Forwarded-Proto: https"
{{- end }}
- --scenario
- {{ $lt.scenario | quote }}
- --users
- {{ $lt.users | quote }}
- --spawn-rate
- {{ $lt.spawnRate | quote }}
- --run-time
- {{ $lt.duration | quote }}
{{- if $lt.usersFile.existingSecret }}
- --users-file
- /etc/parley-loadtest/users.json
{{- end }}
# Locust's CSV files and the chat figures' JSON go to /tmp (the root is read-only);
# both are also printed at the end, for `kubectl logs`.
- --csv
- /tmp/locust
- --results-dir
- /tmp/parley-loadtest
{{- if $lt.onlySummary }}
- --only-summary
{{- end }}
{{- with $lt.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
A load-test Job: dict "ctx" $ "role" master|worker|standalone "args" (list ...)
"resources" (dict ...) "completions" N.
*/}}
{{- define "parley.loadtestJob" -}}
{{- $ := .ctx -}}
{{- $lt := $.Values.loadtest -}}
{{- $name := include "parley.loadtestName" (dict "ctx" $ "suffix" (ternary "loadtest" (printf "loadtest-%s" .role) (eq .role "standalone"))) }}
apiVersion: batch/v1
kind: Job
metadata:
  {{- include "parley.metadata" (dict "ctx" $ "component" "loadtest" "name" $name) | nindent 2 }}
spec:
  {{- if gt (int .completions) 1 }}
  completions: {{ .completions }}
  parallelism: {{ .completions }}
  {{- end }}
  backoffLimit: {{ $lt.backoffLimit }}
  activeDeadlineSeconds: {{ $lt.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $lt.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "parley.labels" (dict "ctx" $ "component" "loadtest") | nindent 8 }}
        parley.io/loadtest-role: {{ .role }}
        {{- with $lt.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $lt.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "parley.serviceAccountName" $ }}
      automountServiceAccountToken: false
      {{- with $.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- include "parley.podSecurityContext" $ | nindent 8 }}
      {{- include "parley.scheduling" (dict "ctx" $ "component" "loadtest" "values" $lt) | trim | nindent 6 }}
      containers:
        - name: locust
          image: {{ include "parley.loadtestImage" $ }}
          imagePullPolicy: {{ $lt.image.pullPolicy }}
          args:
            {{- .args | nindent 12 }}
          {{- if eq .role "master" }}
          ports:
            - name: locust
              containerPort: 5557
              protocol: TCP
          {{- end }}
          resources:
            {{- toYaml .resources | nindent 12 }}
          securityContext:
            {{- include "parley.containerSecurityContext" $ | nindent 12 }}
          volumeMounts:
            {{- include "parley.tmpVolumeMount" $ | nindent 12 }}
            {{- if $lt.usersFile.existingSecret }}
            - name: users
              mountPath: /etc/parley-loadtest
              readOnly: true
            {{- end }}
      volumes:
        {{- include "parley.tmpVolume" $ | nindent 8 }}
        {{- if $lt.usersFile.existingSecret }}
        # Workers read the path the master names, so every pod mounts the same file.
        - name: users
          secret:
            secretName: {{ $lt.usersFile.existingSecret }}
            items:
              - key: {{ $lt.usersFile.existingSecretKey }}
                path: users.json
        {{- end }}
{{- end -}}
