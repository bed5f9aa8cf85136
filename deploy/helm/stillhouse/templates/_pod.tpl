{{/*
Integration settings every pod of the chart takes: `podDefaults` for all, each workload's own values
over them. Scalars and `affinity` / `topologySpreadConstraints`: the workload's if set, else the
default; `podLabels` / `podAnnotations`: merged (the workload's win); `extraVolumes`,
`extraVolumeMounts`, `extraEnv`, `extraEnvFrom`: the defaults' entries, then the workload's.
Every helper takes (dict "root" $ "component" "teacher" "values" .Values.teacher).
*/}}

{{/* The effective settings of one workload, as JSON. */}}
{{- define "stillhouse.podSettings" -}}
{{- $defaults := .root.Values.podDefaults }}
{{- $own := .values }}
{{- $settings := dict }}
{{- range $key := list "runtimeClassName" "priorityClassName" "affinity" "topologySpreadConstraints" }}
{{- $_ := set $settings $key (default (index $defaults $key) (index $own $key)) }}
{{- end }}
{{- range $key := list "podLabels" "podAnnotations" }}
{{- $_ := set $settings $key (mergeOverwrite (deepCopy (default dict (index $defaults $key))) (default dict (index $own $key))) }}
{{- end }}
{{- range $key := list "extraVolumes" "extraVolumeMounts" "extraEnv" "extraEnvFrom" }}
{{- $_ := set $settings $key (default list (concat (default list (index $defaults $key)) (default list (index $own $key)))) }}
{{- end }}
{{- toJson $settings }}
{{- end }}

{{/* Labels and annotations of a pod template; the chart's labels win over `podLabels`, and the
template's own annotations (dict key "annotations") over `podAnnotations`. */}}
{{- define "stillhouse.podMetadata" -}}
{{- $settings := include "stillhouse.podSettings" . | fromJson }}
{{- $labels := mergeOverwrite $settings.podLabels (include "stillhouse.componentLabels" . | fromYaml) }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with mergeOverwrite $settings.podAnnotations (default dict .annotations) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where a pod runs: runtime and priority class, node selector, tolerations, affinity, and its spread
constraints — the chart's own one for Deployments (dict key "spread": true, `topologySpread`), then
`topologySpreadConstraints`, whose entries without a labelSelector select the workload's pods. */}}
{{- define "stillhouse.scheduling" -}}
{{- $settings := include "stillhouse.podSettings" . | fromJson }}
{{- $selector := dict "matchLabels" (include "stillhouse.selectorLabels" . | fromYaml) }}
{{- with $settings.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $settings.priorityClassName }}
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
{{- with $settings.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $constraints := list }}
{{- $spread := .root.Values.topologySpread }}
{{- if and .spread $spread.enabled }}
{{- $constraints = append $constraints (dict "topologyKey" $spread.topologyKey "maxSkew" $spread.maxSkew "whenUnsatisfiable" $spread.whenUnsatisfiable) }}
{{- end }}
{{- $constraints = concat $constraints $settings.topologySpreadConstraints }}
{{- with $constraints }}
topologySpreadConstraints:
  {{- range . }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" $selector)) | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Extra entries of a container's `env` list (after the chart's own). */}}
{{- define "stillhouse.extraEnv" -}}
{{- with (include "stillhouse.podSettings" . | fromJson).extraEnv }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* A container's `envFrom`, when there is any. */}}
{{- define "stillhouse.envFrom" -}}
{{- with (include "stillhouse.podSettings" . | fromJson).extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Extra entries of a container's `volumeMounts` list. */}}
{{- define "stillhouse.extraVolumeMounts" -}}
{{- with (include "stillhouse.podSettings" . | fromJson).extraVolumeMounts }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Extra entries of a pod's `volumes` list. */}}
{{- define "stillhouse.extraVolumes" -}}
{{- with (include "stillhouse.podSettings" . | fromJson).extraVolumes }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* A ServiceAccount's annotations: `serviceAccount.annotations`, then the component's entry of
`serviceAccount.componentAnnotations` (IRSA, Workload Identity). (dict "root" $ "component" "trainer") */}}
{{- define "stillhouse.serviceAccountAnnotations" -}}
{{- $accounts := .root.Values.serviceAccount }}
{{- with mergeOverwrite (deepCopy $accounts.annotations) (default dict (index $accounts.componentAnnotations .component)) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
