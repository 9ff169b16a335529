"""Compile every Triton kernel of pkmem for an H100/H200 (sm_90) without a GPU: Triton's own
compiler pipeline down to a cubin (ptxas ships with triton). Run as a script (without
TRITON_INTERPRET): ``python tests/ops/compile_for_hopper.py``; prints one line per kernel."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pkmem.ops.triton import gather, norm, search  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, types: dict, consts: dict, num_warps: int) -> int:
    sig = dict(types)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return len(triton.compile(src, target=TARGET, options={"num_warps": num_warps}).asm["cubin"])


def main() -> int:
    i32, f32 = "i32", "fp32"
    # the search at the paper's setting (default configuration) and at decode sizes
    cfg = search._fwd_config(8192, 4, 512, 256, 32)
    s_types = dict(Q="*fp32", K="*fp32", S="*fp32", CV="*fp32", CC="*i32", CAND="*i32", S_OUT="*fp32")
    s_types.update(I_OUT="*i64", T=i32, H=i32, n=i32, D=i32, topk=i32, C=i32, inv_temp=f32, stride_qt=i32)
    s_types.update(stride_qh=i32, s_half=i32, s_stride=i32, s_block=i32)
    for T, score in [(8192, 1), (64, 2)]:
        c = search._fwd_config(T, 4, 512, 256, 32)
        consts = dict(BT=c["BT"], BN=c["BN"], BD=c["BD"], KP=32, CP=128, NG=c["NG"], CAP=c["CAP"], BNS=64)
        consts.update(PRECISION="tf32", TOPK=0, FUSED=False, EXACT=cfg["EXACT"], SCORE=score)
        print(
            "search forward", T, "tokens:", build(search._search_fwd_kernel, s_types, consts, c["num_warps"])
        )
    b_types = dict(GS="*fp32", W="*fp32", IDX="*i64", G="*bf16", T=i32, H=i32, n=i32, topk=i32, inv_temp=f32)
    b_types.update(Q="*fp32", Q16="*bf16", stride_qt=i32, stride_qh=i32, kd=i32)
    consts = dict(BT=8, KP=32, BNZ=128, SCORE=1, KDP=512, CAST_Q=True)
    print("search backward scatter:", build(search._search_bwd_scatter_kernel, b_types, consts, 4))
    g = gather._fwd_config(8192, 128, 1024, 512**2, 2, 50 * 2**20)
    f_types = dict(V="*bf16", IDX="*i64", W="*fp32", OUT="*fp32", J=i32, v_dim=i32, stride_v=i32)
    consts = dict(BLOCK_V=g["BLOCK_V"], BLOCK_J=g["BLOCK_J"])
    print("gather forward:", build(gather._gather_fwd_kernel, f_types, consts, g["num_warps"]))
    g = gather._bwd_config(512**2, 1024)
    w_types = dict(
        V="*bf16", G="*bf16", W="*fp32", PERM="*i64", OFFS="*i64", ROWS="*i64", GV="*bf16", GW="*fp32"
    )
    w_types.update(SORTED="*i32", TOUCHED="*i8", SUMSQ="*fp32")  # row mode's (pkmem.ops.rows.RowGrad)
    w_types.update(n_rows=i32, v_dim=i32, stride_v=i32, stride_g=i32, TJ=i32)
    consts = dict(J=128, BLOCK_V=g["BLOCK_V"], E=g["E"], SPARSE=False, NEED_GV=True, NEED_GW=True)
    consts.update(PREFETCH=g["PREFETCH"], POS=triton.language.int32, VPP=g["VPP"], GW_ADD=True)
    consts.update(ROWMODE=False, BY_ENTRY=False)
    print("gather backward:", build(gather._gather_bwd_kernel, w_types, consts, g["num_warps"]))
    consts.update(VPP=2, GW_ADD=False)
    print(
        "gather backward, 2 column blocks per program:", build(gather._gather_bwd_kernel, w_types, consts, 1)
    )
    # the query network's BatchNorm at the paper's setting: bf16 x, masked, training
    c = norm._config(8192, 2048)
    rows = dict(ROWS=c["ROWS"], BR=c["BR"], BC=c["BC"])
    n_types = dict(
        X="*bf16",
        MASK="*u8",
        SHIFT="*fp32",
        PCNT="*fp32",
        PMEAN="*fp32",
        PM2="*fp32",
        T=i32,
        C=i32,
        stride_x=i32,
    )
    consts = dict(rows, HAS_MASK=True, HAS_SHIFT=True)
    print("batch norm statistics:", build(norm._bn_stats_kernel, n_types, consts, 4))
    n_types = dict(
        X="*bf16", SHIFT="*fp32", PCNT="*fp32", PMEAN="*fp32", PM2="*fp32", RMEAN="*fp32", RVAR="*fp32"
    )
    n_types.update(W="*fp32", B="*fp32", Y="*bf16", MEAN="*fp32", VAR="*fp32", T=i32, C=i32, n_chunks=i32)
    n_types.update(stride_x=i32, eps=f32, momentum=f32)
    consts = dict(rows, NCB=32, TRAINING=True, HAS_W=True, HAS_B=True, UPDATE=True, HAS_SHIFT=True)
    print("batch norm normalise:", build(norm._bn_norm_kernel, n_types, consts, c["num_warps"]))
    s_types = dict(DY="*bf16", X="*bf16", SHIFT="*fp32", MASK="*u8", MEAN="*fp32", VAR="*fp32", PCNT="*fp32")
    s_types.update(P1="*fp32")
    s_types.update(P2="*fp32", T=i32, C=i32, stride_dy=i32, stride_x=i32, eps=f32)
    consts = dict(rows, HAS_MASK=True, HAS_SHIFT=True)
    print("batch norm backward sums:", build(norm._bn_bwd_sums_kernel, s_types, consts, c["num_warps"]))
    d_types = dict(DY="*bf16", X="*bf16", MASK="*u8", MEAN="*fp32", VAR="*fp32", W="*fp32", PCNT="*fp32")
    d_types.update(P1="*fp32", P2="*fp32", DX="*bf16", DW="*fp32", DB="*fp32", T=i32, C=i32, n_chunks=i32)
    d_types.update(stride_dy=i32, stride_x=i32, eps=f32, SHIFT="*fp32", DSHIFT="*fp32")
    consts = dict(rows, NCB=32, TRAINING=True, HAS_MASK=True, HAS_W=True, SUMS=True, NEED_DX=True)
    consts.update(HAS_SHIFT=True, NEED_SHIFT=True)
    print("batch norm backward dx:", build(norm._bn_bwd_dx_kernel, d_types, consts, c["num_warps"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
