"""Row-wise Adam(W) over a value table (Triton): twin of :func:`pkmem.ops.rows.row_adam_reference`.

One program per row (all its columns, ``BLOCK_V`` at a time): it reads the row's gradient (times
the pending clipping scale), parameter and float32 moments once, and writes them once; nothing else
of the table is touched. Rows come from the :class:`~pkmem.ops.rows.RowGrad`'s list
(``rows[:count]`` from :meth:`~pkmem.ops.rows.RowGrad.compact`: the grid is the host's upper
bound, programs past ``count`` do nothing), from
``(N,)`` flags, or are all rows. Exact mode: each program first applies the zero-gradient steps
its row missed, ``last[row] + 1 ..``, in registers, with the coefficients ``hist[k]`` of those
steps (no memory traffic but the row's own), then writes ``last[row]``. One program per row: no
two programs touch one row, and no float atomics: the same inputs give the same bits.

The step count and the step's coefficients are read from device memory (``STEP``, ``COEF``: the
optimizer's step count lives on the device, as fused AdamW's does), and so is the skip flag
(``FOUND_INF``, as ``torch.amp.GradScaler`` sets it): a skipped step clears the rows' ``touched``
flags and writes nothing else. No host sync.

16-bit tables: the new value is computed in float32 and rounded stochastically (random 16 bits from
``tl.randint(seed + step * c, row * v + column)`` added below the bfloat16 mantissa, then
truncated: unbiased) or to nearest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pkmem.ops.rows import RowGrad, device_step_coefficients, step_coefficients
from pkmem.ops.triton._common import next_pow2, to_output

__all__ = ["row_adam_update"]


@triton.jit
def _round_out(x, P, offs, seed, SR: tl.constexpr):
    """``x`` (float32) in P's element type: stochastically (SR, bfloat16) or to nearest."""
    if SR:
        bits = x.to(tl.int32, bitcast=True)
        noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        sr = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
        finite = (bits & 0x7F800000) != 0x7F800000
        x = tl.where(finite, sr, x)
        return x.to(P.dtype.element_ty)
    return to_output(x, P)


@triton.jit
def _row_adam_kernel(
    P,
    M1,
    M2,
    GD,
    TOUCHED,
    ROWS,
    COUNT,
    SCALE,
    LAST,
    HIST,
    FLAGS,
    STEP,
    COEF,
    FOUND_INF,
    n_rows,
    v_dim,
    stride_p,
    stride_g,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    seed,
    BLOCK_V: tl.constexpr,
    NVB: tl.constexpr,
    SOURCE: tl.constexpr,  # 0: ROWS[:COUNT]; 1: every row; 2: rows whose FLAGS are set (cleared)
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    EXACT: tl.constexpr,
    SR: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    r = tl.program_id(0)
    step = tl.load(STEP).to(tl.int32)  # the step count (float32, as fused AdamW keeps it)
    seed = seed + step.to(tl.int64) * 0x5851F42D4C957F2D  # each step its own random bits
    if SOURCE == 0:
        active = r < tl.load(COUNT)
        row = tl.load(ROWS + r, mask=active, other=0).to(tl.int64)
    elif SOURCE == 1:
        active = r < n_rows
        row = r.to(tl.int64)
    else:
        active = tl.load(FLAGS + r) != 0
        tl.store(FLAGS + r, 0, mask=active)
        row = r.to(tl.int64)
    if HAS_GRAD:
        step_size = tl.load(COEF)
        bc2_sqrt = tl.load(COEF + 1)
        decay = tl.load(COEF + 2)
        if SOURCE == 0:  # the rows' gradient is consumed, whether the step is taken or not
            tl.store(TOUCHED + row, 0, mask=active)
    write_hist = r == 0  # one program writes this step's coefficients (exact mode)
    if HAS_FLAG:  # a step flagged by FOUND_INF changes nothing else
        take = tl.load(FOUND_INF) == 0
        active = active & take
        write_hist = write_hist & take
    first = step  # the first missed step (exact mode); stop: one past the last step to apply with g = 0
    stop = step
    if EXACT:
        last = tl.load(LAST + row, mask=active, other=0)
        if HAS_GRAD:
            stop = step
        else:
            stop = step + 1
        first = tl.where(active, last + 1, stop)
        if not HAS_GRAD:
            active = active & (first < stop)
        if HAS_GRAD:
            if write_hist:  # this step's coefficients, for the rows that miss it (read by later calls)
                tl.store(HIST + 3 * step, step_size)
                tl.store(HIST + 3 * step + 1, bc2_sqrt)
                tl.store(HIST + 3 * step + 2, decay)
    if HAS_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(SCALE).to(tl.float32)
    for vb in tl.static_range(NVB):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = cols < tl.where(active, v_dim, 0)  # (a scalar in `&` gives int32 masks in the interpreter)
        p_ptr = P + row * stride_p + cols
        m_off = row * v_dim + cols
        p = tl.load(p_ptr, mask=cm, other=0.0).to(tl.float32)
        m = tl.load(M1 + m_off, mask=cm, other=0.0)
        s = tl.load(M2 + m_off, mask=cm, other=0.0)
        if EXACT:
            for k in range(first, stop):  # missed steps: zero gradient, step k's coefficients
                k_step_size = tl.load(HIST + 3 * k)
                k_bc2_sqrt = tl.load(HIST + 3 * k + 1)
                k_decay = tl.load(HIST + 3 * k + 2)
                p = p * k_decay
                m = m + one_minus_beta1 * (0.0 - m)
                s = s * beta2
                p = p - k_step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(s), k_bc2_sqrt) + eps)
        if HAS_GRAD:
            g = tl.load(GD + row * stride_g + cols, mask=cm, other=0.0).to(tl.float32) * scale
            p = p * decay
            m = m + one_minus_beta1 * (g - m)
            s = s * beta2 + one_minus_beta2 * g * g
            p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(s), bc2_sqrt) + eps)
        tl.store(p_ptr, _round_out(p, P, m_off, seed, SR), mask=cm)
        tl.store(M1 + m_off, m, mask=cm)
        tl.store(M2 + m_off, s, mask=cm)
    if EXACT:
        tl.store(LAST + row, step, mask=active)


def _config(v: int) -> dict:
    # one program per row, all its columns; 4 warps for 512 columns and more (enough bytes in
    # flight per SM for a bandwidth-bound update), fewer for narrow rows
    bv = min(next_pow2(max(v, 1)), 1024)
    return {"BLOCK_V": bv, "num_warps": max(1, min(4, bv // 128))}


def row_adam_update(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: RowGrad | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    exact: bool = False,
    last: torch.Tensor | None = None,
    hist: torch.Tensor | None = None,
    rows="grad",
    stochastic_rounding: bool = True,
    seed: int = 0,
    config: dict | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """See :func:`pkmem.ops.rows.row_adam_update` (arguments checked there)."""
    N, v = param.shape
    if N == 0 or v == 0:
        return
    if param.stride(-1) != 1 or not exp_avg.is_contiguous() or not exp_avg_sq.is_contiguous():
        raise ValueError("row_adam_update needs a table with contiguous rows and contiguous moments")
    has_grad = isinstance(rows, str) and rows == "grad"
    dummy = exp_avg  # any pointer for the arguments a mode does not read
    if has_grad:
        source, grid = 0, max(1, grad.bound)
        rlist, count = grad.compact()
        gd, touched, scale = grad.grad, grad.touched, grad.scale
    else:
        source = 1 if isinstance(rows, str) else 2
        grid, gd, touched, rlist, count, scale = N, dummy, dummy, dummy, dummy, None
    flags = rows if source == 2 else dummy
    dev = param.device
    if isinstance(step, torch.Tensor):
        step_t = step
        coef = device_step_coefficients(step, lr, weight_decay, beta1, beta2) if has_grad else dummy
    else:  # an int step: filled on the device from the host's numbers (fills: no copy, no sync)
        step_t = torch.full((), float(step), dtype=torch.float32, device=dev)
        coef = dummy
        if has_grad:
            coef = torch.empty(3, dtype=torch.float32, device=dev)
            for i, x in enumerate(step_coefficients(lr, weight_decay, beta1, beta2, step)):
                coef[i].fill_(x)
    cfg = dict(_config(v), **(config or {}))
    sr = stochastic_rounding and param.dtype == torch.bfloat16
    _row_adam_kernel[(grid,)](
        param,
        exp_avg,
        exp_avg_sq,
        gd,
        touched,
        rlist,
        count,
        scale if scale is not None else dummy,
        last if exact else dummy,
        hist if exact else dummy,
        flags,
        step_t,
        coef,
        found_inf if found_inf is not None else dummy,
        N,
        v,
        param.stride(0),
        gd.stride(0) if has_grad else 0,
        float(1 - beta1),
        float(beta2),
        float(1 - beta2),
        float(eps),
        int(seed),
        BLOCK_V=cfg["BLOCK_V"],
        NVB=triton.cdiv(v, cfg["BLOCK_V"]),
        SOURCE=source,
        HAS_GRAD=has_grad,
        HAS_SCALE=scale is not None,
        EXACT=exact,
        SR=sr,
        HAS_FLAG=found_inf is not None and has_grad,
        num_warps=cfg["num_warps"],
    )
