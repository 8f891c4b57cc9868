#!/usr/bin/env python3
"""cohort's TCP collectives side by side with PyTorch's Gloo backend.

One invocation runs `cohort bench collectives` and then the same ops, sizes,
dtype, world size and iteration counts through torch.distributed (gloo, N
spawned processes on 127.0.0.1, a free port), timed the same way: refill the buffer,
barrier, time the op alone, barrier (all untimed but the op); the reported
time is the slowest rank's mean over the timed iterations. Prints both with the ratio per
size and writes everything as JSON.

On a shared or noisy machine one run says little: `--repeats R` runs the pair R
times, alternating cohort and Gloo, and reports per size the median time of each
side, the median of the R per-round busbw ratios and their range.

    .venv/bin/python bench/collectives_vs_gloo.py --nproc 2 --max-bytes 64M
    .venv/bin/python bench/collectives_vs_gloo.py --nproc 4 --min-bytes 64M --max-bytes 64M --repeats 5
    COHORT_BIN=target/collectives/release/cohort .venv/bin/python bench/collectives_vs_gloo.py
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {
    "f32": torch.float32,
    "f64": torch.float64,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i32": torch.int32,
    "i64": torch.int64,
    "u8": torch.uint8,
}

BUSBW = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


def parse_size(s):
    s = s.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def sizes(args):
    out, b = [], parse_size(args.min_bytes)
    while b <= parse_size(args.max_bytes):
        out.append(b)
        b *= args.factor
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_worker(rank, world, port, args, out_path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dtype = DTYPES[args.dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for op in args.op.split(","):
        for nbytes in sizes(args):
            count = nbytes // elem
            pristine = (torch.arange(count) + 3 * rank) % 11
            pristine = pristine.to(dtype)
            buf = torch.empty(count, dtype=dtype)
            shard = count // world
            total, error = 0.0, None
            for it in range(args.warmup + args.iters):
                buf.copy_(pristine)
                dist.barrier()
                try:
                    t0 = time.perf_counter()
                    if op == "all_reduce":
                        dist.all_reduce(buf)
                    elif op == "broadcast":
                        dist.broadcast(buf, 0)
                    elif op == "all_gather":
                        dist.all_gather_into_tensor(
                            buf[: shard * world], buf[rank * shard : (rank + 1) * shard].clone()
                        )
                    elif op == "reduce_scatter":
                        out = torch.empty(shard, dtype=dtype)
                        dist.reduce_scatter_tensor(out, buf[: shard * world])
                    took = time.perf_counter() - t0
                except RuntimeError as e:  # an op gloo lacks
                    error = str(e).splitlines()[0]
                    break
                if it >= args.warmup:
                    total += took
                dist.barrier()
            if error is not None:
                rows.append({"op": op, "bytes": count * elem, "error": error})
                continue
            mean = torch.tensor([total * 1e6 / args.iters], dtype=torch.float64)
            dist.all_reduce(mean, op=dist.ReduceOp.MAX)
            t = mean.item()
            algbw = count * elem / t / 1e3 if t > 0 else 0.0
            rows.append(
                {
                    "op": op,
                    "dtype": args.dtype,
                    "bytes": count * elem,
                    "count": count,
                    "world": world,
                    "time_us": t,
                    "algbw_gbps": algbw,
                    "busbw_gbps": algbw * BUSBW[op](world),
                }
            )
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_cohort(args, out_path):
    cmd = [
        args.cohort, "bench", "collectives",
        f"--nproc={args.nproc}", f"--op={args.op}", f"--algo={args.algo}",
        f"--dtype={args.dtype}", f"--min-bytes={args.min_bytes}",
        f"--max-bytes={args.max_bytes}", f"--factor={args.factor}",
        f"--iters={args.iters}", f"--warmup={args.warmup}", f"--json={out_path}",
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=None if args.repeats == 1 else subprocess.DEVNULL)
    with open(out_path) as f:
        return json.load(f)


def run_gloo(args, out_path):
    print(f"# torch {torch.__version__} gloo: {args.nproc} processes on 127.0.0.1", flush=True)
    mp.spawn(gloo_worker, args=(args.nproc, free_port(), args, out_path), nprocs=args.nproc)
    with open(out_path) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", default=os.environ.get("COHORT_BIN", "target/release/cohort"),
                   help="the cohort binary (env COHORT_BIN; default target/release/cohort)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--op", default="all_reduce",
                   help="comma-separated: all_reduce,reduce_scatter,all_gather,broadcast")
    p.add_argument("--algo", default="auto")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds, alternating cohort and gloo; the table shows medians")
    p.add_argument("--json", default="bench/out/collectives_vs_gloo.json", help="where to write all rows")
    args = p.parse_args()
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    if not os.path.exists(args.cohort):
        sys.exit(f"error: {args.cohort} not found: build it (cargo build --release --bin cohort) "
                 "or point --cohort / COHORT_BIN at it")

    load_before = os.getloadavg()
    rounds = []  # (cohort rows, gloo rows) per round
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            if args.repeats > 1:
                print(f"# round {r + 1}/{args.repeats}", flush=True)
            ours = run_cohort(args, os.path.join(tmp, f"cohort{r}.json"))
            theirs = run_gloo(args, os.path.join(tmp, f"gloo{r}.json"))
            rounds.append((ours, theirs))
    load_after = os.getloadavg()

    machine = {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": load_after,
    }
    print()
    print(f"# {args.nproc} ranks, {args.dtype}, {os.cpu_count()} CPUs, {args.repeats} round(s) "
          f"alternating cohort and gloo, load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after" + ("; medians over the rounds" if args.repeats > 1 else ""))
    print(f"| op | size | cohort algo | cohort time (us) | gloo time (us) | cohort busbw (GB/s) "
          f"| gloo busbw (GB/s) | busbw ratio (cohort/gloo) | time ratio (cohort/gloo) |"
          + (" busbw ratio range |" if args.repeats > 1 else ""))
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.repeats > 1 else ""))
    med = statistics.median
    table = []
    for i, r in enumerate(rounds[0][0]):
        key = (r["op"], r["bytes"])
        ours_k = [rows[i] for rows, _ in rounds]
        theirs_k = [{(g["op"], g["bytes"]): g for g in gl}.get(key) for _, gl in rounds]
        if any(g is None or "error" in g for g in theirs_k):
            g = next((g for g in theirs_k if g is not None and "error" in g), None)
            why = g["error"] if g else "not run"
            print(f"| {r['op']} | {r['bytes']} | {r['algo']} | {med(o['time_us'] for o in ours_k):.1f} | "
                  f"n/a ({why}) | {med(o['busbw_gbps'] for o in ours_k):.3f} | n/a | n/a | n/a |")
            table.append({"cohort": ours_k, "gloo": theirs_k})
            continue
        bw_ratios = [o["busbw_gbps"] / g["busbw_gbps"] if g["busbw_gbps"] else float("inf")
                     for o, g in zip(ours_k, theirs_k)]
        t_ratios = [o["time_us"] / g["time_us"] for o, g in zip(ours_k, theirs_k)]
        bw_ratio, t_ratio = med(bw_ratios), med(t_ratios)
        line = (f"| {r['op']} | {r['bytes']} | {r['algo']} | {med(o['time_us'] for o in ours_k):.1f} | "
                f"{med(g['time_us'] for g in theirs_k):.1f} | {med(o['busbw_gbps'] for o in ours_k):.3f} | "
                f"{med(g['busbw_gbps'] for g in theirs_k):.3f} | {bw_ratio:.2f}x | {t_ratio:.3f} |")
        if args.repeats > 1:
            line += f" {min(bw_ratios):.2f}-{max(bw_ratios):.2f}x |"
        print(line)
        table.append({"cohort": ours_k, "gloo": theirs_k, "busbw_ratio": bw_ratio,
                      "time_ratio": t_ratio, "busbw_ratios": bw_ratios, "time_ratios": t_ratios})
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": machine, "rows": table}, f, indent=1)
    print(f"\n# wrote {args.json}")
    if any(r["wrong"] for ours, _ in rounds for r in ours):
        sys.exit("error: cohort reported wrong results")


if __name__ == "__main__":
    main()
