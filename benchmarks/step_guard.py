"""What skipping non-finite steps costs: a training step of a preset with ``optimizer.step()`` and
with :class:`pkmem.train.guard.StepGuard` (the loop's step: a finite flag on the device, the
fused AdamW told ``found_inf``), side by side.

    python benchmarks/step_guard.py                      # enwik8-small on CUDA (bf16 autocast)
    python benchmarks/step_guard.py --device cpu --preset tiny --batch-size 8

Variants run in turn, in blocks of ``--steps`` steps with no host sync inside a block (as in
training), after ``--warmup`` steps; medians over ``--repeats`` blocks of the wall time per step.
``plain``: ``make_optimizer`` as it is (fused AdamW on CUDA, foreach on a CPU), ``step()``;
``guarded``: the same optimizer under a StepGuard, ``guard.step(loss, *norms)`` (on CUDA: the
fused AdamW and RowAdam told ``found_inf``, no host sync; on a CPU the flag is read,
which costs nothing there). For each value optimizer of ``--values``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="enwik8-small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--values", default="adamw,lazy_adam")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args()

    from pkmem.config import load_config
    from pkmem.models import MemoryTransformer
    from pkmem.optim import clip_grad_norm, make_optimizer
    from pkmem.train.evaluate import autocast
    from pkmem.train.guard import StepGuard

    device = torch.device(args.device)
    cfg = load_config(args.preset)
    B = args.batch_size or cfg.train.batch_size
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    t = cfg.train
    rows = []
    for values in args.values.split(","):
        runs = {}
        for variant in ("plain", "guarded"):
            torch.manual_seed(0)
            model = MemoryTransformer(cfg.model).to(device)
            opt = make_optimizer(
                model, t.lr, value_lr=t.value_lr, betas=tuple(t.betas), value_optimizer=values
            )
            guard = StepGuard(opt) if variant == "guarded" else None
            xy = torch.randint(0, V, (B, T + 1), device=device)

            def step(model=model, opt=opt, guard=guard, xy=xy):
                with autocast(device, t.precision):
                    logits = model(xy[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, V), xy[:, 1:].reshape(-1))
                loss.backward()
                norms = clip_grad_norm(model, t.grad_clip)
                if guard is None:
                    opt.step()
                else:
                    guard.step(loss.detach(), *norms)
                opt.zero_grad(set_to_none=True)

            runs[variant] = (step, [])
        for _ in range(args.warmup):
            for step, _ in runs.values():
                step()
        for _ in range(args.repeats):
            for step, times in runs.values():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / args.steps)
        plain = statistics.median(runs["plain"][1])
        guarded = statistics.median(runs["guarded"][1])
        rows.append(
            {
                "values": values,
                "plain_ms": 1e3 * plain,
                "guarded_ms": 1e3 * guarded,
                "ratio": guarded / plain,
                "plain_all_ms": [1e3 * x for x in runs["plain"][1]],
                "guarded_all_ms": [1e3 * x for x in runs["guarded"][1]],
            }
        )
        ms = f"plain {1e3 * plain:8.2f} ms/step  guarded {1e3 * guarded:8.2f} ms/step"
        print(f"{values:<10} {ms}  x{guarded / plain:.3f}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = {
        "preset": args.preset,
        "batch_size": B,
        "seq_len": T,
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    path = args.out or f"benchmarks/results/step_guard-{'h200' if 'H200' in name else device.type}.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
