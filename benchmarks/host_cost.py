"""The host's share of an eager layer call, on whatever pkmem is imported: run it once per version
(``PYTHONPATH=<that version>/src``) to compare versions side by side in one session.

    python benchmarks/host_cost.py --label after --out results/host-after.json [--quick]

Per setting (the paper's: 8192 tokens; decoding: 64 tokens; dim 1024, 4 heads, 512**2 slots,
k 32, k_dim 512, bf16 value table, bf16 autocast, fp32 parameters, as ``benchmarks/layer.py``):

- ``host_us``: host time to issue one call (``time.perf_counter`` around the call alone, the
  device synchronised before each sample, so that a full launch queue never blocks it): median;
- ``eager_ms``: one call between two CUDA events (what ``benchmarks/layer.py`` reports as "fwd"):
  the larger of the host's time and the device's, median;
- ``graph_ms``: the eval forward replayed from a CUDA graph, ten replays back to back: the
  device time without the host;

for a training-mode forward with autograd on ("train fwd") and an eval forward without autograd
("eval fwd"), and the same for the 4 x dim FFN that a memory layer replaces. Without a GPU it runs
tiny sizes on the CPU (the kernels under TRITON_INTERPRET=1: a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

import pkmem  # noqa: E402
from pkmem import ProductKeyMemory  # noqa: E402

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import cuda_time, git_commit, graph_time, write_json  # noqa: E402


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def host_us(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    _sync()
    return statistics.median(samples)


def eager_ms(fn, n: int) -> float | None:
    return cuda_time(fn, iters=n)["median_ms"] if CUDA else None


def graph_ms(fn, n: int) -> float | None:
    return graph_time(fn, iters=n, calls=10)["median_ms"] if CUDA else None


def measure(module: nn.Module, x: torch.Tensor, n: int) -> dict:
    dev = x.device.type
    xg = x.clone().requires_grad_()

    def train():
        with torch.autocast(dev, dtype=torch.bfloat16):
            return module(xg)

    def infer():
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, cache_enabled=False):
            return module(x)

    out = {}
    module.train()
    for _ in range(5):  # compiles the kernels, warms the caches
        train()
    out["train fwd"] = {"host_us": host_us(train, n), "eager_ms": eager_ms(train, n)}
    module.eval()
    for _ in range(5):
        infer()
    out["eval fwd"] = {"host_us": host_us(infer, n), "eager_ms": eager_ms(infer, n)}
    out["eval fwd"]["graph_ms"] = graph_ms(infer, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--label", default="", help="what this run is (before / after)")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    args = ap.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    if CUDA:
        dim, heads, keys, topk, kd, settings = 1024, 4, 512, 32, 512, [("paper", 8192), ("decode", 64)]
    else:
        dim, heads, keys, topk, kd, settings = 64, 2, 16, 4, 16, [("tiny", 8)]
    n = 20 if args.quick or not CUDA else 50
    data = {
        "label": args.label,
        "pkmem": os.path.dirname(pkmem.__file__),
        "git_commit": git_commit(os.path.dirname(pkmem.__file__)),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "results": {},
    }
    torch.manual_seed(0)
    layer = ProductKeyMemory(dim, heads, keys, topk, kd, backend="triton").to(device)
    layer.values.data = layer.values.data.to(torch.bfloat16)
    ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)).to(device)
    for name, T in settings:
        x = torch.randn(T, dim, device=device)
        row = {"tokens": T, "layer": measure(layer, x, n), "ffn": measure(ffn, x, n)}
        data["results"][name] = row
        for what in ("train fwd", "eval fwd"):
            m, f = row["layer"][what], row["ffn"][what]
            print(
                f"[{args.label}] {name} {what}: layer host {m['host_us']:.0f} us, eager "
                f"{m['eager_ms']} ms, graph {m.get('graph_ms')} ms; FFN host {f['host_us']:.0f} us, "
                f"eager {f['eager_ms']} ms"
            )
    if args.out:
        write_json(args.out, data)


if __name__ == "__main__":
    main()
