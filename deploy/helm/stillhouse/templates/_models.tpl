{{/* Model weights (models.*): the download cache of s3:// models and the read-only models volume, at the
same paths in the teacher and trainer pods and the Ray pods, since the trainer hands these paths to its
Ray runs. */}}
{{- define "stillhouse.modelsCachePath" -}}/var/cache/stillhouse/models{{- end }}
{{- define "stillhouse.modelsRootPath" -}}/models{{- end }}

{{/* STILLHOUSE_<PREFIX>_MODELS__*: (dict "prefix" "TEACHER"). The root is set even without a models volume,
so that a job's local model path never leads anywhere else in the container. */}}
{{- define "stillhouse.modelsEnv" -}}
- name: STILLHOUSE_{{ .prefix }}_MODELS__CACHE_DIR
  value: {{ include "stillhouse.modelsCachePath" . | quote }}
- name: STILLHOUSE_{{ .prefix }}_MODELS__ROOT
  value: {{ include "stillhouse.modelsRootPath" . | quote }}
{{- end }}

{{- define "stillhouse.modelsVolumes" -}}
- name: models-cache
  {{- if .Values.models.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.cache.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.models.cache.sizeLimit }}
  {{- end }}
{{- with .Values.models.pvc.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "stillhouse.modelsMounts" -}}
- name: models-cache
  mountPath: {{ include "stillhouse.modelsCachePath" . }}
{{- if .Values.models.pvc.existingClaim }}
- name: models
  mountPath: {{ include "stillhouse.modelsRootPath" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The teacher's image: teacher.image where set (a GPU build for a local teacher), else the services' image. */}}
{{- define "stillhouse.teacherImage" -}}
{{- $image := .Values.teacher.image }}
{{- if or $image.repository $image.tag }}
{{- printf "%s/%s:%s" (default .Values.image.registry $image.registry) (default .Values.image.repository $image.repository) (default .Chart.AppVersion (default .Values.image.tag $image.tag)) }}
{{- else }}
{{- include "stillhouse.image" . }}
{{- end }}
{{- end }}
