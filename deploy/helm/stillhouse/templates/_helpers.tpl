{{/* Names, labels and the pieces every Stillhouse pod shares. */}}

{{- define "stillhouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix, short enough for every suffix used below (longest: "-ray-head-svc"). */}}
{{- define "stillhouse.fullname" -}}
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

{{- define "stillhouse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "stillhouse.labels" -}}
helm.sh/chart: {{ include "stillhouse.chart" . }}
app.kubernetes.io/name: {{ include "stillhouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stillhouse
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "teacher"). */}}
{{- define "stillhouse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stillhouse.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects and pods. */}}
{{- define "stillhouse.componentLabels" -}}
{{ include "stillhouse.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A NetworkPolicy peer: the pods of one component of this release. */}}
{{- define "stillhouse.peer" -}}
- podSelector:
    matchLabels:
      {{- include "stillhouse.selectorLabels" . | nindent 6 }}
{{- end }}

{{- define "stillhouse.image" -}}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "stillhouse.rayImage" -}}
{{- $image := .Values.rayCluster.image }}
{{- printf "%s/%s:%s" $image.registry $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "stillhouse.serviceAccountName" -}}
{{- printf "%s-%s" (include "stillhouse.fullname" .root) .component }}
{{- end }}

{{/* Names of Secrets and in-cluster addresses. */}}
{{- define "stillhouse.apiTokensSecret" -}}
{{- default (printf "%s-api-tokens" (include "stillhouse.fullname" .)) .Values.controlPlane.apiTokens.existingSecret }}
{{- end }}

{{/* The Secret holding the principals file; empty when there is none. */}}
{{- define "stillhouse.principalsSecret" -}}
{{- $principals := .Values.controlPlane.principals }}
{{- if $principals.existingSecret }}
{{- $principals.existingSecret }}
{{- else if $principals.file }}
{{- printf "%s-principals" (include "stillhouse.fullname" .) }}
{{- end }}
{{- end }}

{{- define "stillhouse.serviceTokenSecret" -}}
{{- default (printf "%s-service-token" (include "stillhouse.fullname" .)) .Values.serviceToken.existingSecret }}
{{- end }}

{{- define "stillhouse.minioSecret" -}}
{{- default (printf "%s-minio" (include "stillhouse.fullname" .)) .Values.minio.existingSecret }}
{{- end }}

{{- define "stillhouse.postgresqlSecret" -}}
{{- default (printf "%s-postgresql" (include "stillhouse.fullname" .)) .Values.postgresql.existingSecret }}
{{- end }}

{{- define "stillhouse.teacherApiKeysSecret" -}}
{{- printf "%s-teacher-api-keys" (include "stillhouse.fullname" .) }}
{{- end }}

{{- define "stillhouse.rayClusterName" -}}
{{- printf "%s-ray" (include "stillhouse.fullname" .) }}
{{- end }}

{{- define "stillhouse.rayAuthSecret" -}}
{{- printf "%s-ray-auth" (include "stillhouse.fullname" .) }}
{{- end }}

{{- define "stillhouse.rayAddress" -}}
{{- if .Values.rayCluster.enabled }}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "stillhouse.rayClusterName" .) .Release.Namespace }}
{{- else }}
{{- required "trainer.externalRayAddress is required when rayCluster.enabled is false" .Values.trainer.externalRayAddress }}
{{- end }}
{{- end }}

{{- define "stillhouse.serviceAddress" -}}
{{- $values := index .root.Values .component }}
{{- printf "%s-%s:%v" (include "stillhouse.fullname" .root) .component $values.port }}
{{- end }}

{{/* host:port and port of the S3 API the services use. */}}
{{- define "stillhouse.objectStoreEndpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "%s-minio:%v" (include "stillhouse.fullname" .) .Values.minio.port }}
{{- else }}
{{- .Values.objectStore.external.endpoint }}
{{- end }}
{{- end }}

{{- define "stillhouse.externalObjectStorePort" -}}
{{- $endpoint := .Values.objectStore.external.endpoint }}
{{- if contains ":" $endpoint }}
{{- splitList ":" $endpoint | last }}
{{- else if .Values.objectStore.external.secure }}443{{ else }}80{{ end }}
{{- end }}

{{/* STILLHOUSE_<PREFIX>_OBJECT_STORE__* of a service: (dict "root" $ "prefix" "TEACHER"). */}}
{{- define "stillhouse.objectStoreEnv" -}}
{{- $root := .root }}
{{- $var := printf "STILLHOUSE_%s_OBJECT_STORE__" .prefix }}
- name: {{ $var }}BACKEND
  value: s3
- name: {{ $var }}BUCKET
  value: {{ $root.Values.objectStore.bucket | quote }}
- name: {{ $var }}ENDPOINT
  value: {{ include "stillhouse.objectStoreEndpoint" $root | quote }}
{{- if $root.Values.minio.enabled }}
- name: {{ $var }}SECURE
  value: "false"
{{- else }}
- name: {{ $var }}SECURE
  value: {{ $root.Values.objectStore.external.secure | quote }}
{{- with $root.Values.objectStore.external.region }}
- name: {{ $var }}REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if include "stillhouse.objectStoreKeysFromEnvironment" $root }}
- name: {{ $var }}CREDENTIALS
  value: environment
{{- end }}
{{ include "stillhouse.objectStoreKeyEnv" (dict "root" $root "access" (printf "%sACCESS_KEY" $var) "secret" (printf "%sSECRET_KEY" $var)) }}
{{- end }}

{{/* Two variables with the object store's keys, from its Secret: (dict "root" $ "access" NAME "secret" NAME). */}}
{{- define "stillhouse.objectStoreKeyEnv" -}}
{{- $root := .root }}
{{- if not (include "stillhouse.objectStoreKeysFromEnvironment" $root) }}
{{- $external := $root.Values.objectStore.external }}
{{- $secret := ternary (include "stillhouse.minioSecret" $root) $external.existingSecret $root.Values.minio.enabled }}
- name: {{ .access }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "root-user" $external.accessKeyKey $root.Values.minio.enabled }}
- name: {{ .secret }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "root-password" $external.secretKeyKey $root.Values.minio.enabled }}
{{- end }}
{{- end }}

{{/* "true" when an external S3's credentials come from each pod's environment (IRSA); else empty. */}}
{{- define "stillhouse.objectStoreKeysFromEnvironment" -}}
{{- if and (not .Values.minio.enabled) (eq .Values.objectStore.external.credentials "environment") }}true{{ end }}
{{- end }}

{{/* An environment variable holding the database URL, built from Secrets: (dict "root" $ "name" "..."). */}}
{{- define "stillhouse.databaseUrlEnv" -}}
{{- $root := .root }}
{{- if $root.Values.postgresql.enabled }}
- name: STILLHOUSE_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "stillhouse.postgresqlSecret" $root }}
      key: password
- name: {{ .name }}
  value: {{ printf "postgresql://%s:$(STILLHOUSE_DATABASE_PASSWORD)@%s-postgresql:%v/%s" $root.Values.postgresql.username (include "stillhouse.fullname" $root) $root.Values.postgresql.port $root.Values.postgresql.database | quote }}
{{- else }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.externalDatabase.existingSecret }}
      key: {{ $root.Values.externalDatabase.urlKey }}
{{- end }}
{{- end }}

{{/* The Ray auth token, as a file, for a process that submits Ray jobs (the trainer, and the teacher
and prompts services when they fan out). */}}
{{- define "stillhouse.rayAuthTokenFile" -}}/var/run/secrets/stillhouse/ray/auth_token{{- end }}

{{- define "stillhouse.rayAuthVolume" -}}
- name: ray-auth
  secret:
    secretName: {{ include "stillhouse.rayAuthSecret" . }}
    defaultMode: 0440
{{- end }}

{{- define "stillhouse.rayAuthMount" -}}
- name: ray-auth
  mountPath: {{ include "stillhouse.rayAuthTokenFile" . | dir }}
  readOnly: true
{{- end }}

{{- define "stillhouse.rayAuthEnv" -}}
{{- if .Values.rayCluster.authToken }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "stillhouse.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- end }}

{{/* The teacher's own settings (besides the object store and models): answer cache, rate-limit
storage, API keys, egress allow-list. The teacher service and the CPU workers' shards read them. */}}
{{- define "stillhouse.teacherEnv" -}}
{{- $teacher := .Values.teacher }}
{{- include "stillhouse.databaseUrlEnv" (dict "root" . "name" "STILLHOUSE_TEACHER_CACHE_URL") }}
{{- if $teacher.limiterStorageSecret.name }}
- name: STILLHOUSE_TEACHER_LIMITER_STORAGE_URI
  valueFrom:
    secretKeyRef:
      name: {{ $teacher.limiterStorageSecret.name }}
      key: {{ $teacher.limiterStorageSecret.key }}
{{- else }}
- name: STILLHOUSE_TEACHER_LIMITER_STORAGE_URI
  value: {{ $teacher.limiterStorageUri | quote }}
{{- end }}
- name: STILLHOUSE_TEACHER_API_KEY_DIR
  value: {{ include "stillhouse.teacherApiKeysPath" . }}
- name: STILLHOUSE_TEACHER_EGRESS_ALLOW
  value: {{ $teacher.egressAllow | toJson | quote }}
{{- with $teacher.cache.maxAgeDays }}
- name: STILLHOUSE_TEACHER_CACHE_MAX_AGE_DAYS
  value: {{ . | quote }}
{{- end }}
{{- with $teacher.cache.maxEntries }}
- name: STILLHOUSE_TEACHER_CACHE_MAX_ENTRIES
  {{- /* int64: Helm reads YAML numbers as floats, which print as 1e+07 */}}
  value: {{ . | int64 | quote }}
{{- end }}
{{- end }}

{{/* The prompts service's own settings: the teacher it calls to generate prompts. */}}
{{- define "stillhouse.promptsEnv" -}}
- name: STILLHOUSE_PROMPTS_TEACHER_ADDRESS
  value: {{ include "stillhouse.serviceAddress" (dict "root" . "component" "teacher") | quote }}
{{- end }}

{{- define "stillhouse.teacherApiKeysPath" -}}/var/run/secrets/stillhouse/teacher-api-keys{{- end }}

{{/* Every key of `teacher.apiKeys`, each a file of its name. */}}
{{- define "stillhouse.teacherApiKeysVolume" -}}
- name: teacher-api-keys
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ include "stillhouse.teacherApiKeysSecret" . }}
      {{- range .Values.teacher.apiKeys.existingSecrets }}
      - secret:
          name: {{ .secretName }}
          items:
            - key: {{ .key }}
              path: {{ .name }}
      {{- end }}
{{- end }}

{{- define "stillhouse.teacherApiKeysMount" -}}
- name: teacher-api-keys
  mountPath: {{ include "stillhouse.teacherApiKeysPath" . }}
  readOnly: true
{{- end }}

{{/* The service token, as a file, for a Stillhouse process: (dict "root" $ "prefix" "PROMPTS"). */}}
{{- define "stillhouse.serviceTokenEnv" -}}
- name: STILLHOUSE_{{ .prefix }}_SERVICE_TOKEN_FILE
  value: /var/run/secrets/stillhouse/service-token/{{ .root.Values.serviceToken.key }}
{{- end }}

{{- define "stillhouse.serviceTokenVolume" -}}
- name: service-token
  secret:
    secretName: {{ include "stillhouse.serviceTokenSecret" . }}
    defaultMode: 0440
{{- end }}

{{- define "stillhouse.serviceTokenMount" -}}
- name: service-token
  mountPath: /var/run/secrets/stillhouse/service-token
  readOnly: true
{{- end }}

{{/* Mutual TLS of the internal calls (internalTLS.enabled): the files of the mounted Secret as a
process's TLS settings: (dict "prefix" "PROMPTS"). */}}
{{- define "stillhouse.internalTlsEnv" -}}
- name: STILLHOUSE_{{ .prefix }}_TLS_CERT_FILE
  value: /var/run/secrets/stillhouse/internal-tls/tls.crt
- name: STILLHOUSE_{{ .prefix }}_TLS_KEY_FILE
  value: /var/run/secrets/stillhouse/internal-tls/tls.key
- name: STILLHOUSE_{{ .prefix }}_TLS_CA_FILE
  value: /var/run/secrets/stillhouse/internal-tls/ca.crt
{{- end }}

{{- define "stillhouse.internalTlsVolume" -}}
- name: internal-tls
  secret:
    secretName: {{ required "internalTLS.secretName is required when internalTLS.enabled is true" .Values.internalTLS.secretName }}
    defaultMode: 0440
{{- end }}

{{- define "stillhouse.internalTlsMount" -}}
- name: internal-tls
  mountPath: /var/run/secrets/stillhouse/internal-tls
  readOnly: true
{{- end }}

{{/* What a stage service's probes ask: its gRPC health service, with the kubelet's native gRPC probe,
which speaks plaintext only; over mutual TLS, the image's health check, which calls with the pod's own
certificate. (dict "root" $ "component" "teacher" "values" .Values.teacher) */}}
{{- define "stillhouse.grpcProbeHandler" -}}
{{- if .root.Values.internalTLS.enabled -}}
exec:
  command:
    - python
    - /opt/stillhouse/healthcheck.py
    - stillhouse
    - serve
    - {{ .component }}
    - --host={{ .root.Values.listenHost }}
    - --port={{ .values.port }}
{{- else -}}
grpc:
  port: {{ .values.port }}
{{- end }}
{{- end }}

{{/* The writable folders of a read-only Stillhouse container. */}}
{{- define "stillhouse.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.homeSizeLimit }}
{{- end }}

{{- define "stillhouse.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/stillhouse
{{- end }}

{{- define "stillhouse.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Environment of the Ray containers: token auth, no usage reporting, caches on the writable /tmp. */}}
{{- define "stillhouse.rayPodEnv" -}}
{{- include "stillhouse.rayAuthEnv" . }}
{{/* Training and evaluation read and write object storage with these (never passed in a Ray job). */}}
{{ include "stillhouse.objectStoreKeyEnv" (dict "root" . "access" "STILLHOUSE_OBJECT_STORE_ACCESS_KEY" "secret" "STILLHOUSE_OBJECT_STORE_SECRET_KEY") }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HF_HOME
  value: /tmp/cache/huggingface
{{- end }}

{{/* NetworkPolicy rules shared by several components. */}}
{{- define "stillhouse.objectStoreEgress" -}}
{{- if .Values.minio.enabled }}
- to:
    {{- include "stillhouse.peer" (dict "root" $ "component" "minio") | nindent 4 }}
  ports:
    - port: {{ .Values.minio.port }}
      protocol: TCP
{{- else }}
- to:
    {{- toYaml .Values.objectStore.external.networkPolicyTo | nindent 4 }}
  ports:
    - port: {{ include "stillhouse.externalObjectStorePort" . }}
      protocol: TCP
{{- end }}
{{- end }}

{{- define "stillhouse.databaseEgress" -}}
{{- if .Values.postgresql.enabled }}
- to:
    {{- include "stillhouse.peer" (dict "root" $ "component" "postgresql") | nindent 4 }}
  ports:
    - port: {{ .Values.postgresql.port }}
      protocol: TCP
{{- else }}
- to:
    {{- toYaml .Values.externalDatabase.networkPolicyTo | nindent 4 }}
  ports:
    - port: {{ .Values.externalDatabase.port }}
      protocol: TCP
{{- end }}
{{- end }}

{{- define "stillhouse.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.dns -}}
- to:
    {{- toYaml $dns.to | nindent 4 }}
  ports:
    {{- range $dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}

{{/* Where the teacher connects, for the teacher service and the CPU workers' teacher shards: its
answer cache, public addresses (`teacher.egressPublic`) and `teacher.egressTo` (an in-cluster teacher,
the rate limits' Redis). */}}
{{- define "stillhouse.teacherEgress" -}}
{{- include "stillhouse.databaseEgress" . }}
{{- if .Values.teacher.egressPublic }}
- to:
    {{- include "stillhouse.publicPeers" . | nindent 4 }}
{{- end }}
{{- with .Values.teacher.egressTo }}
- to:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{/* The Kubernetes API server, for the Ray autoscaler: `networkPolicy.kubeApiServer.cidrs`, or, when
empty, a rule without peers (any address on the API server's ports). */}}
{{- define "stillhouse.kubeApiServerEgress" -}}
{{- $api := .Values.networkPolicy.kubeApiServer -}}
-
  {{- with $api.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
  ports:
    {{- range $api.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}

{{/* Public addresses, for the teacher: every IPv4 and IPv6 address but link-local (cloud metadata),
loopback and `networkPolicy.privateCidrs`. */}}
{{- define "stillhouse.publicPeers" -}}
{{- $private := .Values.networkPolicy.privateCidrs }}
{{- $v4 := list "169.254.0.0/16" "127.0.0.0/8" }}
{{- $v6 := list "fe80::/10" "::1/128" }}
{{- range $private }}
{{- if contains ":" . }}{{ $v6 = append $v6 . }}{{ else }}{{ $v4 = append $v4 . }}{{ end }}
{{- end -}}
- ipBlock:
    cidr: 0.0.0.0/0
    except:
      {{- toYaml $v4 | nindent 6 }}
- ipBlock:
    cidr: ::/0
    except:
      {{- toYaml $v6 | nindent 6 }}
{{- end }}

{{/* (dict "root" $ "port" 9090) */}}
{{- define "stillhouse.metricsIngress" -}}
- from:
    {{- toYaml .root.Values.networkPolicy.metricsFrom | nindent 4 }}
  ports:
    - port: {{ .port }}
      protocol: TCP
{{- end }}

{{/* A generated Secret value that stays the same on upgrades: the value already in the cluster if
there is one; else one derived from `generatedSecrets.seed`; else, when the render can read the cluster
(helm install, upgrade, --dry-run=server) or `generatedSecrets.withoutCluster` is random, a new random
one; else (helm template, helm lint) the render fails, naming the values that would make it stable.
(dict "root" $ "secret" NAME "key" KEY "length" N "existing" "VALUE NAMING AN EXISTING SECRET") */}}
{{- define "stillhouse.keptValue" -}}
{{- $root := .root }}
{{- $generated := $root.Values.generatedSecrets }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace .secret }}
{{- if and $existing (hasKey (default dict $existing.data) .key) }}
{{- index $existing.data .key | b64dec }}
{{- else if $generated.seed }}
{{- sha256sum (printf "%s\n%s\n%s\n%s" $generated.seed $root.Release.Namespace .secret .key) | trunc (int .length) }}
{{- else if eq $generated.withoutCluster "random" }}
{{- randAlphaNum (int .length) }}
{{- else if lookup "v1" "Secret" $root.Release.Namespace "" }}
{{- /* The cluster answered a list (empty or not): a first install. */}}
{{- randAlphaNum (int .length) }}
{{- else }}
{{- fail (printf "Secret %s (key %s) would get a new random value on every render: this render cannot read the cluster (helm template, helm lint, a client-side dry run) and generatedSecrets.withoutCluster is fail. Set generatedSecrets.seed (e.g. the output of `openssl rand -hex 32`) to derive every generated value from it, or %s." .secret .key .existing) }}
{{- end }}
{{- end }}
