#!/usr/bin/env bash
# Installs wrk (the HTTP load generator used by tests/bench/run_bench.py) from Debian packages.
# Needs root (or sudo). Exits 0 if wrk is already on PATH.
set -euo pipefail
exec "$(dirname "$0")/apt-install.sh" wrk wrk
