{{/*
One worker group of the RayCluster: `rayCluster.gpuWorkers`, `rayCluster.cpuWorkers` or an entry of
`rayCluster.additionalWorkerGroups`. Every group's pods but the CPU workers' are Ray workers to the
NetworkPolicies and ServiceAccounts (component ray-worker). (dict "root" $ "name" GROUP "group" VALUES
"where" "rayCluster.gpuWorkers"), and optionally "component" (default ray-worker), "startParams" (`ray
start` parameters the group's own `rayStartParams` override), and "env", "mounts", "volumes" (YAML lists
added to the container's env and volumeMounts and the pod's volumes).
*/}}
{{- define "stillhouse.rayWorkerGroup" -}}
{{- $root := .root }}
{{- $ray := $root.Values.rayCluster }}
{{- $group := .group }}
{{- if or (gt (int $group.minReplicas) (int $group.replicas)) (gt (int $group.replicas) (int $group.maxReplicas)) }}
{{- fail (printf "%s needs minReplicas <= replicas <= maxReplicas (got %v, %v, %v)" .where $group.minReplicas $group.replicas $group.maxReplicas) }}
{{- end }}
{{- $resources := deepCopy $group.resources }}
{{- $gpus := int (default 0 $group.gpusPerWorker) }}
{{- if gt $gpus 0 }}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) (default dict $resources.requests)) }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) (default dict $resources.limits)) }}
{{- end }}
{{- $ctx := dict "root" $root "component" (default "ray-worker" .component) "values" $group }}
{{- $startParams := merge (dict "metrics-export-port" "8080") (deepCopy (default dict $group.rayStartParams)) (default dict .startParams) }}
- groupName: {{ .name }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    {{- toYaml $startParams | nindent 4 }}
  template:
    metadata:
      {{- include "stillhouse.podMetadata" $ctx | nindent 6 }}
    spec:
      serviceAccountName: {{ include "stillhouse.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ray.podSecurityContext | nindent 8 }}
      {{- include "stillhouse.scheduling" $ctx | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "stillhouse.rayImage" $root }}
          imagePullPolicy: {{ $ray.image.pullPolicy }}
          ports:
            - name: metrics
              containerPort: 8080
          env:
            {{- include "stillhouse.rayPodEnv" $root | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "stillhouse.extraEnv" $ctx | nindent 12 }}
          {{- include "stillhouse.envFrom" $ctx | nindent 10 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $ray.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: shared-mem
              mountPath: /dev/shm
            {{- include "stillhouse.modelsMounts" $root | nindent 12 }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "stillhouse.extraVolumeMounts" $ctx | nindent 12 }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 50Gi
        - name: shared-mem
          emptyDir:
            medium: Memory
            sizeLimit: {{ $group.shmSizeLimit }}
        {{- include "stillhouse.modelsVolumes" $root | nindent 8 }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- include "stillhouse.extraVolumes" $ctx | nindent 8 }}
{{- end }}
