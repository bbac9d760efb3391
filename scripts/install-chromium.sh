#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium`) for the console's browser tests
# (tests/test_console.py drives it with Playwright, pointed at /usr/bin/chromium; Playwright's
# own browser download is never used). Needs root (or sudo). Exits 0 if chromium is there.
set -euo pipefail
exec "$(dirname "$0")/apt-install.sh" chromium chromium fonts-dejavu-core
