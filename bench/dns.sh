#!/usr/bin/env bash
# DNS benchmark: portcullis' built-in authoritative server against Knot DNS serving the zone
# portcullis exports, with dnsperf, on loopback. Installs dnsperf and knot from Debian if
# missing (as root), builds portcullis in release, then runs bench/dns.py (options: --help).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v knotd >/dev/null || [[ -x /usr/sbin/knotd ]] || need+=(knot)
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
exec python3 bench/dns.py "$@"
