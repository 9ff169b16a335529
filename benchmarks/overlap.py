"""Can the search (latency-bound, little memory traffic) run under the value gather (memory-bound)?

The forward's two big kernels run one after the other: the search (~0.22 ms at the paper setting)
leaves the memory idle, the gather (~0.48 ms) leaves the arithmetic idle. This measures the search
and gather of 8192 tokens (paper setting, bf16 table) done in C chunks on two CUDA streams: the
search of chunk c + 1 (high-priority stream) next to the gather of chunk c (low-priority stream),
against the plain sequence, in CUDA graphs (device time) and eagerly. Same outputs are checked.

    python benchmarks/overlap.py [--out benchmarks/results/overlap-<gpu>.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time, environment, gpu_slug, graph_time, write_json  # noqa: E402

from pkmem.ops.triton.gather import gather_forward  # noqa: E402
from pkmem.ops.triton.search import search_forward  # noqa: E402

T, H, N_KEYS, D, K, V_DIM = 8192, 4, 512, 256, 32, 1024


def sequential(q, sk, values):
    w, i = search_forward(q, sk, K, score="softmax")
    return gather_forward(values, i.reshape(T, H * K), w.reshape(T, H * K))


def chunked(q, sk, values, chunks: int, hi: torch.cuda.Stream, lo: torch.cuda.Stream):
    """Search of chunk c on ``hi``, its gather on ``lo`` once that search is done."""
    main = torch.cuda.current_stream()
    hi.wait_stream(main)
    lo.wait_stream(main)
    out = torch.empty(T, V_DIM, device=q.device)
    step = T // chunks
    for c in range(chunks):
        rows = slice(c * step, (c + 1) * step)
        with torch.cuda.stream(hi):
            w, i = search_forward(q[rows], sk, K, score="softmax")
            done = torch.cuda.Event()
            done.record(hi)
        with torch.cuda.stream(lo):
            lo.wait_event(done)
            out[rows] = gather_forward(values, i.reshape(step, H * K), w.reshape(step, H * K))
            w.record_stream(lo)
            i.record_stream(lo)
    main.wait_stream(hi)
    main.wait_stream(lo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, H, 2 * D, device="cuda", generator=g)
    sk = torch.randn(H, 2, N_KEYS, D, device="cuda", generator=g) / D**0.5
    values = (torch.randn(N_KEYS**2, V_DIM, device="cuda", generator=g) / V_DIM**0.5).bfloat16()
    ref = sequential(q, sk, values)
    w, i = search_forward(q, sk, K, score="softmax")
    res = {
        "env": environment(),
        "setting": dict(T=T, H=H, num_keys=N_KEYS, k_dim=2 * D, topk=K, v_dim=V_DIM, table="bf16"),
        "search_graph_ms": graph_time(lambda: search_forward(q, sk, K, score="softmax"))["median_ms"],
        "gather_graph_ms": graph_time(
            lambda: gather_forward(values, i.reshape(T, H * K), w.reshape(T, H * K))
        )["median_ms"],
        "sequential": {
            "graph_ms": graph_time(lambda: sequential(q, sk, values))["median_ms"],
            "eager_ms": cuda_time(lambda: sequential(q, sk, values))["median_ms"],
        },
        "chunked": [],
    }
    lo_prio, hi_prio = 0, -10  # lower is higher; out of range maps to the highest priority
    for prios in [(hi_prio, lo_prio), (0, 0)]:
        hi = torch.cuda.Stream(priority=prios[0])
        lo = torch.cuda.Stream(priority=prios[1])
        for chunks in (2, 4, 8, 16):
            fn = lambda c=chunks, hi=hi, lo=lo: chunked(q, sk, values, c, hi, lo)  # noqa: E731
            row = {"chunks": chunks, "priorities (search, gather)": list(prios)}
            try:
                out = fn()
                torch.cuda.synchronize()
                row["same_output"] = bool(torch.equal(out, ref))
                row["eager_ms"] = cuda_time(fn)["median_ms"]
                row["graph_ms"] = graph_time(fn)["median_ms"]
            except Exception as e:  # reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.synchronize()
            res["chunked"].append(row)
            print(row)
    print({k: v for k, v in res.items() if k not in ("env", "chunked")})
    path = args.out or os.path.join(os.path.dirname(__file__), "results", f"overlap-{gpu_slug()}.json")
    write_json(path, res)
    print("wrote", path)


if __name__ == "__main__":
    with torch.no_grad():
        main()
