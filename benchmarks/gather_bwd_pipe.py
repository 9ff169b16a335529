"""Experiment (not used by the library): the gather backward with grad_out rows loaded one or two
entries ahead (two or three 1 KB rows in flight per warp instead of one), against the current kernel.

    python benchmarks/gather_bwd_pipe.py        # writes $OUT/gather-bwd-pipe.json

Result (H200, results/tried/gather-bwd-pipe-h200.json): depth 2 0.521 ms, depth 3 0.580, the
current kernel 0.523: the kernel is not limited by the bytes one warp has in flight.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time

from pkmem.ops.triton import gather


@triton.jit
def _bwd_pipe(
    V,
    G,
    W,
    PERM,
    OFFS,
    GV,
    GW,
    v_dim,
    stride_v,
    stride_g,
    J: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DEPTH: tl.constexpr,
):
    r = tl.program_id(0)
    vb = tl.program_id(1)
    start = tl.load(OFFS + r)
    end = tl.load(OFFS + r + 1)
    row = r.to(tl.int64)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < v_dim
    vrow = tl.load(V + row * stride_v + cols, mask=cmask, other=0.0, eviction_policy="evict_first").to(
        tl.float32
    )
    acc = tl.zeros((BLOCK_V,), tl.float32)
    p0 = tl.load(PERM + start, mask=start < end, other=0)
    p1 = tl.load(PERM + start + 1, mask=start + 1 < end, other=0)
    g0 = tl.load(
        G + (p0 // J).to(tl.int64) * stride_g + cols,
        mask=cmask & (start + 0 * cols < end),
        other=0.0,
        eviction_policy="evict_last",
    )
    w0 = tl.load(W + p0, mask=start < end, other=0.0)
    if DEPTH == 3:
        p2 = tl.load(PERM + start + 2, mask=start + 2 < end, other=0)
        g1 = tl.load(
            G + (p1 // J).to(tl.int64) * stride_g + cols,
            mask=cmask & (start + 1 + 0 * cols < end),
            other=0.0,
            eviction_policy="evict_last",
        )
        w1 = tl.load(W + p1, mask=start + 1 < end, other=0.0)
        for e in range(start, end):
            g2 = tl.load(
                G + (p2 // J).to(tl.int64) * stride_g + cols,
                mask=cmask & (e + 2 + 0 * cols < end),
                other=0.0,
                eviction_policy="evict_last",
            )
            w2 = tl.load(W + p2, mask=e + 2 < end, other=0.0)
            p3 = tl.load(PERM + e + 3, mask=e + 3 < end, other=0)
            g = g0.to(tl.float32)
            acc += g * w0
            tl.atomic_add(GW + p0, tl.sum(g * vrow, axis=0), sem="relaxed")
            g0, w0, p0 = g1, w1, p1
            g1, w1, p1 = g2, w2, p2
            p2 = p3
    else:
        for e in range(start, end):
            g1 = tl.load(
                G + (p1 // J).to(tl.int64) * stride_g + cols,
                mask=cmask & (e + 1 + 0 * cols < end),
                other=0.0,
                eviction_policy="evict_last",
            )
            w1 = tl.load(W + p1, mask=e + 1 < end, other=0.0)
            p2 = tl.load(PERM + e + 2, mask=e + 2 < end, other=0)
            g = g0.to(tl.float32)
            acc += g * w0
            tl.atomic_add(GW + p0, tl.sum(g * vrow, axis=0), sem="relaxed")
            g0, w0, p0 = g1, w1, p1
            p1 = p2
    tl.store(GV + row * v_dim + cols, acc.to(GV.dtype.element_ty), mask=cmask, eviction_policy="evict_first")


def main():
    torch.manual_seed(0)
    T, J, N, v = 8192, 128, 512 * 512, 1024
    values = (torch.randn(N, v, device="cuda") / 32).to(torch.bfloat16)
    idx = torch.randint(0, N, (T, J), device="cuda")
    w = torch.softmax(torch.randn(T, J, device="cuda"), -1)
    go = torch.randn(T, v, device="cuda").to(torch.bfloat16)
    res = {}
    ref_gv, ref_gw = gather.gather_backward(go, values, idx, w)
    res["library gather_backward (sort + kernel)"] = graph_time(
        lambda: gather.gather_backward(go, values, idx, w)
    )["median_ms"]
    perm, offs, _ = gather._segments(idx, N, False)
    perm32 = perm.to(torch.int32)
    gv = torch.empty(N, v, device="cuda", dtype=torch.bfloat16)
    gw = torch.zeros(1, T * J, device="cuda")

    def cur():
        gw.zero_()
        gather._gather_bwd_kernel[(N, 2)](
            values,
            go,
            w,
            perm,
            offs,
            offs,
            gv,
            gw,
            N,
            v,
            values.stride(0),
            go.stride(0),
            T * J,
            J=J,
            BLOCK_V=512,
            E=1,
            SPARSE=False,
            NEED_GV=True,
            NEED_GW=True,
            PREFETCH=True,
            POS=tl.int32,
            VPP=1,
            GW_ADD=True,
            num_warps=1,
        )

    cur()
    torch.cuda.synchronize()
    print("current ok", torch.equal(gv, ref_gv), (gw[0].view(T, J) - ref_gw).abs().max().item(), flush=True)
    res["current kernel (+zero gw)"] = graph_time(cur)["median_ms"]
    res["zero gw alone"] = graph_time(lambda: gw.zero_())["median_ms"]
    for depth in (2, 3):
        for warps in (1,):
            for bv in (512, 256):

                def var(depth=depth, bv=bv, warps=warps):
                    gw.zero_()
                    _bwd_pipe[(N, triton.cdiv(v, bv))](
                        values,
                        go,
                        w,
                        perm32,
                        offs,
                        gv,
                        gw,
                        v,
                        values.stride(0),
                        go.stride(0),
                        J=J,
                        BLOCK_V=bv,
                        DEPTH=depth,
                        num_warps=warps,
                    )

                gv.fill_(float("nan"))
                var()
                torch.cuda.synchronize()
                okv = torch.equal(gv, ref_gv)
                errw = (gw[0].view(T, J) - ref_gw).abs().max().item()
                ms = graph_time(var)["median_ms"]
                name = f"pipe depth {depth} BLOCK_V {bv} warps {warps}"
                res[name] = {"ms": ms, "gv_equal": okv, "gw_maxerr": errw}
                print(name, res[name], flush=True)
    print(json.dumps(res, indent=1))
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gather-bwd-pipe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
