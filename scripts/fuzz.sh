#!/usr/bin/env bash
# Fuzzes portcullis's parsers of untrusted input with cargo-fuzz (libFuzzer), one target at a
# time, and prints per target: executions, new crashes and exit status.
#
#   scripts/fuzz.sh [--seconds N] [TARGET...] [-- LIBFUZZER_ARGS...]
#
# Default: every target in fuzz/Cargo.toml for 60 s each. Installs the nightly toolchain and
# cargo-fuzz when missing. Each run grows fuzz/corpus/TARGET (ignored by git), first filled
# from the committed seeds in fuzz/seeds/TARGET (and examples/*.toml for `config`); crashing
# inputs land in fuzz/artifacts/TARGET. Reproduce one with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# and shrink it with `cargo +nightly fuzz tmin TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Exit status: 0 if every target ran without a crash, 1 if any crashed, 2 if none crashed
# but some target did not build or stopped for another reason.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

seconds=60
targets=()
extra=()
while (($#)); do
    case $1 in
        --seconds)
            [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "--seconds wants a whole number, got ${2:-nothing}" >&2; exit 2; }
            seconds=$2
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

# Shared machines: one compile job unless the caller says otherwise.
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "installing the nightly toolchain (cargo-fuzz needs it for the sanitizers)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz
fi

known=$(cargo +nightly fuzz list)
if ((${#targets[@]} == 0)); then
    mapfile -t targets <<<"$known"
fi
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$known" || { echo "no fuzz target $t; known: $(echo $known)" >&2; exit 2; }
done

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
summary=()
crashed=0
failed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    log=$logs/$t.log
    mkdir -p "$corpus" "$artifacts"
    # Seeds are copied, never linked: libFuzzer adds and may rewrite files in the corpus.
    if [[ -d fuzz/seeds/$t ]]; then
        cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    if [[ $t == config ]]; then
        for f in examples/*.toml; do cp -n "$f" "$corpus/example-$(basename "$f")"; done
    fi
    before=$(find "$artifacts" -type f | wc -l)

    echo "== $t: building"
    if ! cargo +nightly fuzz build "$t" >"$log" 2>&1; then
        echo "   does not build; the last lines of $log:"
        grep -E '^error' "$log" | sort -u | head -5 | sed 's/^/   /'
        summary+=("$(printf '%-10s %12s %8s  %s' "$t" - - "does not build")")
        failed=1
        continue
    fi
    echo "== $t: fuzzing for ${seconds}s (log: $log)"
    touch "$log.start"
    set +e
    cargo +nightly fuzz run "$t" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${extra[@]}" >>"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    after=$(find "$artifacts" -type f | wc -l)
    new=$((after - before))
    if ((rc == 0)); then
        status="ok"
    elif ((new > 0)); then
        status="crashed (exit $rc)"
        crashed=1
        grep -m1 -A1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | sed 's/^/   /' || true
        find "$artifacts" -type f -newer "$log.start" 2>/dev/null | sed 's/^/   artifact: /' || true
    else
        status="failed (exit $rc)"
        failed=1
    fi
    summary+=("$(printf '%-10s %12s %8s  %s' "$t" "${execs:-?}" "$new" "$status")")
done

echo
printf '%-10s %12s %8s  %s\n' target execs crashes status
printf '%s\n' "${summary[@]}"
if ((crashed)); then
    echo "crashing inputs are in fuzz/artifacts/TARGET; shrink one with: cargo +nightly fuzz tmin TARGET FILE"
    exit 1
fi
((failed == 0)) || exit 2
