"""Per-kernel timeline of one CUDA-graph replay of the layer (one GPU run).

    python benchmarks/timeline.py [--out benchmarks/results/timeline-<gpu>.json] [--tokens 8192]

The paper setting's layer (pkmem triton, bf16 values, bf16 autocast) is captured as in
``benchmarks/layer.py`` (``torch.cuda.make_graphed_callables``: the training-mode forward, and the
forward + backward), and also as an eval forward without autograd. Each graph is replayed under the
torch profiler; per replay the kernels are listed in launch order with their start (from the
replay's first kernel), duration and the idle gap before them, medians over the replays. The sum
of the gaps is the time the graph spends between kernels: launch latency and the tail of one
kernel before the next may start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import environment, gpu_slug, write_json  # noqa: E402
from layer import DIM, make  # noqa: E402

REPLAYS = 20


def _kernels(prof) -> list[dict]:
    """Device activity (kernels, memsets, copies) of the profile, in start order."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ev = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    return sorted(ev, key=lambda e: e["ts"])


def timeline(fn, label: str) -> dict:
    """Replays ``fn`` (one graph replay per call) REPLAYS times under the profiler."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            fn()
            torch.cuda.synchronize()  # replays apart: a replay's kernels are the ones between syncs
            time.sleep(1e-3)  # an idle gap the split below sees even when the next launch is quick
    ev = _kernels(prof)
    # split into replays at the large idle gaps left by the synchronisations
    replays, cur = [], [ev[0]]
    for a, b in zip(ev, ev[1:]):
        if b["ts"] - (a["ts"] + a["dur"]) > 30:  # us: a synchronisation lies between them
            replays.append(cur)
            cur = []
        cur.append(b)
    replays.append(cur)
    n = statistics.mode(len(r) for r in replays)
    replays = [r for r in replays if len(r) == n]
    rows = []
    for i in range(n):
        durs = [r[i]["dur"] for r in replays]
        gaps = [r[i]["ts"] - (r[i - 1]["ts"] + r[i - 1]["dur"]) if i else 0.0 for r in replays]
        starts = [r[i]["ts"] - r[0]["ts"] for r in replays]
        rows.append(
            {
                "kernel": replays[0][i]["name"][:110],
                "start_us": statistics.median(starts),
                "dur_us": statistics.median(durs),
                "gap_before_us": statistics.median(gaps),
            }
        )
    spans = [r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"] for r in replays]
    out = {
        "label": label,
        "replays": len(replays),
        "kernels": n,
        "span_us": statistics.median(spans),
        "sum_dur_us": sum(r["dur_us"] for r in rows),
        "sum_gap_us": sum(r["gap_before_us"] for r in rows),
        "rows": rows,
    }
    print(
        f"=== {label}: {n} kernels, span {out['span_us']:.1f} us = kernels {out['sum_dur_us']:.1f} "
        f"+ gaps {out['sum_gap_us']:.1f} ({len(replays)} replays)"
    )
    for r in rows:
        print(f"  {r['start_us']:8.1f} {r['dur_us']:8.1f} gap {r['gap_before_us']:6.1f}  {r['kernel']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/timeline-<gpu>.json)")
    a = ap.parse_args()
    torch.manual_seed(0)
    layer = make("pkmem triton (bf16 values)", 512).cuda().train()
    x = torch.randn(a.tokens, DIM, device="cuda", requires_grad=True)
    gy = torch.randn(a.tokens, DIM, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(layer, (x,))

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return graphed(x)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fwd().backward(gy)

    results = [timeline(fwd, "train forward (graph)"), timeline(fwd_bwd, "train forward+backward (graphs)")]
    layer.eval()
    xe = x.detach().clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with (
        torch.cuda.stream(s),
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False),
    ):
        for _ in range(3):
            layer(xe)
    torch.cuda.current_stream().wait_stream(s)
    with (
        torch.cuda.graph(g),
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False),
    ):
        layer(xe)
    results.append(timeline(g.replay, "eval forward (graph)"))
    out = a.out or Path(__file__).resolve().parent / "results" / f"timeline-{gpu_slug()}.json"
    write_json(str(out), {"env": environment(), "tokens": a.tokens, "timelines": results})


if __name__ == "__main__":
    main()
