#!/usr/bin/env python3
"""Training throughput, side by side: cohort DDP and ZeRO-1 vs PyTorch DDP (gloo).

Both train the same nanoGPT-shaped model (tied embeddings, pre-LayerNorm
blocks, exact GELU, causal scaled-dot-product attention) on the same text
with AdamW (weight decay on >= 2-D tensors), global-norm clipping at 1.0, the
same per-rank batch and block size, 2 ranks on this host with one libtorch
thread each. Runs alternate (cohort DDP, cohort ZeRO-1, PyTorch DDP, repeat)
so drift on a shared machine hits all three alike; the first `--warmup`
steps of every run are dropped.

    .venv/bin/python bench/ddp_vs_torch.py --worker target/release/cohort-worker

With --baseline-worker OTHER/cohort-worker, every round also runs that
binary's DDP and ZeRO-1 (before/after comparisons in one run, alternating).

"comm hidden" is the share of the gradient buckets' reduction time that ran
while the backward pass was still running (metrics.jsonl's
grad_comm_hidden_s / grad_comm_s); for a binary older than that metric, the
old reading (communication time not waited for) is shown instead.

With --link-rate RATE (root: network namespaces), every rank runs on a host
of its own made by scripts/netns-hosts.sh, each host's link rate-limited to
RATE with tc tbf (e.g. 1gbit), cohort and PyTorch alike; each round also runs
cohort's ranks as independent one-rank jobs at the same time (its
compute-only step, under the same CPU load), and the table adds the link's
bound on one gradient all-reduce (2(n-1)/n of the gradient bytes over RATE:
the communication-only time no implementation beats) and cohort's step time
against max(compute-only, that bound).

    sudo .venv/bin/python bench/ddp_vs_torch.py --link-rate 1gbit --bucket-mb 1

Prints a table and writes JSON (--json) with every run.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=os.path.join(ROOT, "target/release/cohort-worker"))
    p.add_argument("--baseline-worker", default=None,
                   help="another cohort-worker to run alongside, every round (e.g. the previous build)")
    p.add_argument("--data", default=os.path.join(ROOT, "configs/data/tiny.txt"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="libtorch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="cohort gradient bucket size in MiB (parallel.bucket_mb)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--link-rate", default=None,
                   help="run each rank on its own namespace host, links limited to this rate (e.g. 1gbit)")
    # Internal: run one PyTorch rank.
    p.add_argument("--torch-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--torch-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------- PyTorch side


def torch_rank(a):
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=a.torch_rank, world_size=a.world)
    torch.manual_seed(1337)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_gpt import GPT, adamw

    model = GPT(a.n_layer, a.n_head, a.n_embd, a.block, 256)
    ddp = nn.parallel.DistributedDataParallel(model)  # 25 MiB buckets, overlapped with backward
    opt = adamw(model, lr=1e-3)
    data = torch.frombuffer(bytearray(open(a.data, "rb").read()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(1337 + a.torch_rank)
    times, losses = [], []
    for step in range(a.steps):
        t0 = time.perf_counter()
        ix = torch.randint(len(data) - a.block - 1, (a.batch,), generator=gen)
        x = torch.stack([data[i : i + a.block] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + a.block] for i in ix])
        lr = 1e-3 * min(1.0, (step + 1) / 11)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    if a.torch_rank == 0:
        with open(a.torch_out, "w") as f:
            json.dump({"step_s": times, "loss": losses}, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs, what, timeout=900):
    deadline = time.time() + timeout
    for p in procs:
        try:
            rc = p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            sys.exit(f"{what}: timed out")
        if rc != 0:
            for q in procs:
                q.kill()
            sys.exit(f"{what}: a rank exited with {rc}")


def summarize(step_s, a, world, extra=None):
    s = step_s[a.warmup :]
    tokens = world * a.batch * a.block
    out = {
        "tokens_per_s": tokens * len(s) / sum(s),
        "step_ms_median": 1e3 * statistics.median(s),
        "step_ms_mean": 1e3 * sum(s) / len(s),
    }
    out.update(extra or {})
    return out


# Set by main() with --link-rate: the namespace hosts the ranks run on.
HOSTS = None


def on_host(r, cmd):
    """`cmd` as run on rank r's host (this host without --link-rate)."""
    return HOSTS.exec(r, *cmd) if HOSTS else cmd


def host_addr(r):
    return HOSTS.addr(r) if HOSTS else "127.0.0.1"


def run_cohort(a, stage, tmp, worker, alone=False):
    """One cohort run of a.world ranks; `alone`: a.world independent
    one-rank runs at the same time, one per rank's place (compute only,
    under the same CPU load), reported for the first."""
    world = 1 if alone else a.world
    config = os.path.join(tmp, f"cohort-z{stage}.toml")
    with open(config, "w") as f:
        f.write(
            f"""
[train]
max_steps = {a.steps}
batch_size = {a.batch}
log_every = 1000000
threads = {a.threads}
[model]
kind = "gpt"
n_layer = {a.n_layer}
n_head = {a.n_head}
n_embd = {a.n_embd}
block_size = {a.block}
[data]
kind = "text"
path = "{a.data}"
val_fraction = 0.0
[optim]
lr = 1e-3
min_lr = 1e-3
warmup_steps = 10
weight_decay = 0.1
grad_clip = 1.0
[parallel]
zero_stage = {stage}
bucket_mb = {a.bucket_mb}
"""
        )
    run_dir = tempfile.mkdtemp(dir=tmp)
    procs = []
    for r in range(a.world):
        env = dict(os.environ)
        if HOSTS:
            env["COHORT_HOST"] = host_addr(r)
        rank = 0 if alone else r
        logs = os.path.join(run_dir, f"logs{r}" if alone and r > 0 else "logs")
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
            COHORT_TOKEN="bench", COHORT_STORE_DIR=os.path.join(run_dir, "store"),
            COHORT_LOG_DIR=logs, OMP_NUM_THREADS=str(a.threads),
            COHORT_RESUME="never",
        )
        procs.append(subprocess.Popen(on_host(r, [worker, "train", "--config", config]), env=env,
                                      stdout=subprocess.DEVNULL))
    wait_all(procs, f"cohort zero_stage={stage}")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "logs", "metrics.jsonl"))]
    kept = rows[a.warmup :]
    step = sum(r["step_s"] for r in kept)
    comm = sum(r["comm_s"] for r in kept)
    wait = sum(r["comm_wait_s"] for r in kept)
    if "grad_comm_s" in kept[0]:
        grad = sum(r["grad_comm_s"] for r in kept)
        hidden = sum(r["grad_comm_hidden_s"] for r in kept) / grad if grad > 0 else 0.0
    else:
        hidden = max(0.0, (comm - wait) / comm) if comm > 0 else 0.0
    return summarize([r["step_s"] for r in rows], a, world, {
        "comm_not_hidden_share": wait / step,
        "comm_hidden_fraction": hidden,
        "buckets_in_backward": sum(r.get("buckets_in_backward", 0) for r in kept) / len(kept),
        "compute_share": sum(r["compute_s"] for r in kept) / step,
        "optimizer_share": sum(r["optimizer_s"] for r in kept) / step,
        "final_loss": rows[-1]["loss"],
    })


def run_torch(a, tmp):
    out = os.path.join(tmp, "torch.json")
    port = free_port()
    procs = []
    for r in range(a.world):
        env = dict(os.environ, MASTER_ADDR=host_addr(0), MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(a.threads))
        if HOSTS:
            env["GLOO_SOCKET_IFNAME"] = "eth0"
        args = [sys.executable, os.path.abspath(__file__), "--torch-rank", str(r), "--torch-out", out,
                "--data", a.data, "--steps", str(a.steps), "--world", str(a.world),
                "--threads", str(a.threads), "--batch", str(a.batch), "--n-layer", str(a.n_layer),
                "--n-head", str(a.n_head), "--n-embd", str(a.n_embd), "--block", str(a.block)]
        procs.append(subprocess.Popen(on_host(r, args), env=env))
    wait_all(procs, "pytorch ddp")
    res = json.load(open(out))
    return summarize(res["step_s"], a, a.world, {"final_loss": res["loss"][-1]})


def main():
    a = parse_args()
    if a.torch_rank is not None:
        return torch_rank(a)
    for w in [a.worker] + ([a.baseline_worker] if a.baseline_worker else []):
        if not os.path.exists(w):
            sys.exit(f"{w} not found: build it with `cargo build --release --bin cohort-worker`")
    runs = {"cohort_ddp": [], "cohort_zero1": [], "torch_ddp": []}
    if a.baseline_worker:
        runs.update({"baseline_ddp": [], "baseline_zero1": []})
    global HOSTS
    if a.link_rate:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from collectives_netns import Hosts, parse_rate

        rate_bps = parse_rate(a.link_rate)
        HOSTS = Hosts(a.world, a.link_rate)
        runs["cohort_compute_only"] = []
    try:
        run_rounds(a, runs)
    finally:
        if HOSTS:
            HOSTS.close()
    report(a, runs, rate_bps if a.link_rate else None)


def run_rounds(a, runs):
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            if HOSTS:
                runs["cohort_compute_only"].append(run_cohort(a, 0, tmp, a.worker, alone=True))
            runs["cohort_ddp"].append(run_cohort(a, 0, tmp, a.worker))
            if a.baseline_worker:
                runs["baseline_ddp"].append(run_cohort(a, 0, tmp, a.baseline_worker))
            runs["cohort_zero1"].append(run_cohort(a, 1, tmp, a.worker))
            if a.baseline_worker:
                runs["baseline_zero1"].append(run_cohort(a, 1, tmp, a.baseline_worker))
            runs["torch_ddp"].append(run_torch(a, tmp))
            print(f"repeat {i + 1}/{a.repeats}: " + ", ".join(
                f"{k} {v[-1]['tokens_per_s']:.0f} tok/s" for k, v in runs.items()), flush=True)


def report(a, runs, rate_bps):
    med = lambda k, f: statistics.median(r[f] for r in runs[k])
    params = 12 * a.n_layer * a.n_embd ** 2 + (256 + a.block) * a.n_embd
    print(f"\ngpt n_layer={a.n_layer} n_head={a.n_head} n_embd={a.n_embd} block={a.block} "
          f"(~{params / 1e6:.2f} M params), {a.world} ranks x batch {a.batch}, "
          f"{a.threads} thread(s)/rank, {a.steps} steps ({a.warmup} warmup dropped), "
          f"median of {a.repeats} runs\n")
    print(f"| run | tokens/s | step ms (median) | comm not hidden (share of step) | comm hidden |")
    print(f"|---|---:|---:|---:|---:|")
    for k in runs:
        extra = ("| {:.1%} | {:.0%} |".format(med(k, "comm_not_hidden_share"), med(k, "comm_hidden_fraction"))
                 if not k.startswith("torch") else "| - | - |")
        print(f"| {k} | {med(k, 'tokens_per_s'):.0f} | {med(k, 'step_ms_median'):.1f} {extra}")
    ratio = med("cohort_ddp", "tokens_per_s") / med("torch_ddp", "tokens_per_s")
    zero = med("cohort_zero1", "step_ms_median") / med("cohort_ddp", "step_ms_median")
    print(f"\ncohort DDP / PyTorch DDP tokens/s: {ratio:.2f}x (goal >= 1.1x)")
    print(f"cohort ZeRO-1 / DDP step time:     {zero:.2f}x (goal <= 1.1x)")
    if a.baseline_worker:
        for k in ("ddp", "zero1"):
            r = med(f"cohort_{k}", "tokens_per_s") / med(f"baseline_{k}", "tokens_per_s")
            print(f"cohort {k} / baseline {k} tokens/s: {r:.2f}x")
    bound = {}
    if rate_bps:
        grad_bytes = 4 * params
        comm_bound_ms = 1e3 * 2 * (a.world - 1) / a.world * grad_bytes / rate_bps  # bytes/s
        compute_ms = med("cohort_compute_only", "step_ms_median")
        step_ms = med("cohort_ddp", "step_ms_median")
        bound = {"comm_bound_ms": comm_bound_ms, "compute_only_ms": compute_ms,
                 "step_over_bound": step_ms / max(compute_ms, comm_bound_ms)}
        print(f"link {a.link_rate}: one gradient all-reduce ({grad_bytes / 1e6:.2f} MB) needs >= "
              f"{comm_bound_ms:.1f} ms; compute-only step {compute_ms:.1f} ms; cohort DDP step "
              f"{step_ms:.1f} ms = {bound['step_over_bound']:.2f}x max(compute, comm) (goal <= 1.1x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs, "ddp_vs_torch": ratio, "zero1_vs_ddp": zero,
                       **bound}, f, indent=1)


if __name__ == "__main__":
    main()
