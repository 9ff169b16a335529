"""Where the time of one memory layer goes that is not kernel time: host (Python / launch) cost per
call of the layer and of its parts, and device time with the host out of the way (CUDA graphs).

    python benchmarks/overhead.py [--out benchmarks/results/overhead-<gpu>.json]

Host time per call: ``n`` calls issued back to back, then one synchronisation, divided by ``n``
(for small inputs the GPU is idle most of the time, so this is the host's cost of issuing the work).
Also a CPU-side profile of the 64-token eval forward (top ops by self CPU time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time, environment, gpu_slug, graph_time, write_json  # noqa: E402

import pkmem.ops.triton as kernels  # noqa: E402
from pkmem import ProductKeyMemory  # noqa: E402

DIM, HEADS, NUM_KEYS, TOPK, K_DIM = 1024, 4, 512, 32, 512


def host_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def graph_ms(fn) -> float:
    return graph_time(fn, iters=50)["median_ms"]


def profile_calls(layer, x, activity, calls: int = 20):
    """``torch.profiler`` events (key averages) of ``calls`` eval forwards of ``layer`` on ``x``
    (bf16 autocast, no autograd): divide their totals by ``calls``."""
    from torch.profiler import profile

    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                layer(x)
        torch.cuda.synchronize()
    return prof.key_averages()


def decode_sweep(layer) -> list[dict]:
    """Device time (CUDA-graph replays) of the search and the gather at decode sizes, per block
    configuration: few tokens leave most SMs idle, so smaller blocks may finish sooner."""
    from pkmem.ops.triton.gather import gather_forward
    from pkmem.ops.triton.search import search_forward

    rows = []
    for T in (64, 512):
        x = torch.randn(T, DIM, device="cuda")
        layer.eval()
        with torch.no_grad():
            q = layer.query(x)
            w, idx = layer.lookup(x)
        idx2, w2 = idx.reshape(T, -1), w.reshape(T, -1)
        ref = search_forward(q, layer.subkeys, TOPK)
        for bt in (4, 8, 16, 32):
            for nw in (2, 4, 8):
                cfg = {"BT": bt, "num_warps": nw}
                try:
                    out = search_forward(q, layer.subkeys, TOPK, config=cfg)
                    ok = torch.equal(out[1], ref[1])
                    ms = graph_ms(lambda cfg=cfg, q=q: search_forward(q, layer.subkeys, TOPK, config=cfg))
                except Exception as e:  # a configuration that does not compile
                    ok, ms = f"{type(e).__name__}: {str(e)[:80]}", None
                rows.append({"op": "search", "T": T, "config": cfg, "graph_ms": ms, "same_result": ok})
        gref = gather_forward(layer.values, idx2, w2)
        for bv in (128, 256, 512, 1024):
            for bj in (4, 8, 16):
                for nw in (1, 2, 4, 8):
                    cfg = {"BLOCK_V": bv, "BLOCK_J": bj, "num_warps": nw}
                    try:
                        out = gather_forward(layer.values, idx2, w2, config=cfg)
                        ok = bool(torch.allclose(out, gref, atol=1e-5, rtol=1e-5))
                        ms = graph_ms(
                            lambda cfg=cfg, i=idx2, w=w2: gather_forward(layer.values, i, w, config=cfg)
                        )
                    except Exception as e:
                        ok, ms = f"{type(e).__name__}: {str(e)[:80]}", None
                    rows.append({"op": "gather", "T": T, "config": cfg, "graph_ms": ms, "same_result": ok})
    for r in rows:
        print(r)
    return rows


def python_profile(fn, calls: int, sort: str, lines: int) -> str:
    """cProfile of ``calls`` calls of ``fn`` (the host's Python time), ``lines`` rows by ``sort``."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats(sort).print_stats(lines)
    print(buf.getvalue())
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the decode block-size sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    layer = ProductKeyMemory(DIM, HEADS, NUM_KEYS, TOPK, K_DIM, backend="triton").cuda()
    layer.values.data = layer.values.data.to(torch.bfloat16)
    ffn = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM)).cuda()
    res = {"env": environment(), "host_us": {}, "device_ms": {}}
    ac = torch.autocast("cuda", dtype=torch.bfloat16)

    for T in (64, 8192):
        x = torch.randn(T, DIM, device="cuda")
        xg = x.clone().requires_grad_()
        layer.eval()
        with torch.no_grad():
            q = layer.query(x)
            w, idx = layer.lookup(x)
        J = HEADS * TOPK
        idx2, w2 = idx.reshape(T, J), w.reshape(T, J)
        hv = {}

        def ev(m=layer, x=x):
            with torch.no_grad(), ac:
                return m(x)

        def tr(m=layer, xg=xg):
            with ac:
                return m(xg)

        def query_net(x=x):
            with torch.no_grad(), ac:
                return layer._query(x, None)

        def search(q=q):
            with torch.no_grad():
                return kernels.product_topk(q, layer.subkeys, TOPK)

        def gather(idx2=idx2, w2=w2):
            with torch.no_grad():
                return kernels.weighted_gather(layer.values, idx2, w2, False)

        def empty_op():
            return torch.empty(1, device="cuda")

        hv["layer eval fwd"] = host_us(ev)
        hv["FFN eval fwd"] = host_us(lambda: ev(ffn))
        layer.train()
        ffn.train()
        hv["layer train fwd (autograd)"] = host_us(tr)
        hv["FFN train fwd (autograd)"] = host_us(lambda: tr(ffn))
        layer.eval()
        hv["query net + norm (eval)"] = host_us(query_net)
        hv["search op"] = host_us(search)
        hv["gather op"] = host_us(gather)
        hv["torch.empty (one op)"] = host_us(empty_op)
        res["host_us"][str(T)] = hv
        dv = {
            "layer eval fwd, eager": cuda_time(ev, iters=50)["median_ms"],
            "layer eval fwd, CUDA graph": graph_ms(ev),
            "FFN eval fwd, eager": cuda_time(lambda: ev(ffn), iters=50)["median_ms"],
            "FFN eval fwd, CUDA graph": graph_ms(lambda: ev(ffn)),
        }
        res["device_ms"][str(T)] = dv
        print(T, "host us:", {k: round(v, 1) for k, v in hv.items()})
        print(T, "device ms:", {k: round(v, 4) for k, v in dv.items()})

    if not args.no_sweep:
        res["decode_sweep"] = decode_sweep(layer)

    from torch.profiler import ProfilerActivity

    x = torch.randn(64, DIM, device="cuda")
    layer.eval()
    rows = []
    for e in profile_calls(layer, x, ProfilerActivity.CUDA):
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "us_per_call_of_layer": t / 20, "count": e.count / 20})
    rows.sort(key=lambda r: -r["us_per_call_of_layer"])
    res["gpu_kernels_eval_64"] = rows
    for r in rows:
        print(f"{r['us_per_call_of_layer']:8.1f} us  x{r['count']:.0f}  {r['kernel']}")

    rows = []
    for e in profile_calls(layer, x, ProfilerActivity.CPU):
        us = e.self_cpu_time_total / 20
        rows.append({"op": e.key[:80], "self_cpu_us_per_call_of_layer": us, "count": e.count / 20})
    rows.sort(key=lambda r: -r["self_cpu_us_per_call_of_layer"])
    res["cpu_profile_eval_64"] = rows[:30]
    for r in rows[:30]:
        print(f"{r['self_cpu_us_per_call_of_layer']:8.1f} us  x{r['count']:.0f}  {r['op']}")

    def eval_call(x=x):
        with torch.no_grad(), ac:
            layer(x)

    res["python_profile_eval_64"] = python_profile(eval_call, 200, "tottime", 30)
    xt = torch.randn(8192, DIM, device="cuda", requires_grad=True)
    layer.train()

    def step():
        with ac:
            out = layer(xt)
        out.float().sum().backward()

    for _ in range(3):
        step()
    res["python_profile_train_8192_cumulative"] = python_profile(step, 50, "cumulative", 45)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"overhead-{gpu_slug()}.json")
    write_json(out, res)
    print("wrote", out)


if __name__ == "__main__":
    main()
