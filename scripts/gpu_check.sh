#!/usr/bin/env bash
# The GPU path's checks, on a machine with an NVIDIA GPU, python3 and torch
# 2.11 (with its NCCL wheel) but no Rust toolchain:
#
#   here:   make gpu-bundle                  # stripped release binaries in target/gpu/
#   there:  COHORT_BIN_DIR=target/gpu OUT=/some/dir bash scripts/gpu_check.sh
#
# Runs, each logged to $OUT/gpu_check.log and marked PASS or FAIL:
#   1. cohort doctor: the CUDA driver, NCCL, and `auto` choosing nccl;
#   2. the NCCL backend's collectives at world size 1 (NCCL refuses two ranks
#      on one GPU), every op, 1 KiB to 256 MiB, results checked;
#   3. 2-rank training on one GPU over the fallback (CUDA tensors staged
#      through host memory over TCP; `auto` picks it because the ranks share
#      the GPU), DDP and ZeRO-2;
#   4. CUDA training of configs/gpt-100m.toml over NCCL, then a resume from its
#      checkpoint;
#   5. bench/gpu_vs_torch.py: tokens/s against the same model in PyTorch eager.
# Results land in $OUT (default ./gpu-check): gpu_check.log, nccl_bench.json,
# gpu_vs_torch.json, summary.txt. Exits non-zero if any check failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-check}"
bin="${COHORT_BIN_DIR:-$root/target/release}"
py="${PYTHON:-python3}"
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say() { printf '%s\n' "$*" | tee -a "$log"; }
for b in cohort cohort-worker; do
    [[ -x "$bin/$b" ]] || { say "error: $bin/$b not found (build with make gpu-bundle, set COHORT_BIN_DIR)"; exit 2; }
done

# The binaries' rpath points at the build machine's venv; here libtorch and
# NCCL come from this python's torch. cudarc loads NCCL as libnccl.so.
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
    || { say "error: $py can't import torch"; exit 2; }
nccl_lib="$("$py" -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)"
mkdir -p "$work/lib"
if [[ -n "$nccl_lib" && -f "$nccl_lib/libnccl.so.2" ]]; then
    ln -s "$nccl_lib/libnccl.so.2" "$work/lib/libnccl.so"
fi
export LD_LIBRARY_PATH="$work/lib:$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$bin:$PATH"

results=()
# check NAME PATTERN... -- COMMAND...: runs COMMAND (10 minutes at most),
# logs its output, and passes if it exits 0 and every PATTERN (an extended
# regex) matches some line of its output.
check() {
    local name="$1"
    shift
    local patterns=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        patterns+=("$1")
        shift
    done
    shift
    say ""
    say "=== $name: $*"
    local started=$SECONDS text rc missing=""
    text="$(timeout 600 "$@" 2>&1)"
    rc=$?
    printf '%s\n' "$text" >> "$log"
    for p in "${patterns[@]}"; do
        grep -Eq -- "$p" <<< "$text" || missing+=" /$p/"
    done
    if [[ $rc -eq 0 && -z "$missing" ]]; then
        results+=("PASS  $name ($((SECONDS - started)) s)")
    else
        results+=("FAIL  $name (exit $rc${missing:+; no line matched$missing}; see gpu_check.log)")
    fi
    say "--- ${results[-1]}"
}

say "# $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi -L 2>&1 | tee -a "$log"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tee -a "$log"

check "doctor picks nccl" 'collective backend \(auto\): nccl' -- \
    cohort doctor

check "NCCL collectives, world 1, every op, f32" '#wrong' -- \
    cohort bench collectives --backend nccl --nproc 1 \
    --op all_reduce,reduce_scatter,all_gather,broadcast \
    --min-bytes 1K --max-bytes 256M --factor 16 --iters 20 --warmup 5 --json "$out/nccl_bench.json"
for dtype in bf16 f16 f64 i64 u8; do
    check "NCCL collectives, world 1, $dtype" '#wrong' -- \
        cohort bench collectives --backend nccl --nproc 1 --dtype "$dtype" \
        --op all_reduce,reduce_scatter,all_gather,broadcast --min-bytes 1K --max-bytes 1M --factor 32 --iters 3
done

for stage in 0 2; do
    check "2 ranks on one GPU over the TCP fallback, zero stage $stage" \
        'collectives: tcp .*share 1 GPU' 'step 100/100' 'job succeeded' -- \
        cohort launch configs/quickstart.toml --nproc-per-node 2 --log-dir "$work/logs" \
        --set train.device=cuda --set train.max_steps=100 --set parallel.zero_stage=$stage
done

ckpt="$work/ckpt"
check "gpt-100m on CUDA over NCCL, bf16, with checkpoints" \
    'collectives: nccl' 'on cuda:0' 'step 30/30' 'job succeeded' -- \
    cohort launch configs/gpt-100m.toml --log-dir "$work/logs" \
    --set train.max_steps=30 --set checkpoint.dir="$ckpt" --set checkpoint.every=20
check "gpt-100m resumes from its checkpoint on CUDA" \
    'resumed from .*step-0+20' 'step 40/40' 'job succeeded' -- \
    cohort launch configs/gpt-100m.toml --log-dir "$work/logs" \
    --set train.max_steps=40 --set checkpoint.dir="$ckpt" --set checkpoint.every=20
check "gpt-100m, ZeRO-1 over NCCL" 'collectives: nccl' 'step 20/20' 'job succeeded' -- \
    cohort launch configs/gpt-100m.toml --log-dir "$work/logs" \
    --set train.max_steps=20 --set parallel.zero_stage=1

check "tokens/s vs PyTorch eager" 'ratio cohort/PyTorch' -- \
    "$py" bench/gpu_vs_torch.py --worker "$bin/cohort-worker" --json "$out/gpu_vs_torch.json"

{
    printf '%s\n' "${results[@]}"
    echo
    grep -A6 '^# .*rounds alternating' "$log" || true
} > "$out/summary.txt"
say ""
say "=== summary"
tee -a "$log" < "$out/summary.txt"
! grep -q '^FAIL' "$out/summary.txt"
