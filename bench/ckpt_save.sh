#!/usr/bin/env bash
# Checkpoint save throughput vs the disk's sequential write bandwidth (dd with
# fsync), both measured in one run on the same filesystem.
#
#   bench/ckpt_save.sh [DIR] [MIB_PARAMS]
#
# DIR (default bench/out/ckpt-save) must be on the filesystem you checkpoint
# to; MIB_PARAMS (default 300) is the flat f32 parameter size: AdamW's two
# moments make each checkpoint 3x that. World sizes 1 and 2 (one thread and
# one Saver per rank), sync and async, REPEAT (default 5) runs each; every
# save is paired with a dd run of the same size next to it, and the
# median of the per-pair ratios is reported.
# Writes the table to stdout and JSON to bench/out/ckpt_save.json.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-bench/out/ckpt-save}
mb=${2:-300}
mkdir -p bench/out "$dir"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p cohort-checkpoint --example ckpt_save_bench
"$CARGO_TARGET_DIR/release/examples/ckpt_save_bench" \
    --dir "$dir" --mb "$mb" --worlds 1,2 --repeat "${REPEAT:-5}" --json bench/out/ckpt_save.json
rm -rf "$dir"
