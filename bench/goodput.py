#!/usr/bin/env python3
"""Goodput under failures: in-place recovery (recovery.mode = "peer") vs a
restart from disk (recovery.mode = "restart", a checkpoint every 10 steps).

One fixed job, the 0.84 M-parameter GPT of bench/ddp_vs_torch.py on
configs/data/tiny.txt with `--world` workers on this host, run by the real
`cohort launch`: first failure-free, then with a random worker SIGKILLed
every T seconds (each of `--every`), under each mode. Goodput = failure-free
wall time / wall time with failures (both from `cohort launch` starting to
it exiting 0). From the launcher's output: the recovery lines (in place: the
phase split; restart: the step resumed from), hence the work lost per
failure (steps run again) and the time from a failure to the next step done.

Also the cost of ZeRO's shard mirrors (`--zero-stage 1` or 2): the mean step
time of the failure-free job with mode = "peer" (mirrors refreshed every
step) against mode = "restart" (no mirrors), in the same round.

    .venv/bin/python bench/goodput.py --cohort target/release/cohort --steps 400

Prints a table and writes JSON (--json) with every run.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", default=os.path.join(ROOT, "target/release/cohort"))
    p.add_argument("--data", default=os.path.join(ROOT, "configs/data/tiny.txt"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--every", default="10,30", help="seconds between kills, comma-separated")
    p.add_argument("--modes", default="peer,restart")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None)
    return p.parse_args()


def config(a, tmp, name, mode):
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(
            f"""
[launch]
nproc_per_node = {a.world}
[train]
max_steps = {a.steps}
batch_size = {a.batch}
log_every = 1
eval_every = 0
threads = 1
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
zero_stage = {a.zero_stage}
[checkpoint]
dir = "{os.path.join(tmp, name + '-ckpt')}"
every = 10
keep_last = 2
[recovery]
mode = "{mode}"
"""
        )
    return path


def pid_of(job, rank):
    """The live worker of `rank` in job `job`, by its environment."""
    want = {f"COHORT_JOB_ID={job}".encode(), f"RANK={rank}".encode()}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if want <= env and state not in "ZX":
            return int(d)
    return None


def status_step(logs, job, rank):
    """The step rank `rank` reports in its newest attempt's status file."""
    d = os.path.join(logs, job)
    try:
        attempts = sorted(x for x in os.listdir(d) if x.startswith("attempt_"))
        with open(os.path.join(d, attempts[-1], f"rank_{rank}.status")) as f:
            return json.load(f).get("step")
    except (OSError, IndexError, ValueError):
        return None


def run(a, tmp, name, mode, every=None):
    """One `cohort launch`; with `every`, a random worker is SIGKILLed every
    `every` seconds once training runs. Returns the run's record."""
    cfg = config(a, tmp, name, mode)
    logs = os.path.join(tmp, "logs")
    cmd = [a.cohort, "launch", "--log-dir", logs, "--job-id", name, "--max-restarts", "1000", cfg]
    env = dict(os.environ, RUST_LOG="warn")
    env.pop("COHORT_INJECT_FAULT", None)
    start = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    kills = []
    rng = random.Random(f"{a.seed}-{name}")
    if every:
        next_kill = None
        while p.poll() is None:
            time.sleep(0.05)
            steps = [status_step(logs, name, r) for r in range(a.world)]
            if next_kill is None:
                if all(s is not None and s > 0 for s in steps):
                    next_kill = time.monotonic() + every
                continue
            if time.monotonic() < next_kill:
                continue
            victim = rng.randrange(a.world)
            pid = pid_of(name, victim)
            if pid is None or steps[victim] is None or steps[victim] >= a.steps - 1:
                next_kill = time.monotonic() + 0.2
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append({"t": time.monotonic() - start, "rank": victim, "step": steps[victim]})
            except ProcessLookupError:
                pass
            next_kill = time.monotonic() + every
    code = p.wait(timeout=3600)
    wall = time.monotonic() - start
    reader.join(timeout=5)
    out = "".join(lines)
    if code != 0:
        sys.exit(f"{name}: cohort launch exited {code}:\n{out[-4000:]}")
    rec = {"name": name, "mode": mode, "every_s": every, "wall_s": wall, "kills": kills}
    # In place: "... during step N; ...; step N redone; T s in all: detect ..."
    rec["in_place"] = []
    for l in out.splitlines():
        m = re.search(r"recovered in place .* during step (\d+);.*?(?:step (\d+) redone|steps (\d+) to (\d+) redone); ([0-9.]+) s in all: (.*)$", l)
        if m:
            redone = 1 if m.group(2) else int(m.group(4)) - int(m.group(3)) + 1
            phases = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([0-9.]+) s", m.group(6)))
            rec["in_place"].append({"redone_steps": redone, "total_s": float(m.group(5)), "phases": phases})
    rec["restarts"] = [int(s) for s in re.findall(r"the job resumed from checkpoint .* \(step (\d+)\)", out)]
    rec["fallbacks"] = [l for l in out.splitlines() if "in-place recovery failed" in l][:5]
    metrics = os.path.join(logs, name, "metrics.jsonl")
    try:
        rows = [json.loads(l) for l in open(metrics)]
        rec["mean_step_s"] = statistics.mean(r["step_s"] for r in rows[10:]) if len(rows) > 10 else None
    except OSError:
        rec["mean_step_s"] = None
    return rec


def main():
    a = parse_args()
    everies = [float(x) for x in a.every.split(",") if x]
    modes = [m for m in a.modes.split(",") if m]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        free = {m: run(a, tmp, f"free-{m}", m) for m in modes}
        runs += free.values()
        for every in everies:
            for m in modes:
                runs.append(run(a, tmp, f"kill{int(every)}-{m}", m, every))
    base = min(r["wall_s"] for r in free.values())
    print(f"job: {a.steps} steps, {a.world} workers, zero stage {a.zero_stage}; "
          f"failure-free wall {base:.1f} s (the faster of the modes)")
    print(f"{'run':<16} {'kills':>5} {'wall s':>8} {'goodput':>8} {'lost steps/failure':>19} {'recovery p50 s':>15}  phases (median s)")
    for r in runs:
        if r["every_s"] is None:
            print(f"{r['name']:<16} {0:>5} {r['wall_s']:>8.1f} {base / r['wall_s']:>8.2f}"
                  f"{'':>20}{'':>16}  mean step {r['mean_step_s'] or 0:.4f} s")
            continue
        n = len(r["kills"])
        if r["mode"] == "peer" and r["in_place"]:
            lost = statistics.mean(x["redone_steps"] for x in r["in_place"])
            rec = statistics.median(x["total_s"] for x in r["in_place"])
            names = r["in_place"][0]["phases"].keys()
            phases = ", ".join(f"{k} {statistics.median(x['phases'].get(k, 0) for x in r['in_place']):.3f}" for k in names)
        else:
            # A restart redoes the steps since the checkpoint it resumes from
            # (0 for a kill of a worker still starting, whose status file
            # showed the step of the attempt before).
            lost_each = [max(0, k["step"] - s) for k, s in zip(r["kills"], r["restarts"]) if k["step"] is not None]
            lost = statistics.mean(lost_each) if lost_each else float("nan")
            rec, phases = float("nan"), ""
        fb = f"  ({len(r['fallbacks'])} fallbacks to disk)" if r["fallbacks"] else ""
        print(f"{r['name']:<16} {n:>5} {r['wall_s']:>8.1f} {base / r['wall_s']:>8.2f} {lost:>19.2f} {rec:>15.3f}  {phases}{fb}")
    if len(free) == 2 and all(r["mean_step_s"] for r in free.values()):
        ratio = free["peer"]["mean_step_s"] / free["restart"]["mean_step_s"]
        print(f"step time, peer (with ZeRO mirrors: stage {a.zero_stage}) / restart: {ratio:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
