#!/usr/bin/env bash
# Builds every fuzz target and runs each for a fixed time on its seeds (and any corpus
# kept from earlier runs); fails if a target crashes, leaks, times out or does not build.
#
#   fuzz/run-ci.sh               # every target, FUZZ_SECONDS (default 15) each
#   fuzz/run-ci.sh virtio_blk    # one target
#
# Environment: FUZZ_SECONDS (per target), FUZZ_SANITIZER (default none; "address" for ASan),
# FUZZ_SKIP (targets left out by default, space-separated; default "virtio_net"),
# CARGO_BUILD_JOBS (default 1).
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-15}"
sanitizer="${FUZZ_SANITIZER:-none}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo +nightly install cargo-fuzz --version 0.13.2 --locked
fi

# Targets whose harness still has open triage items (see README.md, "Open items") are
# left out of the default run; name them explicitly to run them.
skip=" ${FUZZ_SKIP-virtio_net} "
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    while read -r t; do
        [[ "$skip" == *" $t "* ]] && { echo "fuzz: skipping $t (FUZZ_SKIP)"; continue; }
        targets+=("$t")
    done < <(cargo +nightly fuzz list)
fi

echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="artifacts/$t/ci.log"
    echo "fuzz: $t for ${seconds}s"
    if cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        echo "fuzz: $t ok: ${runs:-?} runs, ${rate:-?} exec/s"
    else
        echo "fuzz: $t FAILED; the end of its log ($log):"
        tail -n 60 "$log"
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: ${#failed[@]} failed: ${failed[*]} (crash inputs in fuzz/artifacts/<target>/)"
    echo "fuzz: ${#targets[@]} targets: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
    exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
