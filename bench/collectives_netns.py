#!/usr/bin/env python3
"""cohort's collectives across simulated hosts: network namespaces on one
machine, each host's link rate-limited with tc tbf.

Makes --hosts hosts with scripts/netns-hosts.sh (each a network namespace
with its own address in 198.18.0.0/15 and hostname, on one bridge), limits
every link to --rate in both directions (tc tbf), and runs `cohort bench collectives` in its worker mode
with --ranks-per-host ranks in each host (rank = host × k + local rank, as
cohort launch numbers them), bootstrapping through a file store both hosts
see. Hosts on namespaces share the kernel and /dev/shm but not their network,
so cohort takes them for separate hosts (shared memory within one, TCP
between them).

Each round runs every --algos in turn on the same sizes; the table shows the
medians over rounds, each algorithm's busbw against the flat ring's, and
against the bound the link allows: an all_reduce over n hosts must move, per
host and direction, 2(n-1)/n of the buffer if it is node-aware and
2(N-1)/N (N = n·k ranks) as a flat ring, so the bound time is those bytes
over the link's rate (payload only: TCP and IP headers take ~4% of the wire).

Needs root (ip netns, tc). The net it makes is named cohort-bench-<pid> and
removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/collectives_netns.py --rate 1gbit --min-bytes 64M --max-bytes 64M --repeats 5
    sudo .venv/bin/python bench/collectives_netns.py --rate off --algos ring,tree,doubling,hierarchical
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

NAME = f"cohort-bench-{os.getpid()}"
NETNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "netns-hosts.sh")


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def netns(*args, check=True):
    return sh("bash", NETNS, *args, check=check)


def parse_rate(rate):
    """Bytes per second of a tc rate like 1gbit, 100mbit."""
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    sys.exit(f"error: --rate {rate!r}: use e.g. 1gbit, 100mbit or off")


class Hosts:
    """n hosts made by scripts/netns-hosts.sh (see there); removed on close."""

    def __init__(self, n, rate):
        self.n = n
        netns("up", NAME, str(n))
        self.up = True
        if rate != "off":
            for i in range(n):
                netns("limit", NAME, str(i), rate)

    def exec(self, i, *cmd):
        """The command line that runs `cmd` on host i."""
        return [NETNS, "exec", NAME, str(i), *cmd]

    @staticmethod
    def addr(i):
        return netns("addr", NAME, str(i)).stdout.strip()

    def close(self):
        if self.up:
            netns("down", NAME, check=False)
            self.up = False


LINK_CHECK = r"""
import socket, sys, time, threading
role, peer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5201)); s.listen(4)
    def drain(c):
        while c.recv(1 << 20): pass
    ts = [threading.Thread(target=drain, args=(s.accept()[0],)) for _ in range(2)]
    [t.start() for t in ts]; [t.join() for t in ts]
else:
    buf = bytes(1 << 20)
    conns = [socket.create_connection((peer, 5201)) for _ in range(2)]
    def blast(c, out):
        t0 = time.perf_counter()
        for _ in range(n): c.sendall(buf)
        c.shutdown(socket.SHUT_WR); c.recv(1); out.append(n * len(buf) / (time.perf_counter() - t0))
    out = []
    ts = [threading.Thread(target=blast, args=(c, out)) for c in conns]
    [t.start() for t in ts]; [t.join() for t in ts]
    if len(out) != 2: sys.exit("a sender failed")
    print(sum(out))
"""


def link_check(hosts, megabytes):
    """Goodput host 0 -> host 1 over two TCP connections, bytes per second."""
    recv = subprocess.Popen(hosts.exec(1, sys.executable, "-c", LINK_CHECK, "recv", "", "0"))
    try:
        for _ in range(100):
            out = sh(*hosts.exec(0, sys.executable, "-c", LINK_CHECK, "send", hosts.addr(1),
                                 str(megabytes)), check=False)
            if out.returncode == 0:
                return float(out.stdout)
            time.sleep(0.05)
        sys.exit(f"error: link check failed: {out.stderr}")
    finally:
        recv.kill()
        recv.wait()


def run_job(hosts, args, algo, out_dir):
    """One `cohort bench collectives` job over every host; rank 0's rows."""
    world = hosts.n * args.ranks_per_host
    store = tempfile.mkdtemp(dir=out_dir)
    token = os.urandom(16).hex()
    procs = []
    addrs = [hosts.addr(i) for i in range(hosts.n)]
    try:
        for rank in range(world):
            i = rank // args.ranks_per_host
            env = dict(os.environ, COHORT_TOKEN=token, COHORT_HOST=addrs[i],
                       COHORT_COLLECTIVE_TIMEOUT_S=str(args.timeout))
            cmd = hosts.exec(i, args.cohort, "bench", "collectives", f"--nproc={world}", f"--op={args.op}", f"--algo={algo}",
                   f"--transport={args.transport}", f"--dtype={args.dtype}",
                   f"--min-bytes={args.min_bytes}", f"--max-bytes={args.max_bytes}",
                   f"--factor={args.factor}", f"--iters={args.iters}", f"--warmup={args.warmup}",
                   f"--worker-rank={rank}", f"--store={store}")
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        out, err0 = procs[0].communicate(timeout=args.timeout)
        for rank, p in enumerate(procs):
            p.wait(timeout=args.timeout)
            if p.returncode != 0:
                err = err0 if rank == 0 else p.stderr.read()
                sys.exit(f"error: rank {rank} ({algo}) failed:\n{err}")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def bound_bytes(op, hosts, k, algo, nbytes):
    """Bytes per host and direction the algorithm must move across its link."""
    n, world = hosts, hosts * k
    if op != "all_reduce":
        return None
    if algo == "hierarchical":
        return 2 * (n - 1) / n * nbytes
    if algo == "ring":
        return 2 * (world - 1) / world * nbytes
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", default=os.environ.get("COHORT_BIN", "target/release/cohort"))
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tc tbf rate of every link, or off")
    p.add_argument("--algos", default="ring,hierarchical")
    p.add_argument("--transport", default="auto")
    p.add_argument("--op", default="all_reduce")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--min-bytes", default="64M")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=int, default=600, help="seconds one job may take")
    p.add_argument("--json", default="bench/out/collectives_netns.json")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: namespaces and tc need root")
    if not os.path.exists(args.cohort):
        sys.exit(f"error: {args.cohort} not found: cargo build --release --bin cohort")
    args.cohort = os.path.abspath(args.cohort)
    algos = args.algos.split(",")
    rate_bps = None if args.rate == "off" else parse_rate(args.rate)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    hosts, goodput = None, None
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rounds = []
    try:
        hosts = Hosts(args.hosts, args.rate)
        goodput = link_check(hosts, 64 if rate_bps else 512)
        print(f"# link check: {goodput / 1e6:.1f} MB/s of TCP payload from host 0 to host 1"
              + (f" ({100 * goodput / rate_bps:.1f}% of {args.rate})" if rate_bps else ""),
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                print(f"# round {r + 1}/{args.repeats}: {', '.join(algos)}", flush=True)
                rounds.append({a: run_job(hosts, args, a, tmp) for a in algos})
    finally:
        if hosts is not None:
            hosts.close()
    load_after = os.getloadavg()

    med = statistics.median
    k = args.ranks_per_host
    print()
    print(f"# {args.hosts} hosts x {k} ranks (network namespaces), links {args.rate} each way, "
          f"{args.op} {args.dtype}, {args.iters} timed + {args.warmup} warmup iterations, "
          f"{args.repeats} round(s), {started}, {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after; medians over rounds")
    print(f"# link check: {goodput / 1e6:.1f} MB/s of TCP payload one way; the bound is the "
          f"bytes to move over {args.rate} (and, in brackets, over the measured goodput)")
    print("| size | algorithm | mean (us) | p99 (us) | busbw (GB/s) | vs flat ring | of the link bound | per-round busbw |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    table = []
    for i, row in enumerate(rounds[0][algos[0]]):
        for a in algos:
            rows = [rnd[a][i] for rnd in rounds]
            bw = [x["busbw_gbps"] for x in rows]
            vs = ""
            if "ring" in algos and a != "ring":
                ratios = [x["busbw_gbps"] / rnd["ring"][i]["busbw_gbps"] for x, rnd in zip(rows, rounds)]
                vs = f"{med(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            of_bound = ""
            need = bound_bytes(args.op, args.hosts, k, a, row["bytes"])
            if need and rate_bps:
                fractions = [need / rate_bps / (x["time_us"] / 1e6) for x in rows]
                of_goodput = med(need / goodput / (x["time_us"] / 1e6) for x in rows)
                of_bound = (f"{100 * med(fractions):.0f}% ({100 * min(fractions):.0f}-"
                            f"{100 * max(fractions):.0f}%) [{100 * of_goodput:.0f}%]")
            print(f"| {row['bytes']} | {rows[0]['algo']} | {med(x['time_us'] for x in rows):.0f} | "
                  f"{med(x['p99_us'] for x in rows):.0f} | {med(bw):.3f} | {vs} | {of_bound} | "
                  f"{' '.join(f'{b:.3f}' for b in bw)} |")
            table.append({"bytes": row["bytes"], "algo": a, "rows": rows})
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "started": started, "goodput_bps": goodput,
                   "load_before": load_before,
                   "load_after": load_after, "table": table}, f, indent=1)
    print(f"\n# wrote {args.json}")
    if any(x["wrong"] for t in table for x in t["rows"]):
        sys.exit("error: cohort reported wrong results")


if __name__ == "__main__":
    main()
