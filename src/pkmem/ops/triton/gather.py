"""Weighted gather of value rows (Triton): ``out[t] = sum_j w[t, j] * V[idx[t, j]]``, and its backward.

Twin of :func:`pkmem.ops.reference.weighted_gather`. Forward: one program per (token, column
block) streams the token's J rows with float32 accumulation; entries with a negative index are
skipped. Any ``v_dim`` (columns are masked), float32 / bfloat16 / float16 tables. When the rows
are re-read (entries >= 2 x rows), 64-column blocks run slice by slice, so each slice of the table
is served from L2 to every token after its first read from HBM.

Backward, deterministic (no order-dependent float atomics): the flat indices are sorted
(stable), so the entries that touch one row form a contiguous segment in token order. A program
walks a row's segment (E entries per step): it reads the row of ``V`` once, gathers
``grad_out[t]`` of each entry, accumulates ``sum w * grad_out[t]`` into the row's gradient and
writes ``<grad_out[t], V[row]>`` (partial over its column block) as that entry's weight gradient:
with at most two column blocks both partials are added onto zeros in place (``a + b == b + a``:
the same bits in either order), else each block writes its own row of partials, summed in block
order afterwards. Each row of the dense gradient is written exactly once
(untouched rows get zeros), so no memset and no host synchronisation is needed (CUDA graphs
work). For a bfloat16 / float16 table, grad_out is read rounded to the table's dtype (config
``G16``; the value gradient is stored in that dtype anyway): half the bytes of the gathers that
dominate the backward. With ``sparse=True`` the segments are those of the touched rows only
(``unique_consecutive``, which synchronises), and the result is a coalesced row-sparse COO tensor.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pkmem.ops.reference import LOW_PRECISION
from pkmem.ops.rows import RowGrad, active_row_grad
from pkmem.ops.triton._common import cdiv, new_output, next_pow2, to_output

__all__ = ["weighted_gather", "gather_forward", "gather_backward"]


@triton.jit
def _gather_fwd_kernel(
    V,
    IDX,
    W,
    OUT,
    J,
    v_dim,
    stride_v,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Token ``t``, columns of block ``vb``. The grid's first axis (tokens) varies fastest, so the
    programs of one column block run together: with narrow blocks, that slice of the table stays
    in L2 while every token reads it."""
    t = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < v_dim
    acc = tl.zeros((BLOCK_V,), tl.float32)
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
        acc += tl.sum(rows * tl.where(ok, w, 0.0)[:, None], axis=0)
    tl.store(OUT + t * v_dim + cols, acc, mask=cmask)


@triton.jit
def _gather_bwd_kernel(
    V,
    G,
    W,
    PERM,
    OFFS,
    ROWS,
    GV,
    GW,
    SORTED,
    TOUCHED,
    SUMSQ,
    n_rows,
    v_dim,
    stride_v,
    stride_g,
    TJ,
    J: tl.constexpr,
    BLOCK_V: tl.constexpr,
    E: tl.constexpr,
    SPARSE: tl.constexpr,
    NEED_GV: tl.constexpr,
    NEED_GW: tl.constexpr,
    PREFETCH: tl.constexpr,
    POS: tl.constexpr,
    VPP: tl.constexpr,
    GW_ADD: tl.constexpr,
    ROWMODE: tl.constexpr,
    BY_ENTRY: tl.constexpr,
):
    """Row ``r`` of the value gradient, columns of block ``vb``: the row's entries are
    OFFS[r]:OFFS[r+1] of the sorted order PERM, E at a time, as (columns, entries) tiles: a
    thread's columns of the E entries stay in its registers, the value gradient accumulates per
    entry place with no reduction in the loop (summed once at the end, a fixed order), and only the
    weight gradient (partial over this column block) reduces across the threads. The V row and the
    gradient row stream through once (evict first); grad_out rows are re-read by many rows (kept
    in L2). One warp per 512 columns: few instructions per element (the kernel is issue-bound).
    A program handles VPP column blocks of its row one after the other (its segment bounds read once).

    ROWMODE (a RowGrad's rows, VPP = all column blocks): row ``row``'s gradient is added to GV[row]
    (an (N, v) buffer whose rows are valid where TOUCHED), its squared norm written to SUMSQ[row]
    and TOUCHED[row] set; no other row is written. BY_ENTRY: one program per sorted entry,
    the first entry of each row's segment does the row (OFFS[i]: the segment's end), for steps
    with fewer entries than rows; else one program per row of the table (empty ones write nothing)."""
    r = tl.program_id(0)
    if BY_ENTRY:
        key = tl.load(SORTED + r)
        prev = tl.load(SORTED + r - 1, mask=r > 0, other=-1)
        start = r.to(tl.int64)
        end = tl.where((key >= 0) & (key != prev), tl.load(OFFS + r).to(tl.int64), start)
        row = tl.maximum(key, 0).to(tl.int64)
    else:
        start = tl.load(OFFS + r)
        end = tl.load(OFFS + r + 1)
        if SPARSE:
            row = tl.load(ROWS + r).to(tl.int64)
        else:
            row = r.to(tl.int64)
    if ROWMODE:
        has = start < end
        before = tl.load(TOUCHED + row, mask=has, other=0)  # 1: the row holds this step's gradient
        was = before != 0
        ss = tl.zeros((), tl.float32)
    for vi in tl.static_range(VPP):  # VPP column blocks per program, one after the other
        vb = tl.program_id(1) * VPP + vi
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < v_dim
        e_ar = tl.arange(0, E)
        vmask = cmask
        if ROWMODE:  # (a vector limit: a scalar mask broadcast in `&` is int32 under the interpreter)
            vmask = cols < tl.where(has, v_dim, 0)
        if NEED_GW:
            vrow = tl.load(
                V + row * stride_v + cols[:, None],
                mask=vmask[:, None],
                other=0.0,
                eviction_policy="evict_first",
            ).to(tl.float32)
        gw_base = GW + vb.to(tl.int64) * TJ  # this column block's partial weight gradients
        acc = tl.zeros((BLOCK_V, E), tl.float32)
        # the next entries' positions are loaded one step ahead (off the loop's chain of loads)
        p_next = tl.load(PERM + start + e_ar, mask=start + e_ar < end, other=0).to(POS)
        for e0 in range(start, end, E):
            ee = e0 + e_ar
            em = ee < end
            p = p_next
            if PREFETCH:
                p_next = tl.load(PERM + ee + E, mask=ee + E < end, other=0).to(POS)
            else:
                p = tl.load(PERM + ee, mask=em, other=0).to(POS)
            t = p // J
            w = tl.load(W + p, mask=em, other=0.0).to(tl.float32)
            g = tl.load(
                G + t[None, :].to(tl.int64) * stride_g + cols[:, None],
                mask=em[None, :] & cmask[:, None],
                other=0.0,
                eviction_policy="evict_last",
            ).to(tl.float32)
            acc += g * w[None, :]
            if NEED_GW:
                if GW_ADD:  # <= 2 column blocks: two float adds onto 0 give the same sum in any order
                    tl.atomic_add(GW + p, tl.sum(g * vrow, axis=0), mask=em, sem="relaxed")
                else:
                    tl.store(gw_base + p, tl.sum(g * vrow, axis=0), mask=em)
        if NEED_GV:
            if ROWMODE:
                grow = GV + row * v_dim + cols
                old = tl.load(grow, mask=cols < tl.where(has & was, v_dim, 0), other=0.0).to(tl.float32)
                out = to_output(tl.sum(acc, axis=1) + old, GV)
                tl.store(grow, out, mask=vmask)
                of = tl.where(vmask, out.to(tl.float32), 0.0)
                ss += tl.sum(of * of, axis=0)
            else:
                tl.store(
                    GV + r.to(tl.int64) * v_dim + cols,
                    to_output(tl.sum(acc, axis=1), GV),
                    mask=cmask,
                    eviction_policy="evict_first",
                )
    if ROWMODE:
        tl.store(SUMSQ + row, ss, mask=has)
        tl.store(TOUCHED + row, 1, mask=has)


# ---- launchers ------------------------------------------------------------------------------------


# block sizes measured best on an H200 (benchmarks/kernels.py); merged over the defaults below
TUNED_FWD: dict = {}
TUNED_BWD: dict = {}


def _l2_bytes(device: torch.device) -> int:
    """The device's L2 size in bytes (50 MB, an H100's, for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 50 * 2**20
    return _cuda_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_l2_bytes(index: int) -> int:  # cached: the eager launch path is host-bound
    return torch.cuda.get_device_properties(index).L2_cache_size


def _fwd_config(T: int, J: int, v: int, N: int, elem: int, l2_bytes: int) -> dict:
    # Every table row read by ~2 or more entries and a 64-column slice of the table about the
    # size of L2 (it holds most of it): 64-column slices, one warp of 32 rows per step. The slice
    # stays in L2 while every token reads it, so each touched row comes from HBM about once, and
    # the gather is served from L2 (H200, paper setting, bf16 table: 0.318 vs 0.474 ms, float32
    # table 0.677 vs 0.962, results/kernels-h200.json; the same blocks in token-major order were
    # 1.3x slower; at 1M slots, where each row is read about once, slices were 2-7% slower:
    # benchmarks/gather_slices.py, results/tried/gather-slices-*-h200.json)
    if v > 64 and T * J >= 2 * N and N * 64 * elem <= 1.25 * l2_bytes:
        return {"BLOCK_V": 64, "BLOCK_J": 32, "num_warps": 1, **TUNED_FWD}
    bv = min(next_pow2(v), 1024)
    # few tokens (decode): narrower column blocks so that enough programs run at once, one warp
    # per 256 columns (H200, v 1024: 13 vs 46 us at 64 tokens, 37 vs 101 us at 512; 8192 tokens
    # keep 1024 columns and 4 warps, at the bandwidth floor)
    while bv > 128 and T * cdiv(v, bv) < 8192:
        bv //= 2
    return {"BLOCK_V": bv, "BLOCK_J": 8, "num_warps": max(1, bv // 256), **TUNED_FWD}


def _bwd_config(n_rows: int, v: int) -> dict:
    # G16: for a 16-bit table, grad_out is read in the table's dtype (the value gradient is stored
    # in it anyway): half the bytes of the dominant grad_out gathers
    # one warp per 512 columns, one entry per step with the next position loaded ahead (H200, paper
    # setting: 0.80 vs 1.26 ms for the previous (entries, columns) kernel on one machine, 0.63x;
    # benchmarks/results/kernels-h200.json)
    cfg = {"BLOCK_V": 512, "E": 1, "PREFETCH": True, "num_warps": 1, "G16": True, "VPP": 1, **TUNED_BWD}
    cfg["BLOCK_V"] = min(next_pow2(v), cfg["BLOCK_V"])
    return cfg


def _check_inputs(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if values.dim() != 2 or indices.dim() != 2 or weights.shape != indices.shape:
        raise ValueError(
            f"values {tuple(values.shape)}, indices {tuple(indices.shape)}, weights {tuple(weights.shape)}: "
            "weighted_gather needs values (N, v_dim), indices (T, J) and weights (T, J)"
        )


def gather_forward(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, config: dict | None = None
) -> torch.Tensor:
    """``(N, v), (T, J), (T, J) -> (T, v)`` float32."""
    _check_inputs(values, indices, weights)
    T, J = indices.shape
    v = values.shape[1]
    if values.stride(-1) != 1:
        values = values.contiguous()
    indices, weights = indices.contiguous(), weights.contiguous()
    out = new_output(T, v, device=values.device, dtype=torch.float32)
    if T == 0 or v == 0:
        return out
    if J == 0:
        return out.zero_()
    N = values.shape[0]
    cfg = dict(_fwd_config(T, J, v, N, values.element_size(), _l2_bytes(values.device)), **(config or {}))
    grid = (T, cdiv(v, cfg["BLOCK_V"]))
    _gather_fwd_kernel[grid](
        values,
        indices,
        weights,
        out,
        J,
        v,
        values.stride(0),
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_J=cfg["BLOCK_J"],
        num_warps=cfg["num_warps"],
    )
    return out


def _keys(indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The flat indices as sort keys (int32 when the rows fit: a faster sort)."""
    flat = indices.reshape(-1)
    return flat.to(torch.int32) if num_rows < 2**31 - 1 else flat


def _segments(indices: torch.Tensor, num_rows: int, sparse: bool):
    """Stable sort of the flat indices: (perm, offsets (R+1), rows (R) or None)."""
    sorted_keys, perm = torch.sort(_keys(indices, num_rows), stable=True)
    if not sparse:
        bounds = torch.arange(num_rows + 1, device=indices.device, dtype=sorted_keys.dtype)
        return perm, torch.searchsorted(sorted_keys, bounds), None
    rows, counts = torch.unique_consecutive(sorted_keys, return_counts=True)  # synchronises
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    keep = rows >= 0
    rows, starts, ends = rows[keep], starts[keep], ends[keep]
    offsets = torch.cat([starts, ends[-1:]]) if rows.numel() else starts.new_zeros(1)
    return perm, offsets, rows


def gather_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    need_values: bool = True,
    need_weights: bool = True,
    sparse: bool = False,
    config: dict | None = None,
    row_grad: RowGrad | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the values (dense in values' dtype, or coalesced sparse COO) and of the weights.

    With ``row_grad`` (a :class:`~pkmem.ops.rows.RowGrad`), the value gradient's rows are added to
    it instead (no host synchronisation; only the rows read are written) and None is returned for
    the values."""
    T, J = indices.shape
    N, v = values.shape
    dev = values.device
    if values.stride(-1) != 1:
        values = values.contiguous()
    indices, weights = indices.contiguous(), weights.contiguous()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    rowmode = row_grad is not None and need_values
    by_entry = False
    if rowmode:
        row_grad.prepare(values)
        sorted_keys, perm = torch.sort(_keys(indices, N), stable=True)
        by_entry = T * J < N  # fewer entries than rows: one program per entry, else per table row
        if by_entry:
            offsets = torch.searchsorted(sorted_keys, sorted_keys, right=True)
        else:
            bounds = torch.arange(N + 1, device=dev, dtype=sorted_keys.dtype)
            offsets = torch.searchsorted(sorted_keys, bounds)
        rows, n_rows = None, (T * J if by_entry else N)
    else:
        perm, offsets, rows = _segments(indices, N, sparse)
        n_rows = N if rows is None else rows.numel()
    cfg = dict(_bwd_config(n_rows, v), **(config or {}))
    nvb = cdiv(v, cfg["BLOCK_V"]) if v > 0 else 1
    vpp = cfg["VPP"]
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise ValueError(f"config VPP={vpp!r} is not allowed: VPP must be a positive int")
    vpp = nvb if rowmode else min(vpp, nvb)  # row mode: one program does all of its row
    nvb = cdiv(nvb, vpp) * vpp  # whole programs (the extra blocks' columns are masked)
    if rowmode:
        gv = row_grad.grad
    else:
        gv = new_output(n_rows if need_values else 0, v, device=dev, dtype=values.dtype)
    # the weight gradient: with <= 2 column blocks their partials are added onto zeros in place
    # (deterministic: a + b == b + a), else one row of partials per column block, summed after
    gw_add = nvb <= 2
    gw = torch.zeros((1 if gw_add else nvb) if need_weights else 0, T * J, device=dev, dtype=torch.float32)
    if cfg["G16"] and values.dtype in LOW_PRECISION:
        grad_out = grad_out.to(values.dtype)
    if n_rows > 0 and v > 0 and (need_values or need_weights):
        rg = row_grad if rowmode else None
        _gather_bwd_kernel[(n_rows, nvb // vpp)](
            values,
            grad_out,
            weights,
            perm,
            offsets,
            rows if rows is not None else offsets,
            gv,
            gw,
            sorted_keys if by_entry else offsets,
            rg.touched if rg else offsets,
            rg.sumsq if rg else offsets,
            n_rows,
            v,
            values.stride(0),
            grad_out.stride(0),
            T * J,
            J=J,
            BLOCK_V=cfg["BLOCK_V"],
            E=cfg["E"],
            SPARSE=rows is not None,
            NEED_GV=need_values,
            NEED_GW=need_weights,
            PREFETCH=cfg["PREFETCH"],
            POS=tl.int32 if T * J < 2**31 else tl.int64,  # entry positions (int32: fewer instructions)
            VPP=vpp,
            GW_ADD=gw_add,
            ROWMODE=rowmode,
            BY_ENTRY=by_entry,
            num_warps=cfg["num_warps"],
        )
    if rowmode:
        row_grad.added(T * J)
    grad_values = grad_weights = None
    if need_values and not rowmode:
        if sparse:
            grad_values = torch.sparse_coo_tensor(
                rows.to(torch.int64)[None], gv, (N, v), is_coalesced=True, check_invariants=False
            )
        else:
            grad_values = gv
    if need_weights:
        grad_weights = (gw[0] if gw.shape[0] == 1 else gw.sum(0)).reshape(T, J).to(weights.dtype)
    return grad_values, grad_weights


# ---- autograd -------------------------------------------------------------------------------------


@torch.library.custom_op("pkmem::weighted_gather", mutates_args=())
def _gather_op(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return gather_forward(values, indices, weights)


@_gather_op.register_fake
def _(values, indices, weights):
    return values.new_empty(indices.shape[0], values.shape[1], dtype=torch.float32)


@torch.library.custom_op("pkmem::weighted_gather_backward", mutates_args=())
def _gather_backward_op(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    need_values: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gv, gw = gather_backward(grad_out, values, indices, weights, need_values, need_weights)
    gv = gv if gv is not None else values.new_empty(0)
    gw = gw if gw is not None else weights.new_empty(0)
    return gv, gw


@_gather_backward_op.register_fake
def _(grad_out, values, indices, weights, need_values, need_weights):
    # contiguous, as gather_backward writes them (empty_like would keep a strided input's strides)
    gv = values.new_empty(values.shape) if need_values else values.new_empty(0)
    gw = weights.new_empty(weights.shape) if need_weights else weights.new_empty(0)
    return gv, gw


def _setup_context(ctx, inputs, output):
    values, indices, weights = inputs
    ctx.save_for_backward(values, indices, weights)


def _backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_out is None or not (need_v or need_w):
        return None, None, None
    gv, gw = _gather_backward_op(grad_out, values, indices, weights, need_v, need_w)
    return (gv if need_v else None), None, (gw if need_w else None)


_gather_op.register_autograd(_backward, setup_context=_setup_context)


class _WeightedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse, row_grad=None):
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse, ctx.row_grad = sparse, row_grad
        return gather_forward(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if grad_out is None or not (need_v or need_w):
            return None, None, None, None, None
        rg = ctx.row_grad if ctx.row_grad is not None and ctx.row_grad.active else None
        gv, gw = gather_backward(grad_out, values, indices, weights, need_v, need_w, ctx.sparse, row_grad=rg)
        return gv, None, gw, None, None


def _row_gather(values, indices, weights, sparse: bool, rg: RowGrad) -> torch.Tensor:
    """The gather of a table owned by a row optimizer: the backward writes into its RowGrad."""
    if rg.before_read is not None:
        rg.before_read(values, indices)
    if torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad):
        return _WeightedGather.apply(values, indices, weights, sparse, rg if values.requires_grad else None)
    return gather_forward(values, indices, weights)


_row_gather_eager = torch.compiler.disable(_row_gather)  # under torch.compile: a graph break


def weighted_gather(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Fused weighted gather: see :func:`pkmem.ops.reference.weighted_gather` (a table owned by a
    row optimizer gets its gradient rows written into the optimizer's RowGrad)."""
    _check_inputs(values, indices, weights)
    rg = active_row_grad(values)
    if rg is not None:
        if torch.compiler.is_compiling():
            return _row_gather_eager(values, indices, weights, sparse, rg)
        return _row_gather(values, indices, weights, sparse, rg)
    if torch.compiler.is_compiling() and not sparse:
        return _gather_op(values, indices, weights)
    if torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad):
        return _WeightedGather.apply(values, indices, weights, sparse)
    return gather_forward(values, indices, weights)  # nothing to differentiate: no autograd node
