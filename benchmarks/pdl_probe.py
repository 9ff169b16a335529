"""Experiment: does programmatic dependent launch (Triton's ``launch_pdl=True`` with ``gdc_wait``)
shorten the time between dependent Triton kernels replayed in a CUDA graph? A chain of 20 copy
kernels, with and without PDL, at three sizes.

    python benchmarks/pdl_probe.py              # writes $OUT/pdl.json

Result (H200, results/tried/pdl-probe-h200.json): 0.07-0.34 us per kernel saved (1.18 -> 1.11 us
per kernel at 64k elements): not worth it for the layer's four Triton launches.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time

try:
    from triton.language.extra.cuda import gdc_wait

    HAVE = True
except Exception as e:
    print("no gdc", e)
    HAVE = False


@triton.jit
def k_plain(X, Y, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(Y + o, tl.load(X + o, mask=m) + 1.0, mask=m)


@triton.jit
def k_pdl(X, Y, N, BLOCK: tl.constexpr):
    gdc_wait()
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(Y + o, tl.load(X + o, mask=m) + 1.0, mask=m)


def chain(kind, bufs, N, L):
    for i in range(L):
        x, y = bufs[i % 2], bufs[(i + 1) % 2]
        g = (triton.cdiv(N, 1024),)
        if kind == "plain":
            k_plain[g](x, y, N, BLOCK=1024)
        else:
            k_pdl[g](x, y, N, BLOCK=1024, launch_pdl=True)


res = {}
for N in (1 << 16, 1 << 22, 1 << 24):
    for kind in ["plain", "pdl"] if HAVE else ["plain"]:
        bufs = [torch.zeros(N, device="cuda"), torch.zeros(N, device="cuda")]
        L = 20
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            chain(kind, bufs, N, L)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            chain(kind, bufs, N, L)
        bufs[0].zero_()
        bufs[1].zero_()
        g.replay()
        torch.cuda.synchronize()
        val = float(bufs[L % 2][0])
        t = cuda_time(g.replay, iters=50)["median_ms"]
        res[f"{kind} N={N}"] = {
            "ms_per_kernel": t / L * 1e3 / 1e3,
            "us_per_kernel": t / L * 1e3,
            "check": val,
        }
        print(kind, N, f"{t / L * 1e3:.2f} us/kernel", "value", val, flush=True)
out = os.environ.get("OUT", ".")
json.dump(res, open(f"{out}/pdl.json", "w"), indent=1)
