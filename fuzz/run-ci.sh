#!/usr/bin/env bash
# Builds every fuzz target, replays the inputs kept in findings/ (the bugs found so far:
# permanent regressions) and seeds/ through their targets, then fuzzes each target for a
# fixed time on its seeds (and any corpus kept from earlier runs); fails if a target
# crashes, leaks, times out or does not build.
#
#   fuzz/run-ci.sh               # every target, FUZZ_SECONDS (default 15) each
#   fuzz/run-ci.sh virtio_blk    # one target (its findings and seeds, then fuzzing)
#
# Environment: FUZZ_SECONDS (per target; 0 replays only), FUZZ_SANITIZER (default none;
# "address" for ASan), FUZZ_SKIP (targets left out, space-separated; default none),
# FUZZ_SEED (libFuzzer's -seed; default 1, so a CI run is repeatable: the same inputs in the
# same order on a clean clone; "random" for a fresh seed each run), CARGO_BUILD_JOBS
# (default: the number of CPUs).
#
# findings/<prefix>-<name>.bin replays through the target its prefix names: blk →
# virtio_blk, net → virtio_net, mmio → virtio_mmio, else the target of that name
# (serial-..., kernel_loader-..., ...). A prefix naming no target fails the run.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-15}"
sanitizer="${FUZZ_SANITIZER:-none}"
fuzz_seed="${FUZZ_SEED:-1}"
seed_flag=(-seed="$fuzz_seed")
[ "$fuzz_seed" = random ] && seed_flag=()
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo +nightly install cargo-fuzz --version 0.13.2 --locked
fi

all=()
while read -r t; do all+=("$t"); done < <(cargo +nightly fuzz list)
skip=" ${FUZZ_SKIP-} "
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    for t in "${all[@]}"; do
        [[ "$skip" == *" $t "* ]] && { echo "fuzz: skipping $t (FUZZ_SKIP)"; continue; }
        targets+=("$t")
    done
fi

# The target a finding replays through (empty if its prefix names none).
finding_target() {
    local prefix
    prefix="$(basename "$1")"
    prefix="${prefix%%-*}"
    case "$prefix" in
        blk) prefix=virtio_blk ;;
        net) prefix=virtio_net ;;
        mmio) prefix=virtio_mmio ;;
    esac
    [[ " ${all[*]} " == *" $prefix "* ]] && echo "$prefix"
    return 0
}

for f in findings/*; do
    [ -e "$f" ] || continue
    if [ -z "$(finding_target "$f")" ]; then
        echo "fuzz: $f names no target (see the head of fuzz/run-ci.sh)" >&2
        exit 1
    fi
done

echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    # Replay: the findings of this target and its seeds, each run once.
    inputs=()
    for f in findings/*; do
        [ -e "$f" ] && [ "$(finding_target "$f")" = "$t" ] && inputs+=("$f")
    done
    if [ -d "seeds/$t" ]; then
        for f in "seeds/$t"/*; do [ -f "$f" ] && inputs+=("$f"); done
    fi
    log="artifacts/$t/replay.log"
    if [ "${#inputs[@]}" -gt 0 ]; then
        if cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "${inputs[@]}" -- \
            -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
            echo "fuzz: $t replayed ${#inputs[@]} inputs (findings and seeds)"
        else
            echo "fuzz: $t FAILED replaying findings/seeds; the end of its log ($log):"
            tail -n 60 "$log"
            failed+=("$t")
            continue
        fi
    fi
    [ "$seconds" -gt 0 ] || continue
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="artifacts/$t/ci.log"
    echo "fuzz: $t for ${seconds}s"
    if cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" "${seed_flag[@]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 \
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
