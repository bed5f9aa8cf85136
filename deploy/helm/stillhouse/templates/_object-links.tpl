{{/* The URL (scheme, host, optional port) presigned download links are signed for: objectStore.publicEndpoint,
else the MinIO Ingress's host when the chart's MinIO has one; empty: the services' own endpoint. */}}
{{- define "stillhouse.objectStorePublicEndpoint" -}}
{{- if .Values.objectStore.publicEndpoint }}
{{- .Values.objectStore.publicEndpoint }}
{{- else if and .Values.minio.enabled .Values.minio.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" (not (empty .Values.minio.ingress.tls))) (required "minio.ingress.host is required when minio.ingress.enabled is true" .Values.minio.ingress.host) }}
{{- end }}
{{- end }}
