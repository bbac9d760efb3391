#!/usr/bin/env bash
# apt-install.sh COMMAND PACKAGE...: installs Debian PACKAGEs unless COMMAND is already on PATH,
# then prints COMMAND's path. Needs root (or sudo) when it has to install. What the test suite
# and the benchmark need from Debian comes through here (install-chromium.sh, install-wrk.sh).
set -euo pipefail

command="$1"
shift
if command -v "$command" >/dev/null 2>&1; then
  command -v "$command"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "apt-install: need root (or sudo) to install $*" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-install: no apt-get here; install $* with your package manager" >&2
  exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
command -v "$command"
