#!/usr/bin/env python3
"""Training throughput, side by side: the built-in gpt vs. the same GPT as a TorchScript module.

The TorchScript side is bench/torch_gpt.py's GPT (the built-in gpt's
architecture and parameter names), scripted with torch.jit.script and trained
with model.kind = "torchscript"; both train the quickstart's shape (2 layers,
4 heads, 64 wide, 64 tokens, vocabulary 256) on configs/data/tiny.txt, 2
ranks with one libtorch thread each, DDP. Runs alternate (built-in,
TorchScript, repeat) so drift on a shared machine hits both alike; the first
--warmup steps of every run are dropped, and a run's tokens/s is the median
of its steps' (rank 0's metrics.jsonl).

    .venv/bin/python bench/torchscript_vs_builtin.py --cohort target/release/cohort
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from torch_gpt import GPT  # noqa: E402

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)


def config(model, steps):
    return f"""\
[train]
max_steps = {steps}
batch_size = 8
log_every = {steps}
threads = 1

[model]
{model}
block_size = {SHAPE["block_size"]}

[data]
kind = "text"
path = "{os.path.join(ROOT, "configs/data/tiny.txt")}"
"""


def run(cohort, work, name, text, warmup):
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    logs = os.path.join(work, "logs", name)
    subprocess.run(
        [cohort, "launch", "--nproc-per-node", "2", "--max-restarts", "0", "--log-dir", logs, path],
        check=True, stdout=subprocess.DEVNULL,
    )
    (metrics,) = glob.glob(os.path.join(logs, "*", "metrics.jsonl"))
    rows = [json.loads(line) for line in open(metrics)]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", default=os.path.join(ROOT, "target/release/cohort"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", help="write every run's tokens/s here")
    a = p.parse_args()
    cohort = os.path.abspath(a.cohort)
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        module = os.path.join(work, "gpt.pt")
        torch.jit.script(GPT(**SHAPE, vocab_size=256)).save(module)
        builtin = config(
            f'kind = "gpt"\nn_layer = {SHAPE["n_layer"]}\nn_head = {SHAPE["n_head"]}\nn_embd = {SHAPE["n_embd"]}',
            a.steps,
        )
        scripted = config(f'kind = "torchscript"\npath = "{module}"', a.steps)
        runs = {"built-in gpt": [], "torchscript gpt": []}
        for r in range(a.rounds):
            runs["built-in gpt"].append(run(cohort, work, f"builtin{r}", builtin, a.warmup))
            runs["torchscript gpt"].append(run(cohort, work, f"script{r}", scripted, a.warmup))
            print(f"round {r + 1}: built-in {runs['built-in gpt'][-1]:,.0f} tok/s, "
                  f"torchscript {runs['torchscript gpt'][-1]:,.0f} tok/s", flush=True)
    ratios = [s / b for b, s in zip(runs["built-in gpt"], runs["torchscript gpt"])]
    print(f"\n| model | tokens/s (median of {a.rounds} rounds) |\n| --- | --- |")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):,.0f} |")
    print(f"\ntorchscript / built-in: median {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
