"""Experiment: the gather forward in column slices, slice-major program order, so that one slice of
the value table (N x BLOCK_V) stays in L2 while every token reads it: each touched row is then read
from HBM about once instead of once per entry (1M entries over 262k rows at the paper's setting).

    python benchmarks/gather_slices.py --out gpu-out/gather-slices.json

Compares, in CUDA-graph replays, the kernel of the time (one program per token, 1024 columns) with a
sliced kernel over (BLOCK_V, BLOCK_J, BLOCK_T, warps), slice-major and token-major order. The sliced
kernel here accumulates (rows, columns) in place (123 registers at 64 x 32); the library's kernel
sums the rows every step, which measured faster at the chosen blocks (0.318 vs 0.400 ms,
results/kernels-h200.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, graph_time  # noqa: E402

from pkmem.ops.triton import gather  # noqa: E402


@triton.jit
def _fwd_sliced(
    V,
    IDX,
    W,
    OUT,
    T,
    J,
    v_dim,
    stride_v,
    n_tb,
    nvb,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
    COL_MAJOR: tl.constexpr,
):
    pid = tl.program_id(0)
    if COL_MAJOR:
        vb = pid // n_tb
        tb = pid % n_tb
    else:
        tb = pid // nvb
        vb = pid % nvb
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < v_dim
    for ti in range(BLOCK_T):
        t = (tb * BLOCK_T + ti).to(tl.int64)
        if t < T:
            acc = tl.zeros((BLOCK_J, BLOCK_V), tl.float32)
            for j0 in range(0, J, BLOCK_J):
                jj = j0 + tl.arange(0, BLOCK_J)
                jm = jj < J
                idx = tl.load(IDX + t * J + jj, mask=jm, other=-1)
                w = tl.load(W + t * J + jj, mask=jm, other=0.0).to(tl.float32)
                ok = idx >= 0
                rows = tl.load(
                    V + idx[:, None].to(tl.int64) * stride_v + cols[None, :],
                    mask=ok[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += rows * tl.where(ok, w, 0.0)[:, None]
            tl.store(OUT + t * v_dim + cols, tl.sum(acc, axis=0), mask=cmask)


def sliced(values, idx, w, BV, BJ, BT, warps, col_major=True, stages=None):
    T, J = idx.shape
    v = values.shape[1]
    out = torch.empty(T, v, device=values.device, dtype=torch.float32)
    n_tb = triton.cdiv(T, BT)
    nvb = triton.cdiv(v, BV)
    _fwd_sliced[(n_tb * nvb,)](
        values, idx, w, out, T, J, v, values.stride(0), n_tb, nvb,
        BLOCK_T=BT, BLOCK_V=BV, BLOCK_J=BJ, COL_MAJOR=col_major, num_warps=warps,
        **({} if stages is None else {"num_stages": stages}),
    )
    return out


def sweep2(out_path: str) -> None:
    """Around the first sweep's best (64 columns, 32 rows per step, one warp): pipelining stages,
    int32 indices, 64 rows per step; and where slicing cannot help (1M slots) or a float32 table."""
    g = torch.Generator(device="cuda").manual_seed(1)
    T, J, v = 8192, 128, 1024
    rows_out = []
    for N, dtype in [(512**2, torch.bfloat16), (512**2, torch.float32), (1024**2, torch.bfloat16)]:
        values = (torch.randn(N, v, device="cuda", generator=g) / v**0.5).to(dtype)
        idx = torch.randint(0, N, (T, J), device="cuda", generator=g)
        w = torch.softmax(torch.randn(T, J, device="cuda", generator=g), -1)
        ref = gather.gather_forward(values, idx, w)
        base = graph_time(lambda: gather.gather_forward(values, idx, w), iters=50)["median_ms"]
        tag = f"N {N} {str(dtype)[6:]}"
        print(f"{tag}: current kernel {base:.4f} ms", flush=True)
        rows_out.append({"N": N, "dtype": str(dtype), "variant": "current", "ms": base})
        es = values.element_size()
        bvs = [64 // (es // 2), 128 // (es // 2)] if N == 512**2 else [32, 64, 128]
        for BV, BJ, warps, stages, i32 in itertools.product(bvs, [16, 32, 64], [1, 2], [1, 2, 3], [False, True]):
            per_thread = BV * BJ // (32 * warps)
            if per_thread > 128 or per_thread < 16 or (N != 512**2 and (stages != 1 or i32)):
                continue
            ii = idx.int() if i32 else idx
            try:
                out = sliced(values, ii, w, BV, BJ, 1, warps, True, stages)
                err = (out - ref).abs().max().item()
                ms = graph_time(lambda: sliced(values, ii, w, BV, BJ, 1, warps, True, stages), iters=30)["median_ms"]
            except Exception as e:  # noqa: BLE001
                print("fail", BV, BJ, warps, stages, i32, repr(e)[:200])
                continue
            rows_out.append(dict(N=N, dtype=str(dtype), BV=BV, BJ=BJ, warps=warps, stages=stages, idx32=i32, ms=ms, err=err))
            print(f"  BV {BV:4d} BJ {BJ:3d} w {warps} st {stages} i32 {int(i32)}: {ms:.4f} ms  err {err:.2e}", flush=True)
        del values
        torch.cuda.empty_cache()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps({"env": environment(), "rows": rows_out}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-out/gather-slices.json")
    ap.add_argument("--sweep", type=int, default=1)
    args = ap.parse_args()
    if args.sweep == 2:
        return sweep2(args.out)
    T, J, N, v = 8192, 128, 512**2, 1024
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    res = {"env": environment(), "l2_bytes": getattr(props, "L2_cache_size", None), "copy_TBps": bw / 1e12}
    print(res["l2_bytes"], bw / 1e12, flush=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    values = (torch.randn(N, v, device="cuda", generator=g) / v**0.5).to(torch.bfloat16)
    rows_out = []
    for dist in ["uniform", "zipf"]:
        if dist == "uniform":
            idx = torch.randint(0, N, (T, J), device="cuda", generator=g)
        else:  # a skewed use of the slots (trained memories use some slots far more than others)
            r = torch.rand(T, J, device="cuda", generator=g)
            idx = (N * r**3).long().clamp_(max=N - 1)
        w = torch.softmax(torch.randn(T, J, device="cuda", generator=g), -1)
        touched = int(torch.unique(idx).numel())
        ref = gather.gather_forward(values, idx, w)
        base = graph_time(lambda: gather.gather_forward(values, idx, w), iters=50)["median_ms"]
        print(f"{dist}: touched {touched}, current kernel {base:.4f} ms", flush=True)
        rows_out.append({"dist": dist, "variant": "current", "touched": touched, "ms": base})
        for BV, BJ, BT, warps in itertools.product([32, 64, 128, 256], [16, 32], [1, 4], [1, 2]):
            if BV * BJ // (32 * warps) > 256 or BV * BJ // (32 * warps) < 8:
                continue
            for cm in [True] + ([False] if (BV, BT) == (64, 1) else []):
                try:
                    out = sliced(values, idx, w, BV, BJ, BT, warps, cm)
                    err = (out - ref).abs().max().item()
                    ms = graph_time(lambda: sliced(values, idx, w, BV, BJ, BT, warps, cm), iters=30)["median_ms"]
                except Exception as e:  # noqa: BLE001
                    print("fail", BV, BJ, BT, warps, cm, repr(e)[:200])
                    continue
                row = dict(dist=dist, variant="sliced", BV=BV, BJ=BJ, BT=BT, warps=warps, col_major=cm, ms=ms, err=err)
                rows_out.append(row)
                print(f"  BV {BV:4d} BJ {BJ:3d} BT {BT} w {warps} {'col' if cm else 'tok'}: {ms:.4f} ms  err {err:.2e}", flush=True)
        torch.cuda.empty_cache()
    res["rows"] = rows_out
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
