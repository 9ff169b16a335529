"""Host cost of the steps of one memory-layer call, measured one by one (microseconds per call, no
profiler: ``n`` calls back to back, one synchronisation): Triton launches through the JIT and
straight through the compiled kernel, allocations, and the search op's parts.

    python benchmarks/launch_cost.py [--out benchmarks/results/launch-cost-<gpu>.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, gpu_slug, write_json  # noqa: E402

from pkmem import ProductKeyMemory  # noqa: E402
from pkmem.ops.triton import gather, search  # noqa: E402


def host_us(fn, n: int = 1000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(3):  # best of three rounds (the host is shared)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return min(best)


def capture_launch(module, name: str, call):
    """The kernel ``module.name`` as ``call()`` launches it: (jit, grid, args, kwargs)."""
    jit = getattr(module, name)
    seen = {}

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(grid=grid, args=args, kwargs=kwargs)
                return jit[grid](*args, **kwargs)

            return launch

    setattr(module, name, Capture())
    try:
        call()
    finally:
        setattr(module, name, jit)
    return jit, seen["grid"], seen["args"], seen["kwargs"]


def launch_paths(module, name: str, call) -> dict:
    """Host microseconds of one kernel's launch through the JIT and through its compiled kernel
    (all parameters in order), and of building a cache key from the arguments."""
    jit, grid, args, kwargs = capture_launch(module, name, call)
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    compiled = jit[grid](*args, **kwargs)
    names = jit.arg_names
    full = list(args) + [kwargs[n] for n in names[len(args) :]]
    runner = compiled[grid3]

    def key():
        return tuple(
            (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in full
        ) + (kwargs.get("num_warps"),)

    return {
        f"{name}: {len(full)} parameters, JIT launch": host_us(lambda: jit[grid](*args, **kwargs)),
        f"{name}: compiled[grid](...)": host_us(lambda: runner(*full)),
        f"{name}: key of the arguments": host_us(key),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, DIM = 64, 1024
    layer = ProductKeyMemory(DIM, 4, 512, 32, 512, backend="triton").cuda().eval()
    layer.values.data = layer.values.data.to(torch.bfloat16)
    x = torch.randn(T, DIM, device="cuda")
    with torch.no_grad():
        q = layer.query(x)
        w, idx = layer.lookup(x)
    idx2, w2 = idx.reshape(T, -1).contiguous(), w.reshape(T, -1).contiguous()
    out = torch.empty(T, DIM, device="cuda")
    V = layer.values
    cfg = gather._fwd_config(T, 128, DIM, V.shape[0], 2, gather._l2_bytes(V.device))
    grid = (T, DIM // cfg["BLOCK_V"])
    kargs = (V, idx2, w2, out, 128, DIM, V.stride(0))
    const = {"BLOCK_V": cfg["BLOCK_V"], "BLOCK_J": cfg["BLOCK_J"]}

    def jit_launch():
        return gather._gather_fwd_kernel[grid](*kargs, **const, num_warps=cfg["num_warps"])

    compiled = jit_launch()
    full = (*kargs, *const.values())
    runner = compiled[(*grid, 1)]

    def runner_launch():
        runner(*full)

    stream_of = torch.cuda.current_stream

    def direct_launch():
        compiled.run(
            grid[0], grid[1], 1, stream_of().cuda_stream, compiled.function, compiled.packed_metadata,
            None, None, None, *full,
        )  # fmt: skip

    ref = out.clone()
    out.zero_()
    direct_launch()
    torch.cuda.synchronize()
    same = torch.equal(out, ref)
    lin = layer.query_net.linears[0]
    xb = x.bfloat16()
    wb = lin.weight.bfloat16()
    ac = torch.autocast("cuda", dtype=torch.bfloat16)

    def autocast_linear():
        with ac:
            return lin(x)

    def ctx():
        with search._matmul_precision("tf32", q.device):
            pass

    res = {
        "gather kernel: JIT launch": host_us(jit_launch),
        "gather kernel: compiled[grid](...)": host_us(runner_launch),
        "gather kernel: compiled.run(...)": host_us(direct_launch),
        "direct launch gives the same output": same,
        "torch.empty": host_us(lambda: torch.empty(1024, device="cuda")),
        "torch.zeros": host_us(lambda: torch.zeros(1024, device="cuda")),
        "x + 1": host_us(lambda: x + 1),
        "x.to(bf16)": host_us(lambda: x.to(torch.bfloat16)),
        "F.linear bf16 (no autocast)": host_us(lambda: torch.nn.functional.linear(xb, wb)),
        "linear under autocast (fp32 x, weight)": host_us(autocast_linear),
        "autocast enter/exit": host_us(lambda: ac.__enter__() and None or ac.__exit__(None, None, None)),
        "_matmul_precision context": host_us(ctx),
        "half_scores (bmm)": host_us(lambda: search.half_scores(q, layer.subkeys, "tf32")),
        "search_forward": host_us(lambda: search.search_forward(q, layer.subkeys, 32)),
        "gather_forward": host_us(lambda: gather.gather_forward(V, idx2, w2)),
        "layer eval forward (autocast)": host_us(
            lambda: (ac.__enter__(), layer(x), ac.__exit__(None, None, None))
        ),
    }
    layer.train()
    xt = torch.randn(8192, DIM, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        qt = layer.query(xt)
        h = layer.query_net.linears[0](xt)
    from pkmem.ops.triton import norm

    bn = layer.query_net.norms[0]
    res.update(
        launch_paths(search, "_search_fwd_kernel", lambda: search.search_forward(qt, layer.subkeys, 32))
    )
    res.update(
        launch_paths(
            norm,
            "_bn_norm_kernel",
            lambda: norm.batch_norm_forward(
                h, bn.weight, bn.bias, None, 1e-5, True, bn.running_mean, bn.running_var, 0.1
            ),
        )
    )
    res.update(launch_paths(gather, "_gather_fwd_kernel", lambda: gather.gather_forward(V, idx2, w2)))
    for k, v in res.items():
        print(f"{k:45s} {v if isinstance(v, bool) else round(v, 1)}")
    path = args.out or os.path.join(os.path.dirname(__file__), "results", f"launch-cost-{gpu_slug()}.json")
    write_json(path, {"env": environment(), "T": T, "host_us": res})
    print("wrote", path)


if __name__ == "__main__":
    with torch.no_grad():
        main()
