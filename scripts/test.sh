#!/usr/bin/env bash
# Runs the whole test suite, every test binary even when an earlier one fails. Installs the
# Debian packages the tests use (curl, dig, named-checkzone, chromium and chromedriver, nft, ip,
# pebble, postgresql)
# when run as root; otherwise names what is missing and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v named-checkzone >/dev/null || need+=(bind9-utils)
command -v chromium >/dev/null || need+=(chromium)
command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || need+=(nftables)
command -v ip >/dev/null || [[ -x /usr/sbin/ip ]] || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v pebble >/dev/null || need+=(pebble)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
if ((${#need[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing test dependencies: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing Debian packages needed by the tests: ${need[*]}" >&2
        echo "install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

# Every test binary runs even after one fails, so a single failure does not hide the rest.
cargo test --all-targets --no-fail-fast "$@"
