"""Peak memory of a training step of one memory layer with dense and row-sparse value gradients.

``sparse_values=True`` gives the value table a COO gradient with one row per (token, head, slot
read) entry, before coalescing: ``T * heads * topk * v_dim`` numbers, against ``num_keys**2 * v_dim``
for a dense gradient. Above ``T = num_keys**2 / (heads * topk)`` tokens per step (2,048 at the
paper's setting) the sparse gradient is the larger one, and it grows with the tokens while the
dense one does not. This script measures it: each case runs in a fresh process (forward, backward,
``clip_grad_norm`` and the optimizer step of ``make_optimizer``: AdamW for ``dense``, SparseAdam for
``sparse_values``, :class:`pkmem.optim.RowAdam` for ``lazy_adam``, whose backward writes the rows
read into a buffer of the table's size), whose peak RSS (CPU) or peak CUDA memory is recorded
beside the two predicted gradient sizes.

    python benchmarks/sparse_memory.py [--device cpu|cuda] [--tokens 1024,4096,16384]
        [--out benchmarks/results/sparse_memory-<device>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

VARIANTS = ("dense", "sparse_values", "lazy_adam")  # the table's gradient: dense, COO, RowAdam's rows
SETTING = dict(dim=512, heads=4, num_keys=512, topk=32, k_dim=512)  # the paper's memory, v_dim = dim

CHILD = r"""
import json, resource, sys, time
import torch
def peak_mb():  # this process's own peak (ru_maxrss also counts the parent's pages at fork)
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import pkmem
from pkmem.optim import clip_grad_norm, make_optimizer
setting, tokens, variant, device = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
layer = pkmem.ProductKeyMemory(**setting, sparse_values=variant == "sparse_values").to(device)
opt = make_optimizer(layer, 1e-3, value_optimizer="lazy_adam" if variant == "lazy_adam" else "adamw")
x = torch.randn(tokens, setting["dim"], device=device)
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
before = peak_mb()
t0 = time.perf_counter()
for _ in range(2):
    layer(x).float().pow(2).mean().backward()
    clip_grad_norm(layer, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
if device == "cuda":
    torch.cuda.synchronize()
out = {"seconds_per_step": (time.perf_counter() - t0) / 2, "rss_before_mb": before,
       "peak_rss_mb": peak_mb()}
if device == "cuda":
    out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--out")
    args = p.parse_args()
    import torch

    s = SETTING
    slots = s["num_keys"] ** 2
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for variant in VARIANTS:
            res = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(s), str(tokens), variant, args.device],
                capture_output=True,
                text=True,
                env=os.environ,
            )
            if res.returncode:
                raise SystemExit(res.stderr)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(
                tokens=tokens,
                variant=variant,
                dense_grad_mb=slots * s["dim"] * 4 / 2**20,
                uncoalesced_sparse_grad_mb=tokens * s["heads"] * s["topk"] * s["dim"] * 4 / 2**20,
            )
            rows.append(r)
            peak = r.get("peak_cuda_mb", r["peak_rss_mb"])
            print(
                f"tokens {tokens:>6}  {variant:<14} peak {peak:8.0f} MB  "
                f"({r['seconds_per_step']:.2f} s/step; gradient: dense {r['dense_grad_mb']:.0f} MB, "
                f"sparse before coalescing {r['uncoalesced_sparse_grad_mb']:.0f} MB)"
            )
    result = {
        "setting": s,
        "crossover_tokens": slots // (s["heads"] * s["topk"]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    out = args.out or f"benchmarks/results/sparse_memory-{args.device}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
