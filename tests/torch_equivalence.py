#!/usr/bin/env python3
"""The built-in trainer's GPT step, redone in PyTorch: tests/torch_equivalence.rs.

Loads the initial weights cohort exported (`cohort ckpt export`, strict: every
name must be bench/torch_gpt.py's), then trains bench/torch_gpt.py's GPT on
the batches cohort's loader hands out (the data order of trainer/src/data.rs,
ported exactly: SplitMix64, the keyed Feistel permutation, the per-epoch
window shift, the train/validation split), with the learning-rate schedule of
trainer/src/optim.rs (linear warmup, cosine decay to min_lr at max_steps),
torch.optim.AdamW (weight decay on tensors of 2 or more dimensions) and
torch.nn.utils.clip_grad_norm_. N ranks are simulated in one process: each
rank's loss and gradients on its own part of the global batch, then the mean
of the gradients (what DDP's all-reduce and ZeRO's reduce-scatter compute).

With --ddp the ranks are --world processes training under PyTorch's
DistributedDataParallel over gloo instead.

With --module FILE.pt (a job of model.kind = "torchscript",
tests/torchscript.rs) the model is that TorchScript module, trained from the
weights in the file, which cohort starts from as well.

Writes one loss per step, the mean over the ranks as cohort's metrics.jsonl
reports it, as a JSON list to --out.

    python tests/torch_equivalence.py --config JOB.toml --world 2 \
        --weights initial.safetensors --out losses.json [--lr-scale 1.01] [--seed-offset 1]
    python tests/torch_equivalence.py --config JOB.toml --world 2 --module model.pt --out losses.json
"""

import argparse
import json
import math
import os
import sys
import tomllib

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from torch_gpt import GPT, adamw  # noqa: E402

M64 = (1 << 64) - 1


def splitmix(state):
    """SplitMix64 seeded with `state`: its first output (data.rs's SplitMix)."""
    z = (state + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rotl(x, k):
    k %= 64
    return ((x << k) | (x >> (64 - k))) & M64 if k else x


def permute(i, n, key):
    """data.rs's `permute`: a 4-round keyed Feistel bijection of 0..n with cycle walking."""
    if n == 1:
        return 0
    bits = max((n - 1).bit_length(), 2)
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for rnd in range(4):
            f = splitmix(right ^ rotl(key, 16 * rnd) ^ rnd) & mask
            left, right = right, left ^ f
        x = (left << half) | right
        if x < n:
            return x


class Loader:
    """data.rs's `Dataset` (text: one token per byte) and `Loader::next_batch`."""

    def __init__(self, path, block, val_fraction, seed, world, batch):
        self.tokens = open(path, "rb").read()
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        self.train_end = n - n_val
        self.block, self.seed, self.world, self.batch = block, seed, world, batch
        self.windows = (self.train_end - 1) // block
        self.position = 0

    def window(self, w, shift):
        n = self.block + 1
        start = w * self.block
        if start + shift + n <= self.train_end:
            start += shift
        return list(self.tokens[start : start + n])

    def next_batches(self):
        """Every rank's micro-batch of the next global batch: [(inputs, targets)] by rank."""
        out = []
        for rank in range(self.world):
            first = self.position + rank * self.batch
            rows = []
            for g in range(first, first + self.batch):
                epoch, i = divmod(g, self.windows)
                key = splitmix(self.seed ^ ((epoch * 0x9E3779B97F4A7C15) & M64))
                rows.append(self.window(permute(i, self.windows, key), key % self.block))
            t = torch.tensor(rows, dtype=torch.int64)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        self.position += self.world * self.batch
        return out


def lr_at(it, lr, min_lr, warmup, decay):
    """optim.rs's `LrSchedule::at`."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay or decay <= warmup:
        return min(min_lr, lr)
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def need(section, key, where):
    if key not in section:
        sys.exit(f"torch_equivalence.py: {where}.{key} must be set in the job config")
    return section[key]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the job's TOML, every key below set")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--weights", help="cohort's exported initial weights (the built-in gpt)")
    p.add_argument("--module", help="a TorchScript module's file (model.kind = torchscript)")
    p.add_argument("--out", required=True)
    p.add_argument("--lr-scale", type=float, default=1.0, help="a control: a different learning rate")
    p.add_argument("--seed-offset", type=int, default=0, help="a control: another data order")
    p.add_argument("--ddp", action="store_true",
                   help="--world processes under DistributedDataParallel (gloo) instead of one simulating them")
    a = p.parse_args()
    if a.ddp:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:  # a FileStore rendezvous: no port to pick
            mp.spawn(ddp_rank, args=(a, os.path.join(tmp, "store")), nprocs=a.world, join=True)
        return
    losses = train(a)
    with open(a.out, "w") as f:
        json.dump(losses, f)


def ddp_rank(rank, a, store):
    """One rank of --ddp: gloo, DDP's gradient all-reduce (the mean over the
    ranks, bucketed, during backward); rank 0 writes the losses."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=a.world)
    losses = train(a, rank)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


def train(a, rank=None):
    """Per-step losses (means over the ranks): of all ranks simulated in this
    process (rank None), or of rank `rank` of a DDP job."""
    with open(a.config, "rb") as f:
        job = tomllib.load(f)
    train, model, data, optim = (job.get(k, {}) for k in ("train", "model", "data", "optim"))
    steps = need(train, "max_steps", "train")
    batch = need(train, "batch_size", "train")
    seed = need(train, "seed", "train") + a.seed_offset
    if train.get("grad_accum_steps", 1) != 1 or model.get("dropout", 0.0) != 0.0:
        sys.exit("torch_equivalence.py: only grad_accum_steps = 1 and dropout = 0 are modelled")
    block = need(model, "block_size", "model")
    if need(data, "kind", "data") != "text" or need(optim, "kind", "optim") != "adamw":
        sys.exit("torch_equivalence.py: only data.kind = text and optim.kind = adamw are modelled")
    lr, min_lr, warmup = (need(optim, k, "optim") for k in ("lr", "min_lr", "warmup_steps"))
    lr, min_lr = lr * a.lr_scale, min_lr * a.lr_scale
    clip = need(optim, "grad_clip", "optim")
    decay = need(optim, "decay_steps", "optim") or steps  # 0: decay over max_steps, as cohort

    torch.manual_seed(0)  # the weights come from cohort; nothing random is drawn after this
    torch.set_num_threads(1)
    if a.module:
        net = torch.jit.load(a.module)
    elif a.weights:
        n_layer, n_head, n_embd = (need(model, k, "model") for k in ("n_layer", "n_head", "n_embd"))
        net = GPT(n_layer, n_head, n_embd, block, 256)
        net.load_state_dict(load_file(a.weights), strict=True)
    else:
        sys.exit("torch_equivalence.py: give --weights (the built-in gpt) or --module")
    net.train()
    opt = adamw(
        net,
        lr=lr,
        weight_decay=need(optim, "weight_decay", "optim"),
        betas=(need(optim, "beta1", "optim"), need(optim, "beta2", "optim")),
    )
    for group in opt.param_groups:
        group["eps"] = need(optim, "eps", "optim")
    loader = Loader(data["path"], block, need(data, "val_fraction", "data"), seed, a.world, batch)

    losses = []
    if rank is not None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net)
        for step in range(steps):
            inputs, targets = loader.next_batches()[rank]
            opt.zero_grad(set_to_none=True)
            loss = ddp(inputs, targets)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, min_lr, warmup, decay)
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / a.world)
        return losses
    for step in range(steps):
        grads = [torch.zeros_like(p) for p in net.parameters()]
        step_loss = 0.0
        for inputs, targets in loader.next_batches():
            net.zero_grad(set_to_none=True)
            loss = net(inputs, targets)
            loss.backward()
            step_loss += loss.item()
            for acc, p in zip(grads, net.parameters()):
                acc += p.grad
        for acc, p in zip(grads, net.parameters()):
            p.grad = acc / a.world
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, min_lr, warmup, decay)
        opt.step()
        losses.append(step_loss / a.world)
    return losses


if __name__ == "__main__":
    main()
