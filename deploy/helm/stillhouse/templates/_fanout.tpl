{{/*
Fanning the teacher and prompts stages out over the RayCluster's CPU workers (`rayCluster.cpuWorkers`):
the service submits a Ray job, as the trainer does, whose shards run as Ray tasks on those workers; each
shard builds its own teacher or prompts client from the workers' environment, rendered here from the
same helpers as the services' own.
*/}}

{{/* The custom Ray resource of the CPU workers, one per CPU: a shard task asks for `cpusPerShard` of
it beside as many CPUs. */}}
{{- define "stillhouse.shardCpuResource" -}}stillhouse_shard_cpu{{- end }}

{{/* "true" when the CPU worker group exists and can have a worker: the autoscaler starts them, or
`cpuWorkers.replicas` keeps some; else empty. */}}
{{- define "stillhouse.cpuWorkersRun" -}}
{{- $ray := .Values.rayCluster }}
{{- $workers := $ray.cpuWorkers }}
{{- if and $ray.enabled $workers.enabled (gt (int (ternary $workers.maxReplicas $workers.replicas $ray.autoscaler.enabled)) 0) }}true{{ end }}
{{- end }}

{{/* "true" when a stage service fans its stage out: (dict "root" $ "component" "teacher"); else empty. */}}
{{- define "stillhouse.fansOut" -}}
{{- if and (has .component (list "teacher" "prompts")) (include "stillhouse.cpuWorkersRun" .root) }}
{{- if (index .root.Values .component).fanout.enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when a stage service submits Ray jobs to the chart's RayCluster: the trainer, and a service
that fans out. (dict "root" $ "component" "teacher") */}}
{{- define "stillhouse.submitsRayJobs" -}}
{{- if and .root.Values.rayCluster.enabled (or (eq .component "trainer") (include "stillhouse.fansOut" .)) }}true{{ end }}
{{- end }}

{{/* STILLHOUSE_<SERVICE>_FANOUT__* of a service that fans out: (dict "root" $ "component" "teacher"). */}}
{{- define "stillhouse.fanoutEnv" -}}
{{- $var := printf "STILLHOUSE_%s_FANOUT__" (upper .component) }}
{{- $fanout := (index .root.Values .component).fanout }}
- name: {{ $var }}RAY_ADDRESS
  value: {{ include "stillhouse.rayAddress" .root | quote }}
{{- if .root.Values.rayCluster.authToken }}
- name: {{ $var }}RAY_AUTH_TOKEN_FILE
  value: {{ include "stillhouse.rayAuthTokenFile" .root | quote }}
{{- end }}
- name: {{ $var }}MIN_ROWS
  value: {{ $fanout.minRows | int64 | quote }}
- name: {{ $var }}SHARD_ROWS
  value: {{ $fanout.shardRows | int64 | quote }}
- name: {{ $var }}MAX_PARALLEL_SHARDS
  value: {{ $fanout.maxParallelShards | int64 | quote }}
- name: {{ $var }}CPUS_PER_SHARD
  value: {{ $fanout.cpusPerShard | toString | quote }}
- name: {{ $var }}MAX_RETRIES
  value: {{ $fanout.maxRetries | int64 | quote }}
- name: {{ $var }}SHARD_RESOURCE
  value: {{ include "stillhouse.shardCpuResource" .root | quote }}
{{- end }}

{{/* The environment of the CPU workers: what TeacherSettings() and PromptsSettings() read in a shard.
The prompts shards call the teacher service (prompt generation), as the prompts service does, with the
service token (and the client certificate under internalTLS). */}}
{{- define "stillhouse.cpuWorkerEnv" -}}
{{- $root := . }}
{{- range $component := list "teacher" "prompts" }}
{{- if include "stillhouse.fansOut" (dict "root" $root "component" $component) }}
{{- $prefix := upper $component }}
- name: STILLHOUSE_{{ $prefix }}_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: STILLHOUSE_{{ $prefix }}_LOG_FORMAT
  value: {{ $root.Values.logFormat | quote }}
{{ include "stillhouse.objectStoreEnv" (dict "root" $root "prefix" $prefix) }}
{{- if eq $component "teacher" }}
{{ include "stillhouse.modelsEnv" (dict "prefix" $prefix) }}
{{ include "stillhouse.teacherEnv" $root }}
{{- else }}
{{ include "stillhouse.promptsEnv" $root }}
{{ include "stillhouse.serviceTokenEnv" (dict "root" $root "prefix" $prefix) }}
{{- if $root.Values.internalTLS.enabled }}
{{ include "stillhouse.internalTlsEnv" (dict "prefix" $prefix) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The teacher's API keys for the teacher shards; the service token (and certificate) for the prompts
shards' calls to the teacher service. */}}
{{- define "stillhouse.cpuWorkerMounts" -}}
{{- if include "stillhouse.fansOut" (dict "root" . "component" "teacher") }}
{{ include "stillhouse.teacherApiKeysMount" . }}
{{- end }}
{{- if include "stillhouse.fansOut" (dict "root" . "component" "prompts") }}
{{ include "stillhouse.serviceTokenMount" . }}
{{- if .Values.internalTLS.enabled }}
{{ include "stillhouse.internalTlsMount" . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stillhouse.cpuWorkerVolumes" -}}
{{- if include "stillhouse.fansOut" (dict "root" . "component" "teacher") }}
{{ include "stillhouse.teacherApiKeysVolume" . }}
{{- end }}
{{- if include "stillhouse.fansOut" (dict "root" . "component" "prompts") }}
{{ include "stillhouse.serviceTokenVolume" . }}
{{- if .Values.internalTLS.enabled }}
{{ include "stillhouse.internalTlsVolume" . }}
{{- end }}
{{- end }}
{{- end }}
