#!/usr/bin/env python3
"""Checks on training metrics (a job's metrics.jsonl) for scripts/gpu_check.sh.

  gpu_check_metrics.py sane FILE
      every step has a finite loss and a grad norm > 0 (all-zero gradients,
      as from a .grad that no longer aliases the reduced buffer, fail), and
      the loss falls: the mean of the last third of the steps is below the
      mean of the first third.
  gpu_check_metrics.py same A B --rtol R --keys loss,grad_norm [--from-step S]
      the two runs have the same steps (from S on) and at each step every
      key agrees within R relative (|a - b| <= R * max(|a|, |b|)).
      --noise C D [--noise-factor F] [--max-noise N]: C and D are two runs
      that should be identical (the same variant launched twice); their
      largest relative difference is the run-to-run noise floor, and A and B
      must then agree within max(R, F x floor) (F 10 by default). A floor
      above N (1e-3 by default) fails: the comparison would mean nothing.

Prints one line saying what held; on failure a line starting "error: " that
names the step and the values, and exits 1. Only the standard library.
"""

import argparse
import json
import math
import sys


def load(path):
    rows = {}
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{n}: not JSON ({e})")
                if "step" in row and "loss" in row:
                    rows[int(row["step"])] = row
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    if not rows:
        fail(f"{path}: no step lines (with 'step' and 'loss')")
    return rows


def fail(message):
    print(f"error: {message}")
    sys.exit(1)


def sane(args):
    rows = load(args.file)
    steps = sorted(rows)
    for s in steps:
        loss, norm = rows[s]["loss"], rows[s].get("grad_norm")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            fail(f"{args.file}: step {s}: loss {loss} is not finite")
        if not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm <= 0:
            fail(f"{args.file}: step {s}: grad norm {norm} (must be finite and > 0: "
                 "a zero norm means the optimizer stepped on zero gradients)")
    if len(steps) < 3:
        fail(f"{args.file}: {len(steps)} steps: too few to tell whether the loss falls")
    third = max(1, len(steps) // 3)
    first = sum(rows[s]["loss"] for s in steps[:third]) / third
    last = sum(rows[s]["loss"] for s in steps[-third:]) / third
    if not last < first:
        fail(f"{args.file}: the loss does not fall: mean {first:.4f} over steps "
             f"{steps[0]}-{steps[third - 1]}, {last:.4f} over {steps[-third]}-{steps[-1]}")
    print(f"{args.file}: {len(steps)} steps, grad norm > 0 at each, "
          f"loss {first:.4f} -> {last:.4f}")


def worst_difference(args, pa, pb, keys):
    """The two runs' steps (from --from-step on) and the largest relative
    difference of any key at any step, with the step and key where it is."""
    a, b = load(pa), load(pb)
    sa = [s for s in sorted(a) if s >= args.from_step]
    sb = [s for s in sorted(b) if s >= args.from_step]
    if not sa:
        fail(f"{pa}: no steps from {args.from_step} on")
    if sa != sb:
        fail(f"the runs log different steps from {args.from_step} on: "
             f"{sa[0]}..{sa[-1]} ({len(sa)}) in {pa}, "
             f"{sb[0] if sb else '-'}..{sb[-1] if sb else '-'} ({len(sb)}) in {pb}")
    worst = (0.0, sa[0], keys[0], a[sa[0]].get(keys[0]), b[sa[0]].get(keys[0]))
    for s in sa:
        for k in keys:
            x, y = a[s].get(k), b[s].get(k)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                fail(f"step {s}: {k} is missing ({x} in {pa}, {y} in {pb})")
            scale = max(abs(x), abs(y))
            rel = abs(x - y) / scale if scale > 0 else 0.0
            if math.isnan(rel):
                rel = math.inf
            if rel > worst[0]:
                worst = (rel, s, k, x, y)
    return sa, worst


def same(args):
    keys = [k for k in args.keys.split(",") if k]
    if args.noise:
        c, d = args.noise
        _, (floor, s, k, x, y) = worst_difference(args, c, d, keys)
        where = f"step {s}: {k} {x!r} vs {y!r}" if floor > 0 else "bit for bit"
        if not floor <= args.max_noise:
            fail(f"noise floor {floor:.3g} ({c} vs {d}, the same run twice, {where}) "
                 f"> {args.max_noise:g}: runs of one seed differ too much for "
                 f"{args.a} vs {args.b} to mean anything")
        limit = max(args.rtol, args.noise_factor * floor)
        print(f"noise floor {floor:.3g} ({c} vs {d}, the same run twice, {where}): "
              f"limit max({args.rtol:g}, {args.noise_factor:g} x {floor:.3g}) = {limit:.3g}")
    else:
        limit = args.rtol
    sa, (worst, s, k, x, y) = worst_difference(args, args.a, args.b, keys)
    if not worst <= limit:
        fail(f"step {s}: {k} {x!r} in {args.a} vs {y!r} in {args.b}: "
             f"relative difference {worst:.3g} > {limit:.3g}")
    print(f"{len(sa)} steps ({sa[0]}-{sa[-1]}) agree on {','.join(keys)}: "
          f"largest relative difference {worst:.3g} (limit {limit:.3g})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sane")
    s.add_argument("file")
    s.set_defaults(run=sane)
    m = sub.add_parser("same")
    m.add_argument("a")
    m.add_argument("b")
    m.add_argument("--rtol", type=float, required=True)
    m.add_argument("--keys", default="loss")
    m.add_argument("--from-step", type=int, default=0)
    m.add_argument("--noise", nargs=2, metavar=("C", "D"))
    m.add_argument("--noise-factor", type=float, default=10.0)
    m.add_argument("--max-noise", type=float, default=1e-3)
    m.set_defaults(run=same)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
