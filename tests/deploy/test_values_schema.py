"""values.schema.json (and the chart's own checks) refuse bad values: one case per rule, each through a
real `helm template` that must fail and name the offending value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import Helm

# (case id, --set overrides or a values document, text the error must contain)
BAD_VALUES = [
    ("unknown top-level key", {"teachr": {"replicas": 2}}, "teachr"),
    ("unknown nested key", {"teacher": {"replica": 2}}, "replica"),
    ("control plane runs at least once", ["controlPlane.replicas=0"], "/controlPlane/replicas"),
    (
        "a leader's lease is bounded",
        ["controlPlane.leaderLeaseSeconds=0.5"],
        "/controlPlane/leaderLeaseSeconds",
    ),
    ("control plane budget keeps pods up", ["controlPlane.pdb.maxUnavailable=1"], "maxUnavailable"),
    ("service token key is a file name", ["serviceToken.key=../token"], "/serviceToken/key"),
    ("service token settings are known", ["serviceToken.secret=x"], "secret"),
    ("internal TLS needs a Secret", ["internalTLS.enabled=true"], "/internalTLS/secretName"),
    ("internal TLS Secret name", ["internalTLS.secretName=Platform_TLS"], "/internalTLS/secretName"),
    ("internal TLS settings are known", ["internalTLS.existingSecret=x"], "existingSecret"),
    ("port out of range", ["prompts.port=70000"], "/prompts/port"),
    ("pull policy", ["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    ("log level", ["logLevel=verbose"], "/logLevel"),
    ("resources need requests", ["storage.resources.requests=null"], "/storage/resources"),
    ("memory limit required", ["trainer.resources.limits.memory=null"], "/trainer/resources/limits"),
    ("quantity syntax", ["teacher.resources.requests.memory=lots"], "/teacher/resources/requests/memory"),
    ("root is refused", ["podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
    (
        "no privilege escalation",
        ["containerSecurityContext.allowPrivilegeEscalation=true"],
        "allowPrivilegeEscalation",
    ),
    (
        "external S3 needs an endpoint",
        ["minio.enabled=false", "objectStore.external.existingSecret=s3"],
        "/objectStore/external/endpoint",
    ),
    (
        "external S3 needs credentials",
        ["minio.enabled=false", "objectStore.external.endpoint=s3.example.com"],
        "/objectStore/external/existingSecret",
    ),
    (
        "S3 endpoint without scheme",
        ["objectStore.external.endpoint=https://s3.example.com"],
        "/objectStore/external/endpoint",
    ),
    ("bucket name", ["objectStore.bucket=My_Bucket"], "/objectStore/bucket"),
    ("external database needs a Secret", ["postgresql.enabled=false"], "/externalDatabase/existingSecret"),
    ("pinned MinIO image", ["minio.image.tag=latest"], "/minio/image/tag"),
    (
        "GPUs per worker are whole",
        ["rayCluster.gpuWorkers.gpusPerWorker=0.5"],
        "/rayCluster/gpuWorkers/gpusPerWorker",
    ),
    (
        "GPUs per worker not negative",
        ["rayCluster.gpuWorkers.gpusPerWorker=-1"],
        "/rayCluster/gpuWorkers/gpusPerWorker",
    ),
    (
        "at least one worker at most",
        ["rayCluster.gpuWorkers.maxReplicas=0"],
        "/rayCluster/gpuWorkers/maxReplicas",
    ),
    (
        "min workers within max",
        ["rayCluster.gpuWorkers.minReplicas=9"],
        "minReplicas <= replicas <= maxReplicas",
    ),
    ("Ray version of the images", ["rayCluster.rayVersion=2.9.0"], "/rayCluster/rayVersion"),
    ("upscaling mode", ["rayCluster.autoscaler.upscalingMode=Fast"], "/rayCluster/autoscaler/upscalingMode"),
    (
        "idle timeout not negative",
        ["rayCluster.autoscaler.idleTimeoutSeconds=-5"],
        "/rayCluster/autoscaler/idleTimeoutSeconds",
    ),
    ("no Ray cluster needs an address", ["rayCluster.enabled=false"], "/trainer/externalRayAddress"),
    ("ingress needs a host", ["ingress.enabled=true"], "/ingress/host"),
    ("TLS needs a Secret", {"ingress": {"tls": [{"hosts": ["a.example.com"]}]}}, "secretName"),
    (
        "API key names are file names",
        {"teacher": {"apiKeys": {"values": {"../escape": "x"}}}},
        "'../escape' does not match",
    ),
    (
        "API key Secrets are complete",
        {"teacher": {"apiKeys": {"existingSecrets": [{"name": "deepseek"}]}}},
        "secretName",
    ),
    (
        "teacher egress allow entries",
        {"teacher": {"egressAllow": ["http://vllm:8000/v1"]}},
        "/teacher/egressAllow/0",
    ),
    ("limiter storage scheme", ["teacher.limiterStorageUri=mysql://db"], "/teacher/limiterStorageUri"),
    (
        "teacher autoscaling bounds",
        ["teacher.autoscaling.enabled=true", "teacher.autoscaling.minReplicas=5"],
        "must not exceed",
    ),
    (
        "utilization is a percentage",
        ["teacher.autoscaling.targetCPUUtilizationPercentage=150"],
        "targetCPUUtilizationPercentage",
    ),
    ("spread policy", ["topologySpread.whenUnsatisfiable=Maybe"], "/topologySpread/whenUnsatisfiable"),
    (
        "principals have a role",
        {
            "controlPlane": {
                "principals": {
                    "file": {"principals": [{"name": "a", "tenant": "t", "role": "root", "token": "t" * 16}]}
                }
            }
        },
        "/controlPlane/principals/file/principals/0/role",
    ),
    (
        "principals give a token or its hash",
        {
            "controlPlane": {
                "principals": {"file": {"principals": [{"name": "a", "tenant": "t", "role": "user"}]}}
            }
        },
        "/controlPlane/principals/file/principals/0",
    ),
    (
        "a principals file lists principals",
        {"controlPlane": {"principals": {"file": {"tenants": {"t": {"maxConcurrentJobs": 2}}}}}},
        "principals",
    ),
    (
        "tenant quotas are positive",
        {
            "controlPlane": {
                "principals": {"file": {"principals": [], "tenants": {"t": {"maxConcurrentJobs": 0}}}}
            }
        },
        "/controlPlane/principals/file/tenants/t/maxConcurrentJobs",
    ),
    (
        "job expiry is positive",
        ["controlPlane.finishedJobMaxAgeHours=0"],
        "/controlPlane/finishedJobMaxAgeHours",
    ),
    ("cache age is positive", ["teacher.cache.maxAgeDays=0"], "/teacher/cache/maxAgeDays"),
    ("cache bound is positive", ["teacher.cache.maxEntries=0"], "/teacher/cache/maxEntries"),
    ("cache bound is whole", ["teacher.cache.maxEntries=1.5"], "/teacher/cache/maxEntries"),
    ("cache settings are known", ["teacher.cache.maxBytes=1"], "maxBytes"),
    ("pod settings are known", ["podDefaults.hostNetwork=true"], "hostNetwork"),
    (
        "no catch-all API server block",
        ["networkPolicy.kubeApiServer.cidrs={0.0.0.0/0}"],
        "/networkPolicy/kubeApiServer/cidrs",
    ),
    (
        "API server CIDR syntax",
        ["networkPolicy.kubeApiServer.cidrs={10.0.0.1}"],
        "/networkPolicy/kubeApiServer/cidrs/0",
    ),
    ("private ranges are CIDRs", ["networkPolicy.privateCidrs={private}"], "/networkPolicy/privateCidrs/0"),
    ("DNS needs a port", ["networkPolicy.dns.ports=null"], "ports"),
    ("DNS settings are known", ["networkPolicy.dnsTo=null", "networkPolicy.dns.servers=x"], "servers"),
    ("runtime class name", ["teacher.runtimeClassName=Not_A_Name"], "/teacher/runtimeClassName"),
    (
        "priority class name",
        ["podDefaults.priorityClassName=High Priority"],
        "/podDefaults/priorityClassName",
    ),
    (
        "spread constraints are complete",
        {"minio": {"topologySpreadConstraints": [{"topologyKey": "zone"}]}},
        "/minio/topologySpreadConstraints/0",
    ),
    ("label values", {"podDefaults": {"podLabels": {"team": "a b"}}}, "/podDefaults/podLabels/team"),
    ("extra volumes are named", {"tests": {"extraVolumes": [{"emptyDir": {}}]}}, "/tests/extraVolumes/0"),
    (
        "extra mounts have a path",
        {"rayCluster": {"head": {"extraVolumeMounts": [{"name": "ca"}]}}},
        "/rayCluster/head/extraVolumeMounts/0",
    ),
    (
        "envFrom names a source",
        {"postgresql": {"extraEnvFrom": [{"prefix": "X_"}]}},
        "/postgresql/extraEnvFrom/0",
    ),
    (
        "service account annotations by known component",
        {"serviceAccount": {"componentAnnotations": {"trainr": {"a": "b"}}}},
        "trainr",
    ),
    (
        "extra worker groups are complete",
        {"rayCluster": {"additionalWorkerGroups": [{"name": "cpu", "replicas": 1}]}},
        "/rayCluster/additionalWorkerGroups/0",
    ),
    (
        "extra worker group names",
        {
            "rayCluster": {
                "additionalWorkerGroups": [
                    {
                        "name": "CPU",
                        "replicas": 0,
                        "minReplicas": 0,
                        "maxReplicas": 1,
                        "shmSizeLimit": "1Gi",
                        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
                    }
                ]
            }
        },
        "/rayCluster/additionalWorkerGroups/0/name",
    ),
    (
        "CPU workers need a CPU limit",
        ["rayCluster.cpuWorkers.resources.limits.cpu=null"],
        "/rayCluster/cpuWorkers/resources",
    ),
    (
        "CPU workers have whole CPUs",
        ["rayCluster.cpuWorkers.resources.limits.cpu=1500m"],
        "/rayCluster/cpuWorkers/resources/limits/cpu",
    ),
    (
        "CPU workers have no GPUs",
        ["rayCluster.cpuWorkers.rayStartParams.num-gpus=1"],
        "/rayCluster/cpuWorkers/rayStartParams/num-gpus",
    ),
    ("CPU worker group name", ["rayCluster.cpuWorkers.groupName=CPU"], "/rayCluster/cpuWorkers/groupName"),
    ("autoscaler on or off", ["rayCluster.autoscaler.enabled=maybe"], "/rayCluster/autoscaler/enabled"),
    ("shards have rows", ["teacher.fanout.shardRows=0"], "/teacher/fanout/shardRows"),
    ("shards ask for CPUs", ["prompts.fanout.cpusPerShard=0"], "/prompts/fanout/cpusPerShard"),
    ("shard CPUs are bounded", ["teacher.fanout.cpusPerShard=65"], "/teacher/fanout/cpusPerShard"),
    (
        "parallel shards are bounded",
        ["prompts.fanout.maxParallelShards=5000"],
        "/prompts/fanout/maxParallelShards",
    ),
    ("retries are not negative", ["teacher.fanout.maxRetries=-1"], "/teacher/fanout/maxRetries"),
    ("fan-out settings are known", ["teacher.fanout.shards=4"], "shards"),
    ("metrics port in range", ["metrics.controlPlanePort=0"], "/metrics/controlPlanePort"),
    ("alert window is a duration", ["metrics.prometheusRule.failedJobsWindow=soon"], "failedJobsWindow"),
    (
        "error ratio is a share",
        {"metrics": {"prometheusRule": {"teacherErrorRatio": 1.5}}},
        "teacherErrorRatio",
    ),
    ("dashboard labels are label names", {"metrics": {"grafanaDashboard": {"labels": {"a b": "1"}}}}, "a b"),
    ("monitoring settings are known", ["metrics.serviceMonitor.port=9090"], "port"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [case[1:] for case in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_bad_values_are_refused(helm: Helm, tmp_path: Path, overrides, expected: str) -> None:
    if isinstance(overrides, dict):
        values = tmp_path / "values.yaml"
        values.write_text(yaml.safe_dump(overrides))
        result = helm.template(value_files=[values])
    else:
        result = helm.template(overrides=overrides)
    assert result.returncode != 0, f"helm template accepted {overrides}"
    assert expected in result.stderr, result.stderr


def test_the_defaults_are_accepted(helm: Helm) -> None:
    assert helm.template().returncode == 0
