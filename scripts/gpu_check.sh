#!/usr/bin/env bash
# The GPU path's checks: one run of at most ~8 minutes on a machine with an
# NVIDIA GPU, python3 and torch 2.11 (with its NCCL wheel), no Rust and no
# network, that tells the truth about the NCCL backend and the device path.
#
#   here:   make gpu-bundle                  # stripped release binaries in target/gpu/
#   there:  COHORT_BIN_DIR=target/gpu OUT=/some/dir bash scripts/gpu_check.sh
#
# Modes (GPU_CHECK_MODE): `gpu` (the checks need a GPU and fail without
# one), `plumbing` (no GPU: every check runs a CPU stand-in through the same
# commands, comparisons and budgets, and passes, or says "skipped: no GPU"),
# `auto` (the default: gpu when nvidia-smi lists a GPU, else plumbing).
# `make test` runs the plumbing mode (tests/gpu_check.rs).
#
# The checks, each with its own time limit, within a global budget
# (GPU_CHECK_BUDGET_S, default 480 s), every output line streamed to
# $OUT/gpu_check.log as it comes and kept per check in $OUT/checks/:
#   preflight, one stage with one 20 s budget (GPU_CHECK_PREFLIGHT_S) shared
#     by its parts: the binaries, the worker links libtorch_cuda and its probe
#     sees CUDA, cohort doctor picks nccl, PyTorch's own NCCL all_reduce at
#     world 1 (with NCCL_DEBUG=WARN);
#   NCCL collectives at world 1: every op, Sum and Avg (Avg launches a kernel
#     even at world 1; an in-place Sum does not), the host buffer poisoned
#     before each read-back so a copy that never happened is caught;
#   NCCL against TCP at world 1 on CUDA (same seed, 20 steps, DDP and ZeRO-2):
#     per-step loss and grad norm within 1e-6 relative, or within 10x the
#     noise floor measured by launching the TCP run twice (at most 1e-3);
#   the CUDA device path against the CPU host path (fp32, 20 steps): losses
#     within 1e-4;
#   2 ranks sharing the GPU over TCP (CUDA tensors staged through host memory);
#   gpt-100m over NCCL in bf16, ZeRO-0, 1 and 2, with a checkpoint and a
#     resume that must continue the run it resumed;
#   tokens/s against PyTorch eager (bench/gpu_vs_torch.py).
# Every training run's metrics must have a grad norm > 0 at every step and a
# falling loss. Jobs run with --max-restarts 0, a short hang timeout and a
# short collective timeout, so a failure costs seconds, not the budget; after
# the first NCCL failure the remaining NCCL checks are skipped.
# Results: $OUT/summary.txt (one line per check with its wall time), the
# logs and every metrics file under $OUT. Exits non-zero if a check failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-check}"
bin="${COHORT_BIN_DIR:-$root/target/release}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
py="$PYTHON"
budget="${GPU_CHECK_BUDGET_S:-480}"
mode="${GPU_CHECK_MODE:-auto}"
metrics_tool="$root/scripts/gpu_check_metrics.py"

mkdir -p "$out/checks" "$out/metrics"
log="$out/gpu_check.log"
: > "$log"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started_all=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$log"; }
die() { say "error: $*"; exit 2; }

case "$mode" in
    auto)
        if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then mode=gpu; else mode=plumbing; fi ;;
    gpu|plumbing) ;;
    *) die "GPU_CHECK_MODE=$mode: use auto, gpu or plumbing" ;;
esac
[[ "$budget" =~ ^[0-9]+$ ]] || die "GPU_CHECK_BUDGET_S=$budget: a number of seconds"
for b in cohort cohort-worker; do
    [[ -x "$bin/$b" ]] || die "$bin/$b not found (build with make gpu-bundle, set COHORT_BIN_DIR)"
done
[[ -f "$metrics_tool" ]] || die "$metrics_tool not found"

# The binaries' rpath points at the build machine's venv; here libtorch and
# NCCL come from this python's torch. cudarc loads NCCL as libnccl.so.
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" \
    || die "$py can't import torch (set PYTHON to a python with torch 2.11)"
nccl_lib="$("$py" -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)"
mkdir -p "$work/lib"
if [[ -n "$nccl_lib" && -f "$nccl_lib/libnccl.so.2" ]]; then
    ln -s "$nccl_lib/libnccl.so.2" "$work/lib/libnccl.so"
fi
export LD_LIBRARY_PATH="$work/lib:$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$bin:$PATH"
# A dead or wedged peer ends an op in 60 s, not the default 300 s.
export COHORT_COLLECTIVE_TIMEOUT_S="${COHORT_COLLECTIVE_TIMEOUT_S:-60}"

# What a stand-in changes. On a GPU: CUDA tensors, NCCL where asked. In
# plumbing mode: the same commands on the CPU, the NCCL backend replaced by
# TCP, gpt-100m shrunk to something a CPU trains in seconds.
if [[ "$mode" == gpu ]]; then
    cuda=cuda nccl=nccl ranks=1
    shrink=()
else
    # Two ranks: at world 1 the stand-in collectives would move nothing.
    cuda=cpu nccl=tcp ranks=2
    shrink=(--set model.n_layer=1 --set model.n_head=2 --set model.n_embd=32
            --set model.block_size=32 --set model.vocab_size=256
            --set train.batch_size=2 --set train.grad_accum_steps=2 --set train.threads=1)
fi
# Every job: no restarts, a hang found in a minute, logs kept per check.
job=(--max-restarts 0 --hang-timeout 60)

results=()
nccl_failed=""
n=0
# check NAME NEEDS LIMIT FUNCTION: runs FUNCTION (a bash function that
# returns non-zero, after saying why, when the check fails) with at most
# LIMIT seconds (less when the budget has less left). NEEDS: `any`, `gpu`
# (a CPU stand-in in plumbing mode), `nccl` (also skipped after an NCCL
# failure), `gpu-only` (skipped in plumbing mode).
check() {
    local name="$1" needs="$2" limit="$3" fn="$4"
    n=$((n + 1))
    local left=$((budget - (SECONDS - started_all)))
    say ""
    say "=== $n. $name"
    local skip=""
    if [[ "$mode" == plumbing && "$needs" == gpu-only ]]; then
        skip="skipped: no GPU"
    elif [[ "$needs" == nccl && -n "$nccl_failed" ]]; then
        skip="skipped: an earlier NCCL check failed ($nccl_failed)"
    elif (( left < 10 )); then
        # Not a skip: a check that did not run is not a check that passed.
        results+=("FAIL  $name: not run, the ${budget} s budget is spent")
        say "--- ${results[-1]}"
        return
    fi
    if [[ -n "$skip" ]]; then
        results+=("SKIP  $name: $skip")
        say "--- ${results[-1]}"
        return
    fi
    (( limit > left )) && limit=$left
    check_dir="$out/checks/$(printf '%02d' "$n")"
    mkdir -p "$check_dir"
    check_limit=$limit
    local t0=$SECONDS why rc
    # Streamed: every line reaches the terminal and the log as it comes.
    { "$fn"; echo "$?" > "$check_dir/rc"; } 2>&1 | tee -a "$log" "$check_dir/check.out"
    rc="$(cat "$check_dir/rc" 2>/dev/null || echo 1)"
    why="$(grep '^check: ' "$check_dir/check.out" | tail -1)"
    local took=$((SECONDS - t0))
    # A check may leave a note for its summary line (the preflight's parts).
    local note=""
    [[ -s "$check_dir/note" ]] && note=" [$(cat "$check_dir/note")]"
    local stand_in=""
    [[ "$mode" == plumbing && "$needs" != any ]] && stand_in=" [plumbing: CPU stand-in]"
    if [[ $rc -eq 0 ]]; then
        results+=("PASS  $name ($took s)$note$stand_in")
    else
        results+=("FAIL  $name ($took s)$note: ${why#check: }")
        [[ "$needs" == nccl ]] && nccl_failed="$name"
    fi
    say "--- ${results[-1]}"
}

# run LOGNAME COMMAND...: COMMAND's output streamed to the main log and to
# the check's LOGNAME.log; at most the check's limit; its exit status.
run() {
    local name="$1"
    shift
    printf '$ %s\n' "$*"
    if (( check_limit < 1 )); then
        echo "check: $name: not run, no time left of its limit"
        return 124
    fi
    timeout --kill-after="${kill_after:-10}" "$check_limit" "$@" 2>&1 | tee "$check_dir/$name.log"
    local rc=${PIPESTATUS[0]}
    if (( rc == 124 || rc == 137 )); then
        echo "check: $name: killed after ${limit_what:-its ${check_limit} s limit}"
    elif (( rc != 0 )); then
        echo "check: $name: exited with $rc (see $check_dir/$name.log)"
    fi
    return "$rc"
}

# expect LOGNAME REGEX...: every extended REGEX matches a line of the log.
expect() {
    local name="$1" p
    shift
    for p in "$@"; do
        grep -Eq -- "$p" "$check_dir/$name.log" || { echo "check: $name: no line matches /$p/"; return 1; }
    done
}

# train LOGNAME ARGS...: cohort launch with the job's limits and a log
# directory of its own; its metrics end up in $out/metrics/LOGNAME.jsonl.
train() {
    local name="$1"
    shift
    local logs="$check_dir/$name-logs"
    run "$name" cohort launch "$@" "${job[@]}" --log-dir "$logs" || return 1
    local m
    m="$(find "$logs" -name metrics.jsonl -print -quit)"
    [[ -n "$m" ]] || { echo "check: $name: no metrics.jsonl under $logs"; return 1; }
    cp "$m" "$out/metrics/$name.jsonl"
    "$py" "$metrics_tool" sane "$out/metrics/$name.jsonl" | sed 's/^error: /check: /'
    return "${PIPESTATUS[0]}"
}

# same A B RTOL KEYS [FROM [C D]]: the per-step KEYS of two runs' metrics
# agree (from step FROM on); with C and D (the same run launched twice),
# within max(RTOL, 10 x the noise floor C vs D).
same() {
    local noise=()
    [[ -n "${6:-}" ]] && noise=(--noise "$out/metrics/$6.jsonl" "$out/metrics/$7.jsonl")
    "$py" "$metrics_tool" same "$out/metrics/$1.jsonl" "$out/metrics/$2.jsonl" \
        --rtol "$3" --keys "$4" --from-step "${5:-0}" "${noise[@]}" | sed 's/^error: /check: /'
    return "${PIPESTATUS[0]}"
}

p_binaries() {
    local worker="$bin/cohort-worker"
    if ldd "$worker" | grep -q 'libtorch_cuda'; then
        echo "cohort-worker links $(ldd "$worker" | grep -o 'libtorch_cuda[^ ]*' | head -1)"
    elif [[ "$mode" == gpu ]]; then
        echo "check: cohort-worker does not link libtorch_cuda: it was built against a CPU-only libtorch"
        return 1
    else
        echo "cohort-worker does not link libtorch_cuda (CPU-only libtorch; fine without a GPU)"
    fi
    run probe cohort-worker probe || return 1
    if [[ "$mode" == gpu ]]; then
        expect probe '"cuda_available":true' || return 1
    else
        expect probe '"cuda_devices":[0-9]+' || return 1
    fi
}

p_torch_baseline() {
    NCCL_DEBUG=WARN run torch "$py" - "$cuda" <<'EOF' || return 1
import sys
import torch
import torch.distributed as dist
device = sys.argv[1]
backend = "nccl" if device == "cuda" else "gloo"
dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
x = torch.arange(1 << 20, dtype=torch.float32, device=device)
op = dist.ReduceOp.AVG if backend == "nccl" else dist.ReduceOp.SUM
dist.all_reduce(x, op=op)
if device == "cuda":
    torch.cuda.synchronize()
ok = torch.equal(x.cpu(), torch.arange(1 << 20, dtype=torch.float32))
nccl = ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else "-"
print(f"torch {torch.__version__} cuda {torch.version.cuda} nccl {nccl}: {backend} all_reduce at world 1 {'ok' if ok else 'WRONG'}")
dist.destroy_process_group()
sys.exit(0 if ok else 1)
EOF
}

p_doctor() {
    run doctor cohort doctor || return 1
    if [[ "$mode" == gpu ]]; then
        expect doctor 'collective backend \(auto\): nccl'
    else
        expect doctor 'collective backend \(auto\): tcp'
    fi
}

# The preflight: one stage, one budget (GPU_CHECK_PREFLIGHT_S, 20 s) for all
# of its parts, each part getting what the earlier ones left. A part that
# fails or runs out of time names itself; the parts' wall times go to the
# summary line.
preflight_s="${GPU_CHECK_PREFLIGHT_S:-20}"
[[ "$preflight_s" =~ ^[0-9]+$ ]] || die "GPU_CHECK_PREFLIGHT_S=$preflight_s: a number of seconds"
c_preflight() {
    local deadline=$((SECONDS + check_limit)) part fn t0 times=() rc=0
    kill_after=2
    for part in binaries:p_binaries doctor:p_doctor torch:p_torch_baseline; do
        fn="${part#*:}" part="${part%%:*}"
        check_limit=$((deadline - SECONDS))
        if (( check_limit < 1 )); then
            echo "check: preflight: $part: not run, the preflight's ${preflight_s} s budget is spent (${times[*]})"
            rc=1
            break
        fi
        limit_what="the $check_limit s left of the preflight's $preflight_s s budget"
        t0=$SECONDS
        "$fn" || rc=1
        times+=("$part $((SECONDS - t0)) s")
        # The part said why (its own "check:" line, which the summary shows).
        (( rc == 0 )) || break
    done
    local IFS=,
    echo "${times[*]}" | sed 's/,/, /g; s/$/ of '"$preflight_s"' s/' > "$check_dir/note"
    return "$rc"
}

# The first NCCL check runs with NCCL_DEBUG=WARN: NCCL says why it failed.
c_collectives() {
    local op
    for op in sum avg; do
        NCCL_DEBUG=WARN run "collectives-$op" cohort bench collectives --backend "$nccl" --nproc "$ranks" \
            --op all_reduce,reduce_scatter,all_gather,broadcast --reduce "$op" \
            --min-bytes 1K --max-bytes 64M --factor 16 --iters 5 --warmup 2 \
            --json "$out/collectives-$op.json" || return 1
        expect "collectives-$op" '#wrong' || return 1
    done
}

c_dtypes() {
    local dtype
    for dtype in bf16 f16 f64 i64 u8; do
        run "collectives-$dtype" cohort bench collectives --backend "$nccl" --nproc "$ranks" --dtype "$dtype" \
            --op all_reduce,reduce_scatter,all_gather,broadcast --reduce avg \
            --min-bytes 1K --max-bytes 1M --factor 32 --iters 2 --warmup 1 || return 1
    done
}

# The quickstart's model at world 1, fp32, 20 steps: one run per variant.
small=(configs/quickstart.toml --nproc-per-node 1 --set train.max_steps=20 --set train.log_every=1
       --set train.eval_every=0)

# Two launches of one CUDA run need not agree bit for bit: libtorch's
# deterministic-algorithms switch is not reachable from the worker (tch 0.24
# binds no setDeterministicAlgorithms, and libtorch reads no environment
# variable for it), and the embedding and attention backwards may sum with
# atomics. So the TCP run is launched twice: NCCL vs TCP must agree within
# max(1e-6, 10 x the TCP-vs-TCP noise floor), and a floor above 1e-3 fails
# (the comparison would mean nothing). CUBLAS_WORKSPACE_CONFIG makes cuBLAS
# itself reproducible. A quickstart-sized run is mostly start-up: the two
# extra launches cost ~10-20 s of the budget.
c_nccl_vs_tcp() {
    local stage
    export CUBLAS_WORKSPACE_CONFIG=:4096:8
    for stage in 0 2; do
        train "nccl-z$stage" "${small[@]}" --set train.device="$cuda" \
            --set parallel.backend="$nccl" --set parallel.zero_stage=$stage || return 1
        expect "nccl-z$stage" "collectives: $nccl" || return 1
        train "tcp-z$stage" "${small[@]}" --set train.device="$cuda" \
            --set parallel.backend=tcp --set parallel.zero_stage=$stage || return 1
        train "tcp-z$stage-again" "${small[@]}" --set train.device="$cuda" \
            --set parallel.backend=tcp --set parallel.zero_stage=$stage || return 1
        same "nccl-z$stage" "tcp-z$stage" 1e-6 loss,grad_norm 0 "tcp-z$stage" "tcp-z$stage-again" || return 1
    done
}

c_device_vs_host() {
    train device "${small[@]}" --set train.device="$cuda" --set parallel.backend=tcp || return 1
    train host "${small[@]}" --set train.device=cpu --set parallel.backend=tcp || return 1
    same device host 1e-4 loss
}

c_shared_gpu() {
    local stage
    for stage in 0 2; do
        train "shared-z$stage" configs/quickstart.toml --nproc-per-node 2 --set train.max_steps=20 \
            --set train.log_every=1 --set train.device="$cuda" --set parallel.backend=tcp \
            --set parallel.zero_stage=$stage || return 1
        expect "shared-z$stage" 'collectives: tcp' 'step 20/20' 'job succeeded' || return 1
    done
}

big=(configs/gpt-100m.toml --set train.device="$cuda" --set train.log_every=1 "${shrink[@]}")

c_gpt_zero() {
    local stage
    for stage in 0 1 2; do
        train "gpt-z$stage" "${big[@]}" --set train.max_steps=20 --set parallel.zero_stage=$stage || return 1
        expect "gpt-z$stage" "collectives: $nccl" 'step 20/20' 'job succeeded' || return 1
    done
}

# 40 steps with checkpoints at 20 and 40; then a resume from step 20 that
# must retrace steps 21-40 of the first run.
c_resume() {
    local ckpt="$work/ckpt"
    train full "${big[@]}" --set train.max_steps=40 \
        --set checkpoint.dir="$ckpt" --set checkpoint.every=20 || return 1
    expect full 'step 40/40' 'job succeeded' || return 1
    [[ -d "$ckpt/step-00000020" ]] || { echo "check: full: no $ckpt/step-00000020"; ls "$ckpt"; return 1; }
    train resumed "${big[@]}" --set train.max_steps=40 --resume "$ckpt/step-00000020" \
        --set checkpoint.dir="$work/ckpt-resumed" --set checkpoint.every=20 || return 1
    expect resumed 'resum.* step 20' 'step 40/40' 'job succeeded' || return 1
    # The first run's steps 21-40 against the resumed run's.
    same full resumed 1e-3 loss,grad_norm 21
}

c_tokens() {
    run tokens "$py" bench/gpu_vs_torch.py --worker "$bin/cohort-worker" --json "$out/gpu_vs_torch.json" || return 1
    expect tokens 'ratio cohort/PyTorch'
}

say "# $(date -u +%FT%TZ) on $(hostname): mode $mode, budget $budget s"
if [[ "$mode" == gpu ]]; then
    nvidia-smi -L 2>&1 | tee -a "$log"
fi

check "preflight, one ${preflight_s} s budget: the worker links libtorch_cuda and sees CUDA, cohort doctor picks nccl (tcp without a GPU), PyTorch's own NCCL all_reduce at world 1" any "$preflight_s" c_preflight
check "NCCL collectives at world 1: every op, Sum and Avg, f32" nccl 90 c_collectives
check "NCCL collectives at world 1: bf16 f16 f64 i64 u8" nccl 60 c_dtypes
check "NCCL vs TCP at world 1 on CUDA, DDP and ZeRO-2: loss, grad norm within 1e-6 or 10x the noise floor" nccl 150 c_nccl_vs_tcp
check "CUDA device path vs CPU host path, fp32: losses within 1e-4" gpu 90 c_device_vs_host
check "2 ranks sharing the GPU over TCP (staged), DDP and ZeRO-2" gpu 90 c_shared_gpu
check "gpt-100m over NCCL in bf16, ZeRO-0, 1 and 2" nccl 150 c_gpt_zero
check "gpt-100m checkpoint at step 20, resume retraces steps 21-40" nccl 120 c_resume
check "tokens/s vs PyTorch eager" gpu-only 120 c_tokens

# Every metrics file and log is already under $out; the summary last.
{
    printf '%s\n' "${results[@]}"
    echo
    echo "total $((SECONDS - started_all)) s of a $budget s budget; mode $mode"
    grep -A6 '^# .*rounds alternating' "$log" || true
} > "$out/summary.txt"
say ""
say "=== summary"
tee -a "$log" < "$out/summary.txt"
! grep -q '^FAIL' "$out/summary.txt"
