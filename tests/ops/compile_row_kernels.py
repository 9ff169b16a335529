"""Compile the row-sparse value kernels (the gather backward's row mode, the row Adam update) for
an H100/H200 (sm_90) without a GPU, as ``compile_for_hopper.py`` does for the others. Run as a
script without TRITON_INTERPRET; prints one line per kernel configuration."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton  # noqa: E402
from compile_for_hopper import build  # noqa: E402

from pkmem.ops.triton import gather, row_adam  # noqa: E402


def main() -> int:
    i32, f32 = "i32", "fp32"
    for dt, v, by_entry in [("bf16", 1024, False), ("fp32", 512, True)]:
        g = gather._bwd_config(512**2, v)
        nvb = triton.cdiv(v, g["BLOCK_V"])
        types = dict(V=f"*{dt}", G=f"*{dt}", W="*fp32", PERM="*i64", OFFS="*i64", ROWS="*i64")
        types.update(GV=f"*{dt}", GW="*fp32", SORTED="*i32", TOUCHED="*i8", SUMSQ="*fp32")
        types.update(n_rows=i32, v_dim=i32, stride_v=i32, stride_g=i32, TJ=i32)
        consts = dict(J=128, BLOCK_V=g["BLOCK_V"], E=g["E"], SPARSE=False, NEED_GV=True, NEED_GW=True)
        consts.update(PREFETCH=g["PREFETCH"], POS=triton.language.int32, VPP=nvb, GW_ADD=nvb <= 2)
        consts.update(ROWMODE=True, BY_ENTRY=by_entry)
        size = build(gather._gather_bwd_kernel, types, consts, g["num_warps"])
        print(f"gather backward, row mode, {dt} table, v {v}, by entry {by_entry}: {size}")
    for dt, v in [("bf16", 1024), ("fp32", 512)]:
        c = row_adam._config(v)
        types = dict(P=f"*{dt}", M1="*fp32", M2="*fp32", GD=f"*{dt}", TOUCHED="*i8", ROWS="*i32")
        types.update(COUNT="*i32", SCALE="*fp32", LAST="*i32", HIST="*fp32", FLAGS="*i8")
        types.update(n_rows=i32, v_dim=i32, stride_p=i32, stride_g=i32, step=i32, step_size=f32)
        types.update(bc2_sqrt=f32, decay=f32, one_minus_beta1=f32, beta2=f32, one_minus_beta2=f32, eps=f32)
        types.update(seed="i64")
        for source, has_grad, exact in [
            (0, True, False),
            (0, True, True),
            (1, False, True),
            (2, False, True),
        ]:
            consts = dict(BLOCK_V=c["BLOCK_V"], NVB=triton.cdiv(v, c["BLOCK_V"]), SOURCE=source)
            consts.update(HAS_GRAD=has_grad, HAS_SCALE=has_grad, EXACT=exact, SR=dt == "bf16")
            size = build(row_adam._row_adam_kernel, types, consts, c["num_warps"])
            print(f"row adam, {dt} table, rows from {source}, gradient {has_grad}, exact {exact}: {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
