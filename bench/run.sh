#!/usr/bin/env bash
# Benchmark: portcullis against nginx as TLS-terminating reverse proxies in front of the same
# loopback origin (bench/bench.py: CPU per request, idle memory per connection, analytics on and
# off, reload of 10,000 sites, HTTP/3 with examples/h3load.rs: nginx 1.22 has no QUIC), then its DNS server against Knot (bench/dns.py). Installs nginx,
# wrk, h2load, dnsperf and knot from Debian if missing (as root), builds portcullis in release.
# Options go to bench.py (--help); --no-dns skips the DNS part.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
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
if [[ $(id -u) != 0 ]]; then
    echo "bench/run.sh needs root: it maps the bench hostnames to loopback in /etc/hosts for wrk" >&2
    exit 1
fi

dns=1
args=()
for a in "$@"; do
    if [[ $a == --no-dns ]]; then dns=0; else args+=("$a"); fi
done
cargo build --release --quiet
cargo build --release --quiet --example h3load
python3 bench/bench.py "${args[@]}"
if ((dns)); then
    echo
    python3 bench/dns.py
fi
