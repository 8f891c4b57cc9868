#!/usr/bin/env python3
"""cohort's collectives side by side with OpenMPI and PyTorch's Gloo, on one host.

Sides (--sides, comma-separated; every side runs the same ops, sizes, dtype,
world size and iteration counts):

  cohort-tcp   cohort bench collectives --transport tcp (loopback TCP)
  cohort-shm   cohort bench collectives --transport shm (shared memory)
  mpi-tcp      OpenMPI through mpi4py, --mca btl self,tcp on loopback
  mpi-vader    OpenMPI through mpi4py, --mca btl self,vader (shared memory)
  gloo         torch.distributed, gloo backend, 127.0.0.1

Every side is timed the same way: refill the buffer, barrier, time the op
alone, barrier; an iteration's time is its slowest rank's; per size the mean,
median and p99 of those times and the busbw (nccl-tests' factors). The OpenMPI
sides need bench/setup_mpi.sh (OpenMPI and mpi4py; not needed by make test).

Placement is the same for cohort and OpenMPI: unbound (mpirun --bind-to none),
or with --bind every rank on its own core (mpirun --bind-to core, cohort bench
collectives --bind). One pass says little on a shared machine: --repeats R runs R rounds, each
running every side once in turn, and reports per size the median over rounds
of each side's numbers, the per-round ratios of cohort against its peer
(cohort-tcp/mpi-tcp, cohort-shm/mpi-vader, each cohort side/gloo), and in how
many rounds cohort's mean was at most the peer's and its p99 at most twice
the peer's.

    bash bench/setup_mpi.sh
    .venv/bin/python bench/collectives_vs_peers.py --nproc 2 --min-bytes 4K --max-bytes 4K --iters 500 --repeats 5
    .venv/bin/python bench/collectives_vs_peers.py --nproc 4 --min-bytes 64M --max-bytes 64M --sides cohort-shm,mpi-vader
    COHORT_BIN=target/release/cohort .venv/bin/python bench/collectives_vs_peers.py --sides cohort-tcp,gloo
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DTYPES = ["f32", "f64", "f16", "bf16", "i32", "i64", "u8"]
SIDES = ["cohort-tcp", "cohort-shm", "mpi-tcp", "mpi-vader", "gloo"]
# (cohort side, peer side) pairs compared.
PAIRS = [("cohort-tcp", "mpi-tcp"), ("cohort-shm", "mpi-vader"),
         ("cohort-tcp", "gloo"), ("cohort-shm", "gloo")]
BUSBW = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}
HERE = os.path.dirname(os.path.abspath(__file__))


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


def summary(times):
    t = sorted(times)
    n = len(t)
    median = t[n // 2] if n % 2 else (t[n // 2 - 1] + t[n // 2]) / 2
    p99 = t[max(1, -(-n * 99 // 100)) - 1]
    return sum(t) / n, median, p99


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_worker(rank, world, port, args, out_path):
    import torch
    import torch.distributed as dist

    dtypes = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
              "bf16": torch.bfloat16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = dtypes[args.dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for op in args.op.split(","):
        for nbytes in sizes(args):
            count = nbytes // elem
            pristine = ((torch.arange(count) + 3 * rank) % 11).to(dtype)
            buf = torch.empty(count, dtype=dtype)
            shard = count // world
            times, error = [], None
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
                            buf[: shard * world], buf[rank * shard: (rank + 1) * shard].clone())
                    elif op == "reduce_scatter":
                        out = torch.empty(shard, dtype=dtype)
                        dist.reduce_scatter_tensor(out, buf[: shard * world])
                    took = time.perf_counter() - t0
                except RuntimeError as e:  # an op gloo lacks
                    error = str(e).splitlines()[0]
                    break
                if it >= args.warmup:
                    times.append(took * 1e6)
                dist.barrier()
            if error is not None:
                rows.append({"op": op, "bytes": count * elem, "error": error})
                continue
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mean, median, p99 = summary(t.tolist())
            algbw = count * elem / mean / 1e3 if mean > 0 else 0.0
            rows.append({"op": op, "dtype": args.dtype, "bytes": count * elem, "count": count,
                         "world": world, "time_us": mean, "median_us": median, "p99_us": p99,
                         "algbw_gbps": algbw, "busbw_gbps": algbw * BUSBW[op](world)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_cohort(args, transport, out_path):
    cmd = [args.cohort, "bench", "collectives", f"--nproc={args.nproc}", f"--op={args.op}",
           *(["--bind"] if args.bind else []),
           f"--algo={args.algo}", f"--transport={transport}", f"--dtype={args.dtype}",
           f"--min-bytes={args.min_bytes}", f"--max-bytes={args.max_bytes}",
           f"--factor={args.factor}", f"--iters={args.iters}", f"--warmup={args.warmup}",
           f"--json={out_path}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out_path) as f:
        return json.load(f)


def run_mpi(args, btl, out_path):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(args.nproc),
           "--bind-to", "core" if args.bind else "none", "--mca", "btl", btl]
    if "tcp" in btl:
        cmd += ["--mca", "btl_tcp_if_include", "lo"]
    cmd += [sys.executable, os.path.join(HERE, "mpi_collectives.py"), f"--op={args.op}",
            f"--dtype={args.dtype}", "--sizes=" + ",".join(map(str, sizes(args))),
            f"--iters={args.iters}", f"--warmup={args.warmup}", f"--json={out_path}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out_path) as f:
        return json.load(f)


def run_gloo(args, out_path):
    import torch.multiprocessing as mp

    mp.spawn(gloo_worker, args=(args.nproc, free_port(), args, out_path), nprocs=args.nproc)
    with open(out_path) as f:
        return json.load(f)


def run_side(side, args, out_path):
    if side.startswith("cohort-"):
        return run_cohort(args, side.split("-", 1)[1], out_path)
    if side == "mpi-tcp":
        return run_mpi(args, "self,tcp", out_path)
    if side == "mpi-vader":
        return run_mpi(args, "self,vader", out_path)
    return run_gloo(args, out_path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", default=os.environ.get("COHORT_BIN", "target/release/cohort"),
                   help="the cohort binary (env COHORT_BIN; default target/release/cohort)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated: " + ", ".join(SIDES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--op", default="all_reduce",
                   help="comma-separated: all_reduce,reduce_scatter,all_gather,broadcast")
    p.add_argument("--algo", default="auto", help="cohort's algorithm")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="rounds, each running every side once")
    p.add_argument("--bind", action="store_true",
                   help="bind rank r to core r on the cohort and OpenMPI sides (mpirun --bind-to core, "
                        "cohort bench collectives --bind); unbound otherwise (Gloo is never bound)")
    p.add_argument("--json", default="bench/out/collectives_vs_peers.json", help="where to write all rows")
    args = p.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        sys.exit(f"error: unknown sides {unknown}: use {', '.join(SIDES)}")
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    if any(s.startswith("cohort-") for s in sides) and not os.path.exists(args.cohort):
        sys.exit(f"error: {args.cohort} not found: build it (cargo build --release --bin cohort) "
                 "or point --cohort / COHORT_BIN at it")
    if any(s.startswith("mpi-") for s in sides) and (
            not shutil.which("mpirun") or subprocess.run(
                [sys.executable, "-c", "import mpi4py"], capture_output=True).returncode):
        sys.exit("error: the mpi sides need OpenMPI and mpi4py: run bash bench/setup_mpi.sh")

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rounds = []  # per round: {side: rows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            print(f"# round {r + 1}/{args.repeats}: {', '.join(sides)}", flush=True)
            rounds.append({s: run_side(s, args, os.path.join(tmp, f"{s}-{r}.json")) for s in sides})
    load_after = os.getloadavg()

    med = statistics.median
    print()
    print(f"# {args.nproc} ranks ({'bound to cores' if args.bind else 'unbound'}), {args.op}, "
          f"{args.dtype}, {args.iters} timed + {args.warmup} warmup "
          f"iterations, {os.cpu_count()} CPUs, {args.repeats} round(s), {started}, load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after; medians over the rounds")
    print("| op | size | side | mean (us) | median (us) | p99 (us) | busbw (GB/s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    keyed = [{s: {(row["op"], row["bytes"]): row for row in rows} for s, rows in rnd.items()}
             for rnd in rounds]
    keys = [(row["op"], row["bytes"]) for row in rounds[0][sides[0]]]
    table = []
    for key in keys:
        for s in sides:
            rows = [k[s].get(key) for k in keyed]
            if any(r is None or "error" in r for r in rows):
                why = next((r["error"] for r in rows if r and "error" in r), "not run")
                print(f"| {key[0]} | {key[1]} | {s} | n/a ({why}) | | | |")
                continue
            print(f"| {key[0]} | {key[1]} | {s} | {med(r['time_us'] for r in rows):.1f} | "
                  f"{med(r['median_us'] for r in rows):.1f} | {med(r['p99_us'] for r in rows):.1f} | "
                  f"{med(r['busbw_gbps'] for r in rows):.3f} |")
    print()
    print("| op | size | cohort / peer | mean ratio | p99 ratio | busbw ratio | per-round mean ratios "
          "| rounds with mean <= 1.0x and p99 <= 2x |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for key in keys:
        for ours, theirs in PAIRS:
            if ours not in sides or theirs not in sides:
                continue
            pairs = [(k[ours].get(key), k[theirs].get(key)) for k in keyed]
            if any(a is None or b is None or "error" in b for a, b in pairs):
                continue
            t = [a["time_us"] / b["time_us"] for a, b in pairs]
            p99 = [a["p99_us"] / b["p99_us"] for a, b in pairs]
            bw = [a["busbw_gbps"] / b["busbw_gbps"] if b["busbw_gbps"] else float("inf") for a, b in pairs]
            met = sum(1 for x, y in zip(t, p99) if x <= 1.0 and y <= 2.0)
            print(f"| {key[0]} | {key[1]} | {ours} / {theirs} | {med(t):.2f}x | {med(p99):.2f}x | "
                  f"{med(bw):.2f}x | {' '.join(f'{x:.2f}' for x in t)} | {met} of {len(pairs)} |")
            table.append({"op": key[0], "bytes": key[1], "ours": ours, "theirs": theirs,
                          "time_ratios": t, "p99_ratios": p99, "busbw_ratios": bw, "rounds_met": met})
    machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
               "kernel": platform.release(), "started": started,
               "load_before": load_before, "load_after": load_after}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": machine, "rounds": rounds, "ratios": table}, f, indent=1)
    print(f"\n# wrote {args.json}")
    if any(r.get("wrong") for rnd in rounds for rows in rnd.values() for r in rows):
        sys.exit("error: a side reported wrong results")


if __name__ == "__main__":
    main()
