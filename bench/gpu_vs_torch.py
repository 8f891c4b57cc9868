#!/usr/bin/env python3
"""GPU training throughput, side by side: cohort vs the same model in PyTorch eager.

One GPU, one process each, the same model as configs/gpt-100m.toml (nanoGPT's
GPT-2-small shape: 12 layers, 12 heads, 768 wide, 1,024 context, tied
embeddings, pre-LayerNorm, exact GELU, causal scaled-dot-product attention;
vocabulary 16,384: 98.4 M parameters), the same batch (8 x 1,024 tokens per
micro-batch, 4 micro-batches per step), bf16 compute with fp32 master weights
(PyTorch: torch.autocast(dtype=torch.bfloat16); cohort: train.precision =
"bf16"), AdamW with weight decay on >= 2-D tensors (PyTorch: fused=True, its
fastest), clipping at 1.0, and one host synchronisation per step on both
sides (the step's loss is read). Runs alternate cohort, PyTorch, cohort, ...;
the first --warmup steps of every run are dropped; the tokens/s of a run is
its timed tokens over its timed seconds; the table shows medians over the
runs and the ratio.

    python3 bench/gpu_vs_torch.py --worker target/release/cohort-worker --json out.json

Needs a CUDA GPU and torch; cohort's worker must be able to load libtorch
(see scripts/gpu_check.sh for the library path on a machine without Rust).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=os.path.join(ROOT, "target/release/cohort-worker"))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps dropped from each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--json", default=None, help="write every run here")
    return p.parse_args()


def torch_run(a):
    """Trains the PyTorch eager model; returns the per-step seconds."""
    import torch

    dev = torch.device("cuda", 0)
    torch.manual_seed(1337)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_gpt import GPT, adamw

    model = GPT(a.n_layer, a.n_head, a.n_embd, a.block, a.vocab).to(dev)
    opt = adamw(model, lr=6e-4, fused=True)
    gen = torch.Generator(device=dev).manual_seed(1337)
    times = []
    torch.cuda.synchronize()
    for step in range(a.steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for _ in range(a.accum):
            tok = torch.randint(a.vocab, (a.batch, a.block + 1), device=dev, generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tok[:, :-1], tok[:, 1:]) / a.accum
            loss.backward()
            loss_sum += loss.detach().double()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum.item()  # one host sync per step, as cohort's trainer
        times.append(time.perf_counter() - t0)
    del model, opt
    torch.cuda.empty_cache()
    return times


def cohort_run(a, tmp):
    """Trains the same model with cohort's worker; returns the per-step seconds."""
    config = os.path.join(tmp, "gpt.toml")
    with open(config, "w") as f:
        f.write(f"""
[train]
max_steps = {a.steps}
batch_size = {a.batch}
grad_accum_steps = {a.accum}
log_every = 1000000
device = "cuda"
precision = "bf16"
[model]
kind = "gpt"
n_layer = {a.n_layer}
n_head = {a.n_head}
n_embd = {a.n_embd}
block_size = {a.block}
vocab_size = {a.vocab}
[data]
kind = "synthetic"
[optim]
lr = 6e-4
min_lr = 6e-4
warmup_steps = 0
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
""")
    logs = tempfile.mkdtemp(dir=tmp)
    env = dict(os.environ, COHORT_LOG_DIR=logs, COHORT_RESUME="never")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    out = subprocess.run([a.worker, "train", "--config", config], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cohort-worker failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    rows = [json.loads(l) for l in open(os.path.join(logs, "metrics.jsonl"))]
    return [r["step_s"] for r in rows], out.stdout


def tokens_per_s(step_s, a):
    kept = step_s[a.warmup:]
    return a.batch * a.accum * a.block * len(kept) / sum(kept)


def main():
    a = parse_args()
    if a.warmup >= a.steps:
        sys.exit("--warmup must be smaller than --steps")
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares GPU training")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            ours, log = cohort_run(a, tmp)
            theirs = torch_run(a)
            runs.append({
                "cohort_step_s": ours,
                "torch_step_s": theirs,
                "cohort_tokens_per_s": tokens_per_s(ours, a),
                "torch_tokens_per_s": tokens_per_s(theirs, a),
            })
            print(f"# round {r + 1}/{a.repeats}: cohort {runs[-1]['cohort_tokens_per_s']:,.0f} tok/s, "
                  f"torch {runs[-1]['torch_tokens_per_s']:,.0f} tok/s", flush=True)
            if r == 0:
                print("# cohort said:", *[l for l in log.splitlines() if l.startswith(("collectives", "training"))],
                      sep="\n#   ")
    med = statistics.median
    ours = med(r["cohort_tokens_per_s"] for r in runs)
    theirs = med(r["torch_tokens_per_s"] for r in runs)
    ratios = [r["cohort_tokens_per_s"] / r["torch_tokens_per_s"] for r in runs]
    gpu = torch.cuda.get_device_name(0)
    print(f"\n# {gpu}, torch {torch.__version__}, {a.repeats} rounds alternating, "
          f"{a.steps} steps each ({a.warmup} dropped), {a.batch}x{a.block} tokens x {a.accum} micro-batches per step")
    print("| run | tokens/s (median) | step ms (median) |")
    print("|---|---:|---:|")
    step_tokens = a.batch * a.accum * a.block
    print(f"| cohort (bf16, 1 GPU) | {ours:,.0f} | {step_tokens / ours * 1e3:.1f} |")
    print(f"| PyTorch eager (autocast bf16, fused AdamW) | {theirs:,.0f} | {step_tokens / theirs * 1e3:.1f} |")
    print(f"\nratio cohort/PyTorch: {med(ratios):.3f}x (rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "gpu": gpu, "torch": torch.__version__, "runs": runs,
                       "ratio_median": med(ratios)}, f, indent=1)


if __name__ == "__main__":
    main()
