#!/usr/bin/env bash
# Make sure the browser the console tests drive is installed: Debian's Chromium and its ChromeDriver
# (/usr/bin/chromium). Playwright drives that binary; it never downloads a browser of its own.
set -euo pipefail

CHROMIUM=${STILLHOUSE_TEST_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "No Chromium at $CHROMIUM, and it can only be installed here as root on Debian:" >&2
  echo "  apt-get install chromium chromium-driver   (or set STILLHOUSE_TEST_CHROMIUM to a Chromium binary)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null || {
  apt-get update -q >/dev/null
  apt-get install -y -q chromium chromium-driver >/dev/null
}
test -x "$CHROMIUM"
