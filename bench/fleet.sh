#!/usr/bin/env bash
# Fleet benchmark (not run by CI): 8 portcullis nodes and 10,000 sites on one PostgreSQL.
# Change propagation p50/p99, flush throughput, database CPU, and the largest fleet one
# database core suggests. Installs postgresql and wrk from Debian if missing (as root), builds
# portcullis in release, then runs bench/fleet.py. Options go to fleet.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    if [[ $(id -u) == 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing: ${need[*]}; install with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
cargo build --release --quiet
exec python3 bench/fleet.py "$@"
