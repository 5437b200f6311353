#!/usr/bin/env bash
# Benchmark: portcullis against nginx as TLS-terminating reverse proxies in front of the same
# loopback origin. Installs nginx, wrk and h2load from Debian if missing (as root), builds
# portcullis in release, then runs bench/bench.py. Options go to bench.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
    if [[ $(id -u) == 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing: ${need[*]}; install with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
if [[ $(id -u) != 0 ]]; then
    echo "bench/run.sh needs root: it maps the bench hostnames to loopback in /etc/hosts for wrk" >&2
    exit 1
fi

cargo build --release --quiet
exec python3 bench/bench.py "$@"
