#!/usr/bin/env bash
# Delete the kind cluster and the local registry that deploy/kind/up.sh made.
set -euo pipefail
kind delete cluster --name stillhouse
docker rm -f kind-registry >/dev/null 2>&1 || true
