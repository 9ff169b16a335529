"""Decode-size forward (eval, bf16 autocast) of the memory layer and of the FFN it replaces, as a
user runs it: eager, ``torch.compile`` (default) and ``torch.compile(mode="reduce-overhead")``
(inductor's CUDA graphs), wall time per call including the host's launch cost.

    python benchmarks/decode.py [--out benchmarks/results/decode-<gpu>.json]

At a few dozen tokens the GPU work of either layer is ~0.05 ms and an eager call is bound by the
host issuing its kernels; ``reduce-overhead`` replays the whole call as one CUDA graph.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
from torch import nn

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import cuda_time, environment, gpu_slug, table, write_json  # noqa: E402

from pkmem import ProductKeyMemory  # noqa: E402

DIM, HEADS, NUM_KEYS, TOPK, K_DIM = 1024, 4, 512, 32, 512
MODES = ["eager", "torch.compile", "torch.compile reduce-overhead"]


def make(impl: str) -> nn.Module:
    if impl == "FFN 4*dim":
        return nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
    layer = ProductKeyMemory(DIM, HEADS, NUM_KEYS, TOPK, K_DIM, backend="triton")
    layer.values.data = layer.values.data.to(torch.bfloat16)
    return layer


def timed(layer: nn.Module, mode: str, x: torch.Tensor) -> dict:
    if mode == "torch.compile":
        layer = torch.compile(layer)
    elif mode == "torch.compile reduce-overhead":
        layer = torch.compile(layer, mode="reduce-overhead")

    def f():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x)

    for _ in range(5):  # compile, record the graphs, warm up
        f()
    return cuda_time(f, iters=100, warmup=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    out = {"env": environment(), "results": []}
    for T in args.tokens:
        x = torch.randn(T, DIM, device="cuda")
        for impl in ["pkmem triton (bf16 values)", "FFN 4*dim"]:
            layer = make(impl).cuda().eval()
            for mode in MODES:
                torch._dynamo.reset()
                try:
                    r = timed(layer, mode, x)
                except Exception as e:  # reported, not fatal
                    traceback.print_exc(limit=3)
                    r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                out["results"].append({"tokens": T, "impl": impl, "mode": mode, **r})
                print(T, impl, mode, r.get("median_ms", r.get("error")), flush=True)
    rows = []
    for T in args.tokens:
        res = {(r["impl"], r["mode"]): r for r in out["results"] if r["tokens"] == T}
        for mode in MODES:
            m, f = res[("pkmem triton (bf16 values)", mode)], res[("FFN 4*dim", mode)]
            if "median_ms" in m and "median_ms" in f:
                ratio = f"{m['median_ms'] / f['median_ms']:.2f}x"
                rows.append([T, mode, f"{m['median_ms']:.3f}", f"{f['median_ms']:.3f}", ratio])
            else:
                rows.append([T, mode, m.get("error", "-")[:40], f.get("error", "-")[:40], "-"])
    print(table(rows, ["tokens", "mode", "memory ms", "FFN ms", "memory / FFN"]))
    write_json(args.out or os.path.join("benchmarks", "results", f"decode-{gpu_slug()}.json"), out)


if __name__ == "__main__":
    main()
