#!/usr/bin/env python3
"""Train your own PyTorch model with cohort: script it, launch, load it back.

1. defines a small GPT as an ordinary `nn.Module` whose
   `forward(inputs, targets)` returns the mean loss (what cohort calls),
2. scripts it with `torch.jit.script` and saves WORKDIR/model.pt,
3. writes WORKDIR/job.toml (`model.kind = "torchscript"`) and runs
   `cohort launch` on it (2 workers on this host's CPU by default; DDP,
   clipping, the schedule and checkpoints are cohort's),
4. exports the last checkpoint (`cohort ckpt export`) and loads it into a
   fresh, unscripted model with `load_state_dict(..., strict=True)`.

    .venv/bin/python examples/torchscript/train.py --cohort target/release/cohort

Anything after `--` goes to `cohort launch` (`-- --set train.max_steps=50`).
torch.jit.script is deprecated upstream (in favour of torch.export) but
works in torch 2.11, the version cohort builds against.
"""

import argparse
import os
import shutil
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention and a 4x MLP."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, `n_layer` blocks, a final LayerNorm and
    a vocabulary head; `forward(inputs, targets)` is the mean cross-entropy."""

    def __init__(self, vocab: int, block_size: int, d: int, n_layer: int, n_head: int):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(inputs.size(1), device=inputs.device)
        x = self.wte(inputs) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1))


SHAPE = dict(vocab=256, block_size=32, d=32, n_layer=2, n_head=2)


def job_toml(model_path, data_path, ckpt_dir, steps, nproc):
    return f"""\
[launch]
nproc_per_node = {nproc}

[train]
max_steps = {steps}
batch_size = 4
seed = 1337
log_every = 1
eval_every = 0
threads = 1

[model]
kind = "torchscript"
path = "{model_path}"
block_size = {SHAPE["block_size"]}

[data]
kind = "text"
path = "{data_path}"
val_fraction = 0.1

[optim]
kind = "adamw"
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
decay_steps = 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.5

[checkpoint]
dir = "{ckpt_dir}"
every = {steps}
"""


def main():
    argv = sys.argv[1:]
    launch_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", default=shutil.which("cohort") or os.path.join(ROOT, "target/release/cohort"))
    p.add_argument("--workdir", default="torchscript-run")
    p.add_argument("--data", default=os.path.join(ROOT, "configs/data/tiny.txt"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args(argv)
    a.cohort = os.path.abspath(a.cohort) if os.sep in a.cohort else a.cohort

    work = os.path.abspath(a.workdir)
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)
    model = TinyGPT(**SHAPE)
    scripted = torch.jit.script(model)
    model_path = os.path.join(work, "model.pt")
    scripted.save(model_path)
    ckpt = os.path.join(work, "ckpt")
    config = os.path.join(work, "job.toml")
    with open(config, "w") as f:
        f.write(job_toml(model_path, os.path.abspath(a.data), ckpt, a.steps, a.nproc))
    print(f"wrote {model_path} ({sum(p.numel() for p in model.parameters())} parameters) and {config}", flush=True)

    launch = [a.cohort, "launch", config] + launch_args
    print("+", " ".join(launch), flush=True)
    rc = subprocess.call(launch, cwd=work)
    if rc != 0:
        sys.exit(f"cohort launch exited with {rc}")
    exported = os.path.join(work, "model.safetensors")
    export = [a.cohort, "ckpt", "export", ckpt, "--out", exported]
    print("+", " ".join(export), flush=True)
    if subprocess.call(export) != 0:
        sys.exit("cohort ckpt export failed")

    # The trained weights, in a fresh unscripted model: every name must match.
    trained = TinyGPT(**SHAPE)
    trained.load_state_dict(load_file(exported), strict=True)
    changed = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), trained.parameters()))
    print(f"loaded {exported} into TinyGPT with strict=True: {changed} of "
          f"{len(list(trained.parameters()))} tensors changed by training")
    if changed == 0:
        sys.exit("training changed no parameter")


if __name__ == "__main__":
    main()
