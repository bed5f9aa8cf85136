#!/usr/bin/env bash
# Make sure the tools of the image tests are installed: podman with the runc runtime and catatonit (the
# pause process of `podman kube play` pods), and debootstrap for the base image (no registry is
# needed). On Debian or Ubuntu, as root, missing ones are installed.
set -euo pipefail

missing=()
for tool in podman runc catatonit debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "Missing: ${missing[*]}. Install them (Debian: apt-get install podman runc catatonit debootstrap) and rerun." >&2
  exit 1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
