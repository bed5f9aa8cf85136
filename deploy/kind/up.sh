#!/usr/bin/env bash
# Create the kind cluster of deploy/kind/cluster.yaml with a local image registry at localhost:5001,
# and install the KubeRay operator, a prerequisite of the chart. Safe to run again.
# Needs: docker (or podman with KIND_EXPERIMENTAL_PROVIDER=podman), kind >= 0.24, kubectl, helm.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cluster=stillhouse
registry=kind-registry
registry_port=5001
kuberay_version=1.5.1

if [ "$(docker inspect -f '{{.State.Running}}' "$registry" 2>/dev/null || true)" != true ]; then
  docker run -d --restart=always -p "127.0.0.1:${registry_port}:5000" --network bridge --name "$registry" \
    registry:2.8.3
fi

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --config "$here/cluster.yaml"
fi

# Every node resolves localhost:5001 to the registry container.
for node in $(kind get nodes --name "$cluster"); do
  docker exec "$node" mkdir -p "/etc/containerd/certs.d/localhost:${registry_port}"
  printf '[host."http://%s:5000"]\n' "$registry" |
    docker exec -i "$node" cp /dev/stdin "/etc/containerd/certs.d/localhost:${registry_port}/hosts.toml"
done
if [ "$(docker inspect -f '{{json .NetworkSettings.Networks.kind}}' "$registry")" = null ]; then
  docker network connect kind "$registry"
fi
kubectl --context "kind-$cluster" apply -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: "localhost:${registry_port}"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
YAML

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$kuberay_version" \
  --kube-context "kind-$cluster" --namespace kuberay-system --create-namespace --wait

echo "kind cluster '$cluster' is ready: run 'tilt up'"
