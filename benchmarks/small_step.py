"""A whole training step of one memory layer against the FFN it replaces, at small and large
batches: does a step pay only for what it touches?

    python benchmarks/small_step.py [--tokens 64,512,8192] [--steps 20] [--out PATH]
    python benchmarks/small_step.py --device cpu --tiny            # smoke test on a CPU

Paper setting (dim 1024, 4 heads, 512**2 slots, topk 32, k_dim 512, bf16 autocast, float32
parameters), one layer on ``tokens`` tokens, its input's gradient included. A step is forward +
backward + optimizer step + ``zero_grad``, for:

- ``ffn``: the 4 x dim FFN a memory replaces, in torch's fused AdamW;
- ``memory fp32 adamw``: the layer as ``make_optimizer`` trains it by default (the value
  table in the fused AdamW: a dense gradient of every row, whatever the step read);
- ``memory fp32 lazy_adam`` and ``memory bf16 lazy_adam``: the table in
  :class:`pkmem.optim.RowAdam` (the backward writes only the rows read; one kernel updates them),
  the rest of the layer in the fused AdamW;
- ``memory fp32 sparse_adam``: ``sparse_values=True`` and ``torch.optim.SparseAdam`` for the table
  (a sparse COO gradient of the rows read).

``device_ms``: the kernels' time per step (the sum of their durations in the profiler, mean over
``--steps`` steps after warm-up): what the step costs the GPU with no host in the way, as a CUDA
graph replay of it would (RowAdam's step keeps Python state between steps, so the step itself is
not captured); ``vs_ffn``: that time over the FFN's. ``eager_ms``: one eager step between CUDA
events (median; host-bound at small sizes: compare within one run). ``kernels``: the longest kernels
of a step. ``params_updated`` / ``value_rows_updated`` / ``update_floor_ms_at_4.2TBps``: what one
optimizer step updates (dense AdamW: every parameter; RowAdam, SparseAdam: the value rows read,
and the fused AdamW the layer's other parameters) and the least
time that update takes (read parameter, gradient and two moments, write parameter and moments, at
4.2 TB/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import cuda_time, table, write_json  # noqa: E402
from train_step import HBM_BYTES_PER_S, adam_bytes, busy_ms, environment  # noqa: E402

VARIANTS = {  # name: (memory, value dtype, value optimizer)
    "ffn": (False, None, None),
    "memory fp32 adamw": (True, torch.float32, "adamw"),
    "memory fp32 lazy_adam": (True, torch.float32, "lazy_adam"),
    "memory bf16 lazy_adam": (True, torch.bfloat16, "lazy_adam"),
    "memory fp32 sparse_adam": (True, torch.float32, "sparse_adam"),
}


def build(variant: str, device: torch.device, tiny: bool):
    from pkmem import ProductKeyMemory
    from pkmem.optim import make_optimizer

    memory, dtype, value_optimizer = VARIANTS[variant]
    dim = 64 if tiny else 1024
    torch.manual_seed(0)
    if not memory:
        module = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)).to(device)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=device.type == "cuda")
        return module, opt, dim
    sizes = (
        dict(heads=2, num_keys=16, topk=4, k_dim=16)
        if tiny
        else dict(heads=4, num_keys=512, topk=32, k_dim=512)
    )
    sparse = value_optimizer == "sparse_adam"  # a row-sparse gradient for torch.optim.SparseAdam
    module = ProductKeyMemory(dim, **sizes, value_dtype=dtype, sparse_values=sparse).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(module, lr=1e-3, value_lr=1e-3, value_optimizer=value_optimizer)
    return module, opt, dim


def make_step(module, opt, x, gy):
    """``(step, forward_backward)``: the whole training step, and its forward + backward alone."""
    dev = x.device.type

    def forward_backward():
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = module(x)
        y.backward(gy)

    def step(_marks=None):
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, forward_backward


def update_floor(module, opt, step_fwd_bwd) -> dict:
    """The parameters one optimizer step updates and the bytes it must move (each updated element:
    read p, g, m, v; write p, m, v), from one forward + backward: dense AdamW updates every
    parameter with a gradient, RowAdam and SparseAdam the value rows read."""
    from pkmem.optim import RowAdam

    step_fwd_bwd()
    row_opts = [o for o in getattr(opt, "optimizers", [opt]) if isinstance(o, RowAdam)]
    params = nbytes = 0
    rows = None
    for p in module.parameters():
        es = p.element_size()
        if p.grad is not None and p.grad.is_sparse:  # SparseAdam: the rows read, moments in p's dtype
            rows = p.grad.coalesce().indices().shape[1]
            params += rows * p.shape[1]
            nbytes += adam_bytes(rows * p.shape[1], es, es, es)
        elif p.grad is not None:  # torch's AdamW: moments in the parameter's dtype
            params += p.numel()
            nbytes += adam_bytes(p.numel(), es, p.grad.element_size(), es)
        for o in row_opts:
            if any(p is q for g in o.param_groups for q in g["params"]):
                rows = int(o.row_grad(p).touched.sum())
                params += rows * p.shape[1]
                # gradient rows in the table's dtype, float32 moments
                nbytes += adam_bytes(rows * p.shape[1], es, es, 4)
    opt.zero_grad(set_to_none=True)
    return {"params_updated": params, "value_rows_updated": rows, "update_bytes": nbytes}


def measure(variant: str, tokens: int, device: torch.device, args) -> dict:
    module, opt, dim = build(variant, device, args.tiny)
    module.train()
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, dim, generator=g).to(device).requires_grad_()
    gy = torch.randn(tokens, dim, generator=g).to(device)
    step, forward_backward = make_step(module, opt, x, gy)
    for _ in range(args.warmup):
        step()
    row = {"variant": variant, "tokens": tokens}
    row.update(update_floor(module, opt, forward_backward))
    row["update_floor_ms_at_4.2TBps"] = row["update_bytes"] / HBM_BYTES_PER_S * 1e3
    if device.type == "cuda":
        busy = busy_ms(step, device, args.steps, top=10)
        row["device_ms"], row["kernels"] = busy
        row["eager_ms"] = cuda_time(step, iters=args.steps, warmup=0)["median_ms"]
    else:  # on a CPU the host is the device
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        row["device_ms"] = row["eager_ms"] = statistics.median(times)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="comma-separated batch sizes (default 64,512,8192)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (default 5)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/small_step-<gpu>.json)"
    )
    args = ap.parse_args()
    tokens_arg = args.tokens or ("8,32" if args.tiny else "64,512,8192")
    try:
        sizes = [int(t) for t in tokens_arg.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        ap.error(f"--tokens={tokens_arg!r} is not allowed: --tokens must be comma-separated positive ints")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "ffn" not in variants:
        ap.error(f"--variants={args.variants!r} is not allowed: choose from {list(VARIANTS)}, 'ffn' included")
    for name, v in (("--warmup", args.warmup), ("--steps", args.steps)):
        if v < 1:
            ap.error(f"{name}={v} is not allowed: {name} must be an int >= 1")
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("PKMEM_BACKEND", "torch")
    if device.type == "cuda":
        from common import gpu_slug

        slug = gpu_slug()
    else:
        slug = "cpu"
    out = args.out or os.path.join(_HERE, "results", f"small_step-{slug}.json")
    data = {"env": environment(device), "args": vars(args), "results": []}
    for tokens in sizes:
        rows = []
        for variant in variants:
            print(f"{tokens} tokens / {variant} ...", flush=True)
            rows.append(measure(variant, tokens, device, args))
        ffn = next(r for r in rows if r["variant"] == "ffn")
        for r in rows:
            r["vs_ffn"] = r["device_ms"] / ffn["device_ms"]
        data["results"] += rows
        write_json(out, data)
    print(
        table(
            [
                [
                    str(r["tokens"]),
                    r["variant"],
                    f"{r['device_ms']:.3f}",
                    f"{r['vs_ffn']:.2f}x",
                    f"{r['eager_ms']:.3f}",
                ]
                for r in data["results"]
            ],
            ["tokens", "variant", "device ms per step", "vs FFN", "eager ms"],
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
