"""Python's share of an eager layer call: the layer's own wrappers with the Triton launches stubbed
out (CPU tensors, ``TRITON_INTERPRET=1``, tiny sizes so that torch's CPU ops cost little).

    python benchmarks/host_python.py [eval|train] [--profile]

Prints microseconds per call (eval: a 4-token eval forward under ``inference_mode``; train: forward
and backward). What a GPU call adds on top is the launches themselves (torch ops and Triton's JIT
launch path, 15-25 us each on the device tool's hosts: ``benchmarks/launch_cost.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"  # before pkmem's kernels are imported

import torch  # noqa: E402

from pkmem import ProductKeyMemory  # noqa: E402
from pkmem.ops import reference  # noqa: E402
from pkmem.ops.triton import gather, norm, search  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", nargs="?", default="eval", choices=["eval", "train"])
    ap.add_argument("--profile", action="store_true", help="cProfile table of the calls")
    a = ap.parse_args()
    kernels = {
        search: ["_search_fwd_kernel", "_search_bwd_scatter_kernel"],
        gather: ["_gather_fwd_kernel", "_gather_bwd_kernel"],
        norm: ["_bn_stats_kernel", "_bn_norm_kernel", "_bn_bwd_sums_kernel", "_bn_bwd_dx_kernel"],
    }
    for mod, names in kernels.items():
        for name in names:
            setattr(mod, name, _NoLaunch())
    # the outputs are never written: skip the CPU-only index check (it does not run on CUDA tensors)
    reference.check_indices_below = lambda *args: None
    torch.set_num_threads(1)
    layer = ProductKeyMemory(64, 4, 16, 8, 32, backend="triton")
    x = torch.randn(4, 64)
    if a.mode == "eval":
        layer.eval()

        def call():
            with torch.inference_mode():
                return layer(x)
    else:
        xr = x.clone().requires_grad_()

        def call():
            layer(xr).sum().backward()

    for _ in range(50):
        call()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    print(f"{a.mode}: {1e6 * (time.perf_counter() - t0) / n:.1f} us per call (launches stubbed out)")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            call()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())


if __name__ == "__main__":
    main()
