"""Experiment: where the search forward's time goes, and two changes to it, in CUDA-graph replays.

    python benchmarks/search_parts.py --out gpu-out/search-parts.json

1. The half-score product: tf32 (current) vs bf16 operands with float32 results (``out_dtype``).
2. Token chunks: the half scores of a chunk of tokens (C x 4 x 2 x 512 float32: 33.5 MB at C = 2048)
   fit in L2, so the selection kernel that follows reads them from L2 instead of HBM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_time  # noqa: E402

from pkmem.ops.triton import search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-out/search-parts.json")
    args = ap.parse_args()
    T, H, n, kd, k = 8192, 4, 512, 512, 32
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, H, kd, device="cuda", generator=g)
    sk = torch.randn(H, 2, n, kd // 2, device="cuda", generator=g) / 16
    res = {"env": environment(), "rows": []}

    def rec(name, fn, **kw):
        ms = graph_time(fn, iters=50)["median_ms"]
        res["rows"].append({"name": name, "ms": ms, **kw})
        print(f"{name:60s} {ms:.4f} ms", flush=True)

    qh = search._per_half(q)
    kh = sk.reshape(H * 2, n, kd // 2).transpose(1, 2)
    qh16, kh16 = qh.to(torch.bfloat16), kh.to(torch.bfloat16)
    with search._matmul_precision("tf32", q.device):
        rec("half scores tf32 (current)", lambda: torch.bmm(qh, kh))
        rec("half scores bf16 -> float32", lambda: torch.bmm(qh16, kh16, out_dtype=torch.float32))
        rec("half scores bf16 -> bf16", lambda: torch.bmm(qh16, kh16))
        rec("cast queries to bf16", lambda: q.to(torch.bfloat16))
    rec("search forward (current)", lambda: search.search_forward(q, sk, k))
    S = search.half_scores(q, sk, "tf32")
    real = search.half_scores
    search.half_scores = lambda *a, **kw: S  # the selection kernel alone, scores in HBM
    try:
        rec("selection kernel alone (scores precomputed)", lambda: search.search_forward(q, sk, k))
    finally:
        search.half_scores = real
    ref_s, ref_i = search.search_forward(q, sk, k)
    for C in [4096, 2048, 1024]:
        def chunked(C=C):
            out = []
            for c in range(0, T, C):
                out.append(search.search_forward(q[c : c + C], sk, k))
            return out

        parts = chunked()
        same = all(torch.equal(p[1], ref_i[i * C : (i + 1) * C]) for i, p in enumerate(parts))
        rec(f"search forward in chunks of {C} tokens", chunked, same_indices=same)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
