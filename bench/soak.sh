#!/usr/bin/env bash
# Soak test (not run by CI): portcullis under mixed load for --minutes (default 60), one table
# row a minute (RSS, descriptors, active connections, counters, wrk and client errors), and at
# the end whether RSS and descriptors stayed flat. Installs wrk from Debian if missing (as
# root; without it Python threads send the HTTPS load), builds portcullis in release only if
# the binary is missing, then runs bench/soak.py. Options go to soak.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null && [[ $(id -u) == 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
[[ -x target/release/portcullis ]] || cargo build --release --quiet

# soak.py cleans up its children (portcullis, the origin, wrk) itself; the traps make sure it
# gets the chance on Ctrl-C or TERM, and does not outlive this script.
python3 bench/soak.py "$@" &
soak=$!
stop() {
    trap '' INT TERM
    kill -TERM "$soak" 2>/dev/null || true
    wait "$soak" 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'kill -TERM "$soak" 2>/dev/null || true' EXIT
wait "$soak"
