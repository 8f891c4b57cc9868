#!/usr/bin/env python3
"""The OpenMPI side of bench/collectives_vs_peers.py: one rank of an mpi4py
benchmark, started by mpirun (the BTL, tcp or vader, is chosen there).

Timed like `cohort bench collectives`: every iteration refills the buffer,
barriers, times the op alone, barriers; each iteration's time is its slowest
rank's; rank 0 writes one JSON row per size (mean, median, p99, busbw) and
checks every result.
"""

import argparse
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from collectives_vs_peers import BUSBW, summary

DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64, "u8": np.uint8}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--op", default="all_reduce")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--sizes", required=True, help="comma-separated byte sizes")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    dtype = DTYPES[args.dtype]
    elem = np.dtype(dtype).itemsize
    rows = []
    for op in args.op.split(","):
        for nbytes in map(int, args.sizes.split(",")):
            count = nbytes // elem
            shard = count // world
            pristine = ((np.arange(count) + 3 * rank) % 11).astype(dtype)
            want = sum(((np.arange(count) + 3 * r) % 11) for r in range(world)).astype(dtype)
            buf = np.empty(count, dtype)
            times, wrong = [], 0
            for it in range(args.warmup + args.iters):
                np.copyto(buf, pristine)
                comm.Barrier()
                t0 = time.perf_counter()
                if op == "all_reduce":
                    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
                elif op == "broadcast":
                    comm.Bcast(buf, root=0)
                elif op == "all_gather":
                    comm.Allgather(MPI.IN_PLACE, buf[: shard * world])
                elif op == "reduce_scatter":
                    comm.Reduce_scatter_block(MPI.IN_PLACE, buf[: shard * world], op=MPI.SUM)
                took = time.perf_counter() - t0
                comm.Barrier()
                if it >= args.warmup:
                    times.append(took * 1e6)
                if op == "all_reduce":
                    wrong += int(np.count_nonzero(buf != want))
            times = np.array(times)
            comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
            wrong = comm.allreduce(wrong, op=MPI.SUM)
            mean, median, p99 = summary(list(times))
            algbw = count * elem / mean / 1e3 if mean > 0 else 0.0
            rows.append({
                "op": op, "dtype": args.dtype, "bytes": count * elem, "count": count,
                "world": world, "time_us": mean, "median_us": median, "p99_us": p99,
                "algbw_gbps": algbw, "busbw_gbps": algbw * BUSBW[op](world), "wrong": wrong,
            })
    if rank == 0:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    if any(r["wrong"] for r in rows):
        sys.exit("error: wrong results")


if __name__ == "__main__":
    main()
