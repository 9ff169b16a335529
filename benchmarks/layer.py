"""One memory layer on one GPU, side by side: pkmem with its Triton kernels, pkmem's PyTorch reference,
product-key-memory 0.3.0 (lucidrains) and the 4 x dim FFN that a memory layer replaces.

    python benchmarks/layer.py [--out benchmarks/results/layer-<gpu>.json] [--quick]

bf16 autocast with float32 parameters, as in training (pkmem is also timed with a bf16 value
table). "fwd" is a training-mode forward with autograd on; "fwd+bwd" adds the backward of a
random output gradient (input gradient included). The kernel rows and the FFN are also timed
replayed from CUDA graphs (training-mode forward and forward + backward through
``torch.cuda.make_graphed_callables``), ten calls back to back per timing: the device time per
call, without the host's launch overhead, which dominates eager times at small sizes and varies
between machines. ``*_graph_per_call`` times one graphed call at a time: it adds the graphed
callable's host time before its replay starts, while the device idles (``benchmarks/timeline.py``
lists the kernels of one replay). Settings of at most 512 tokens also time an eval-mode forward
without autograd, eagerly and from a CUDA graph (ten replays back to back). Each time is the median
over repeats of CUDA-event timings after warm-up; floors use the copy bandwidth and the bf16 matrix
rate measured in the same run (see docs/kernels.md). The JSON also holds the device time per
kernel of one training step (``breakdown_paper_fwd_bwd``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback

import torch
from torch import nn

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import (  # noqa: E402
    copy_bandwidth,
    cuda_time,
    environment,
    gpu_slug,
    graph_time,
    matmul_rate,
    table,
    write_json,
)

from pkmem import ProductKeyMemory  # noqa: E402

DIM, HEADS, TOPK, K_DIM = 1024, 4, 32, 512
SETTINGS = [  # name, tokens, num_keys
    ("paper: 8192 tok", 8192, 512),
    ("512 tok", 512, 512),
    ("decode: 64 tok", 64, 512),
    ("1M slots: 8192 tok", 8192, 1024),
]


def ffn(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


def make(impl: str, num_keys: int) -> nn.Module:
    if impl.startswith("pkmem"):
        backend = "torch" if "reference" in impl else "triton"
        layer = ProductKeyMemory(DIM, HEADS, num_keys, TOPK, K_DIM, backend=backend)
        if "bf16 values" in impl:
            layer.values.data = layer.values.data.to(torch.bfloat16)
        return torch.compile(layer) if "torch.compile" in impl else layer
    if impl == "product-key-memory 0.3.0":
        from product_key_memory import PKM

        return PKM(DIM, heads=HEADS, num_keys=num_keys, topk=TOPK, dim_head=K_DIM // 2)
    if impl == "FFN 4*dim":
        return ffn(DIM)
    raise ValueError(impl)


IMPLS = [
    "pkmem triton (bf16 values)",
    "pkmem triton (bf16 values, torch.compile)",  # inductor fuses the ops around the kernels
    "pkmem triton (fp32 values)",
    "pkmem reference (torch, fp32 values)",
    "product-key-memory 0.3.0",
    "FFN 4*dim",
]


def floors(impl: str, T: int, num_keys: int, bw: float, rate: float) -> tuple[float, float]:
    """(forward, forward+backward) floors in ms: max(bytes / bandwidth, FLOPs / rate)."""
    if impl == "FFN 4*dim":
        flops = 2 * T * DIM * 4 * DIM * 2
        wbytes = 2 * DIM * 4 * DIM * 4
        fwd = max(wbytes / bw, flops / rate)
        return fwd * 1e3, max(3 * wbytes / bw, 3 * flops / rate) * 1e3
    es = 2 if "bf16 values" in impl else 4
    N = num_keys**2
    rows = T * HEADS * TOPK
    touched = N * (1 - (1 - 1 / N) ** rows)  # expected distinct rows under uniform routing
    fwd_bytes = rows * DIM * es + 2 * T * DIM * 2 + DIM * HEADS * K_DIM * 4
    bwd_bytes = touched * DIM * es + N * DIM * es + T * DIM * 4 + DIM * HEADS * K_DIM * 4
    q_flops = 2 * T * DIM * HEADS * K_DIM
    s_flops = 2 * T * HEADS * 2 * num_keys * K_DIM // 2
    fwd_compute = q_flops / rate + s_flops / (rate / 2)  # half scores in tf32: half the bf16 rate
    fwd = max(fwd_bytes / bw, fwd_compute)
    both = max((fwd_bytes + bwd_bytes) / bw, 3 * fwd_compute)
    return fwd * 1e3, both * 1e3


def run_setting(name: str, T: int, num_keys: int, bw: float, rate: float, quick: bool) -> list[dict]:
    results = []
    g = torch.Generator(device="cuda").manual_seed(T)
    xs = [torch.randn(T, DIM, device="cuda", generator=g).requires_grad_() for _ in range(3)]
    gy = torch.randn(T, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    for impl in IMPLS:
        if quick and impl != IMPLS[0] and impl != "FFN 4*dim":
            continue
        if "torch.compile" in impl and T == 512:  # a compile per setting: the paper's sizes and decode
            continue
        row = {"setting": name, "tokens": T, "num_keys": num_keys, "impl": impl}
        try:
            torch.manual_seed(0)
            row.update(
                measure(make(impl, num_keys).cuda().train(), impl == "product-key-memory 0.3.0", xs, gy)
            )
        except Exception as e:
            traceback.print_exc(limit=3)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["floor_fwd_ms"], row["floor_fwd_bwd_ms"] = floors(impl, T, num_keys, bw, rate)
        results.append(row)
        gc.collect()  # frees the CUDA graphs' memory pools before the next row's peak measurement
        torch.cuda.empty_cache()
    return results


def measure(layer: nn.Module, lucid: bool, xs: list[torch.Tensor], gy: torch.Tensor) -> dict:
    """Forward and forward+backward times of one layer; eval forward too for small batches."""
    row = {}
    it = [0]

    def x_next():
        it[0] += 1
        x = xs[it[0] % len(xs)]
        return x[None] if lucid else x

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x_next())

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None
        fwd().backward(gy[None] if lucid else gy)

    slow = lucid or getattr(layer, "backend", "") == "torch"
    compiled = hasattr(layer, "_orig_mod")
    iters = 10 if slow else 20
    torch.cuda.reset_peak_memory_stats()
    row["fwd"] = cuda_time(fwd, iters=iters)
    row["fwd_bwd"] = cuda_time(fwd_bwd, iters=iters)
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not slow and not compiled:
        try:
            row.update(graphed_train_times(layer, xs[0], gy))
        except Exception as e:
            traceback.print_exc(limit=3)
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if xs[0].shape[0] <= 512:
        layer.eval()
        x0 = xs[0].detach()[None] if lucid else xs[0].detach()

        def infer():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return layer(x0)

        row["fwd_eval_nograd"] = cuda_time(infer, iters=50)
        if not slow and not hasattr(layer, "_orig_mod"):  # not for a torch.compile'd layer
            row["fwd_eval_cuda_graph"] = eval_graph_time(layer, x0.clone())
    return row


def graphed_train_times(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict:
    """Training-mode forward and forward+backward replayed from CUDA graphs
    (``torch.cuda.make_graphed_callables``): the device time without the host's launch overhead."""
    layer.train()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(layer, (x,))

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return graphed(x)

    def fwd_bwd():  # as the eager fwd_bwd: gradients set to None first (no accumulation)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fwd().backward(gy)

    # back to back (device time per call), and one call per sample (adds the graphed callable's
    # host time before its replay starts: the device idles meanwhile)
    return {
        "fwd_graph": cuda_time(fwd, iters=30, calls=10),
        "fwd_bwd_graph": cuda_time(fwd_bwd, iters=30, calls=10),
        "fwd_graph_per_call": cuda_time(fwd, iters=50),
        "fwd_bwd_graph_per_call": cuda_time(fwd_bwd, iters=50),
    }


def eval_graph_time(layer: nn.Module, x: torch.Tensor, iters: int = 100) -> dict:
    """Eval forward (no autograd) captured once in a CUDA graph, timed by replays."""

    def f():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return layer(x)

    return graph_time(f, iters=iters)


def breakdown(num_keys: int = 512, T: int = 8192) -> list[dict]:
    """Device time per kernel of one pkmem (triton, bf16 values) forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    layer = make("pkmem triton (bf16 values)", num_keys).cuda().train()
    x = torch.randn(T, DIM, device="cuda", requires_grad=True)
    gy = torch.randn(T, DIM, device="cuda", dtype=torch.bfloat16)

    def step():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "ms_per_step": t / 1e3 / 5, "calls_per_step": e.count / 5})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:25]


def kernel_configs() -> dict:
    """The block sizes the library chooses on this device at the paper setting (what ran)."""
    from pkmem.ops.triton import _common, gather, search

    dev = _common.device_info(torch.device("cuda"))
    return {
        "search": dict(search._fwd_config(8192, 4, 512, 256, 32, "ieee", dev)),
        "search_bwd": dict(search._bwd_config(8192, 4, 512, dev)),
        "gather_fwd": dict(gather._fwd_config(8192, 128, 1024, 512**2, 2, dev.l2_bytes)),
        "gather_bwd": dict(gather._bwd_config(512**2, 1024)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layer-<gpu>.json)")
    ap.add_argument("--quick", action="store_true", help="pkmem triton and the FFN only")
    args = ap.parse_args()
    tuned = kernel_configs()
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"layer-{gpu_slug()}.json")
    bw = copy_bandwidth()
    rate = matmul_rate()
    data = {
        "env": environment(),
        "copy_bandwidth_TBps": bw / 1e12,
        "bf16_matmul_TFLOPs": rate / 1e12,
        "config": dict(dim=DIM, heads=HEADS, topk=TOPK, k_dim=K_DIM, autocast="bf16", params="fp32"),
        "results": [],
        "kernel_configs": tuned,
    }
    for name, T, nk in SETTINGS:
        data["results"] += run_setting(name, T, nk, bw, rate, args.quick)
        write_json(out_path, data)
    try:
        data["breakdown_paper_fwd_bwd"] = breakdown()
    except Exception as e:
        traceback.print_exc(limit=3)
        data["breakdown_paper_fwd_bwd"] = [{"error": f"{type(e).__name__}: {e}"}]
    write_json(out_path, data)

    print("\nper-kernel device time, pkmem triton (bf16 values), paper setting, fwd+bwd:")
    for r in data["breakdown_paper_fwd_bwd"][:14]:
        if "kernel" in r:
            print(f"  {r['ms_per_step']:7.3f} ms  x{r['calls_per_step']:.0f}  {r['kernel']}")
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; wrote {out_path}")
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["setting"], r["impl"], "error", r["error"][:50], "", ""])
            continue
        f, fb = r["fwd"]["median_ms"], r["fwd_bwd"]["median_ms"]
        extra = ""
        if "fwd_graph" in r:
            extra = f"train graph {r['fwd_graph']['median_ms']:.3f} / {r['fwd_bwd_graph']['median_ms']:.3f}; "
        if "fwd_eval_nograd" in r:
            extra += f"eval {r['fwd_eval_nograd']['median_ms']:.3f}"
            if "fwd_eval_cuda_graph" in r:
                extra += f" / graph {r['fwd_eval_cuda_graph']['median_ms']:.3f}"
        rows.append(
            [
                r["setting"],
                r["impl"],
                f"{f:.3f} ({f / r['floor_fwd_ms']:.1f}x)",
                f"{fb:.3f} ({fb / r['floor_fwd_bwd_ms']:.1f}x)",
                f"{r['peak_gib']:.1f}",
                extra,
            ]
        )
    header = ["setting", "impl", "fwd ms (/floor)", "fwd+bwd ms (/floor)", "peak GiB", "CUDA graphs"]
    print(table(rows, header))


if __name__ == "__main__":
    main()
