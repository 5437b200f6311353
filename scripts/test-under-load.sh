#!/usr/bin/env bash
# Runs the whole test suite (scripts/test.sh) N times in a row, default 3, while a CPU hog keeps
# two cores busy: a test that only passes on an idle machine fails here rather than on a noisy
# CI runner. The hog is Debian's stress-ng --cpu 2 (installed when run as root), else two shell
# busy loops. Prints each run's result and duration, keeps each run's output in
# target/test-under-load/, and exits non-zero if any run failed.
#
#   bash scripts/test-under-load.sh [N] [cargo test arguments, e.g. --test exposure_response]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
if (($#)) && [[ $1 =~ ^[0-9]+$ ]]; then
    runs=$1
    shift
fi
if ((runs < 1)); then
    echo "usage: bash scripts/test-under-load.sh [N >= 1] [cargo test arguments]" >&2
    exit 2
fi

# Built (and the test dependencies installed) before the hog starts, so the durations below
# are the tests' own.
echo "building the tests"
bash scripts/test.sh --no-run --quiet >/dev/null

hogs=()
stop_hogs() {
    if ((${#hogs[@]})); then
        kill "${hogs[@]}" 2>/dev/null || true
        wait "${hogs[@]}" 2>/dev/null || true
        hogs=()
    fi
}
# However the script ends, the hog ends with it; a signal exits, which runs the EXIT trap.
trap stop_hogs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! command -v stress-ng >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing stress-ng"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng; } \
        >/dev/null || echo "could not install stress-ng; using busy loops instead" >&2
fi
if command -v stress-ng >/dev/null; then
    # stress-ng ends its workers when it gets SIGTERM.
    stress-ng --cpu 2 --quiet &
    hogs+=($!)
    hog="stress-ng --cpu 2"
else
    for _ in 1 2; do
        sh -c 'while :; do :; done' &
        hogs+=($!)
    done
    hog="two busy loops"
fi

logs=target/test-under-load
mkdir -p "$logs"
echo "running the suite $runs time(s) beside $hog"
failed=0
for ((i = 1; i <= runs; i++)); do
    log="$logs/run-$i.log"
    start=$SECONDS
    if bash scripts/test.sh "$@" >"$log" 2>&1; then
        result=pass
    else
        result=FAIL
        failed=$((failed + 1))
    fi
    echo "run $i/$runs: $result in $((SECONDS - start)) s ($log)"
    if [[ $result == FAIL ]]; then
        grep -E '^test .* FAILED$|^error: [0-9]+ targets? failed|^    `' "$log" | sed 's/^/    /' || true
    fi
done
stop_hogs
echo "$((runs - failed)) of $runs run(s) passed"
((failed == 0))
