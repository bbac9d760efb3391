#!/usr/bin/env bash
# Installs wrk (the HTTP load generator used by tests/bench/run_bench.py) from Debian packages.
# Needs root (or sudo). Exits 0 if wrk is already on PATH.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "install-wrk: need root (or sudo) to run apt-get" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-wrk: no apt-get here; install wrk with your package manager" >&2
  exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk
command -v wrk
