#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium`) for the console's browser tests
# (tests/test_console.py drives it with Playwright, pointed at /usr/bin/chromium; Playwright's
# own browser download is never used). Needs root (or sudo). Exits 0 if chromium is there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  command -v chromium
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "install-chromium: need root (or sudo) to run apt-get" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; install chromium with your package manager" >&2
  exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
command -v chromium
