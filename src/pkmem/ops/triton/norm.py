"""BatchNorm over the (masked) rows of ``x (T, C)`` (Triton), forward and backward.

Twin of :func:`pkmem.ops.reference.batch_norm`. ``x`` is read in its own dtype (float32, bfloat16,
float16) and computed on in float32; the output and the gradient of ``x`` are written in ``x``'s
dtype: no casts around the op. The grid is (row chunk of ROWS rows, column block of BC columns);
a program walks its chunk BR rows at a time.

Forward, training (two launches, ``x`` read twice, ``y`` written once):

1. ``_bn_stats_kernel``: per (chunk, column block) the count, mean and M2 (sum of squared
   deviations) of the real rows, in one pass of elementwise sums of ``d = x - shift`` and ``d*d``
   (``shift``: the mean of the chunk's first tile, so a large mean costs no precision; reduced
   across rows once, at the end). Rows outside the mask are never loaded (NaN / inf there cannot
   reach the statistics).
2. ``_bn_norm_kernel``: each program merges all chunks' partials for its columns (NCB chunks at
   a time: two passes over the tile, then Chan's formula), in the same fixed order in every
   program (deterministic, no atomics: all programs get the same mean and variance), then
   normalises its rows: ``y = (x - mean) * rsqrt(var + eps) * weight + bias`` for ALL rows. The
   programs of chunk 0 store the mean and the biased variance.

In eval the second kernel alone runs on the running statistics (one launch).

Backward (``dx = weight * rstd * (dy - m_t / n * (S1 + xhat * S2))``, with ``S1 = sum dy`` and
``S2 = sum dy * xhat`` over ALL rows, ``m_t`` the mask, ``n = max(#real rows, 1)``): one launch
for the partial column sums per chunk (``dy`` and ``x`` read once), one to merge them and write
``dx`` (``dy`` and ``x`` read again); ``dweight = S2``, ``dbias = S1``. In eval ``dx = weight *
rstd * dy`` needs no sums (one launch when no parameter needs a gradient).
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from pkmem.ops.reference import LOW_PRECISION, check_batch_norm, real_rows, update_running_stats
from pkmem.ops.triton._common import DeviceInfo, cdiv, device_info, new_output, next_pow2, to_output

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two sets' (count, mean, M2); a set may be empty (count 0, mean 0)."""
    n = n_a + n_b
    f = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * f, m2_a + m2_b + delta * delta * (n_a * f)


@triton.jit
def _real_tile(X, MASK, rows, cols, cm, T, stride_x, HAS_MASK: tl.constexpr):
    """The tile ``x[rows, cols]`` in float32 (0 outside the real rows), the real rows, the mask."""
    real = rows < T
    if HAS_MASK:
        real = real & (tl.load(MASK + rows, mask=real, other=0) != 0)
    ok = real[:, None] & cm[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    return x.to(tl.float32), real, ok


@triton.jit
def _chunk_stats(
    X, MASK, SHIFT, chunk, cols, cm, T, stride_x,
    ROWS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHIFT: tl.constexpr,
):  # fmt: skip
    """Count, mean and M2 of the real rows of ``x + shift`` in rows [chunk * ROWS, (chunk + 1) * ROWS)."""
    sh = tl.zeros((BC,), tl.float32)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + cols, mask=cm, other=0.0).to(tl.float32)
    # pivot: the mean of the chunk's first tile with real rows (leading all-padding tiles are
    # skipped), so that the sums of squared shifted values below lose no precision to a large
    # mean; then one pass of elementwise sums (no reduction in the loop: x streams through once)
    pivot = tl.zeros((BC,), tl.float32)
    found = tl.zeros((), tl.float32)
    r0 = 0
    while (found == 0) & (r0 < ROWS):
        x0, real, ok = _real_tile(
            X, MASK, chunk * ROWS + r0 + tl.arange(0, BR), cols, cm, T, stride_x, HAS_MASK
        )
        found = tl.sum(real.to(tl.float32), axis=0)
        pivot = tl.sum(tl.where(ok, x0 + sh[None, :], 0.0), axis=0) / tl.maximum(found, 1.0)
        r0 += BR
    s1 = tl.zeros((BR, BC), tl.float32)
    s2 = tl.zeros((BR, BC), tl.float32)
    cnt = tl.zeros((BR,), tl.float32)
    for r0 in range(0, ROWS, BR):
        x, real, ok = _real_tile(
            X, MASK, chunk * ROWS + r0 + tl.arange(0, BR), cols, cm, T, stride_x, HAS_MASK
        )
        d = tl.where(ok, x + sh[None, :] - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
        cnt += real.to(tl.float32)
    n_a = tl.sum(cnt, axis=0)
    d1 = tl.sum(s1, axis=0)
    mean_a = pivot + d1 / tl.maximum(n_a, 1.0)
    m2_a = tl.maximum(tl.sum(s2, axis=0) - d1 * d1 / tl.maximum(n_a, 1.0), 0.0)
    return n_a, mean_a, m2_a


@triton.jit
def _bn_stats_kernel(
    X,
    MASK,
    SHIFT,
    PCNT,
    PMEAN,
    PM2,
    T,
    C,
    stride_x,
    ROWS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    n_a, mean_a, m2_a = _chunk_stats(
        X, MASK, SHIFT, chunk, cols, cm, T, stride_x, ROWS, BR, BC, HAS_MASK, HAS_SHIFT
    )
    out = chunk.to(tl.int64) * C + cols
    tl.store(PMEAN + out, mean_a, mask=cm)
    tl.store(PM2 + out, m2_a, mask=cm)
    tl.store(PCNT + chunk, n_a, mask=cb == 0)


@triton.jit
def _merge_stats(PCNT, PMEAN, PM2, n_chunks, C, cols, cm, BC: tl.constexpr, NCB: tl.constexpr):
    """Mean and biased variance of the columns ``cols`` from the partials of ``n_chunks`` chunks:
    NCB chunks at a time (weighted mean, then M2 plus the squared deviations of the chunk means),
    merged in chunk order with Chan's formula."""
    n_a = tl.zeros((), tl.float32)
    mean_a = tl.zeros((BC,), tl.float32)
    m2_a = tl.zeros((BC,), tl.float32)
    for c0 in range(0, n_chunks, NCB):
        ch = c0 + tl.arange(0, NCB)
        chm = ch < n_chunks
        ok = chm[:, None] & cm[None, :]
        cnt = tl.load(PCNT + ch, mask=chm, other=0.0)
        offs = ch.to(tl.int64)[:, None] * C + cols[None, :]
        pm = tl.load(PMEAN + offs, mask=ok, other=0.0)
        pq = tl.load(PM2 + offs, mask=ok, other=0.0)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(pm * cnt[:, None], axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(ok & (cnt[:, None] > 0), pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pq + d * d * cnt[:, None], axis=0)
        n_a, mean_a, m2_a = _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return n_a, mean_a, m2_a / tl.maximum(n_a, 1.0)


@triton.jit
def _bn_norm_kernel(
    X,
    SHIFT,
    PCNT,
    PMEAN,
    PM2,
    RMEAN,
    RVAR,
    W,
    B,
    Y,
    MEAN,
    VAR,
    T,
    C,
    n_chunks,
    stride_x,
    eps,
    momentum,
    MASK,
    ROWS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    NCB: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Normalises the chunk's rows; in training from the statistics merged from all chunks'
    partials, or with ``ONE_CHUNK`` (all rows in one chunk: small batches) from the statistics it
    computes itself (one launch instead of two)."""
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    if TRAINING and ONE_CHUNK:
        n, mean, m2 = _chunk_stats(
            X, MASK, SHIFT, 0, cols, cm, T, stride_x, ROWS, BR, BC, HAS_MASK, HAS_SHIFT
        )
        var = m2 / tl.maximum(n, 1.0)
    elif TRAINING:
        n, mean, var = _merge_stats(PCNT, PMEAN, PM2, n_chunks, C, cols, cm, BC, NCB)
    else:
        mean = tl.load(RMEAN + cols, mask=cm, other=0.0).to(tl.float32)
        var = tl.load(RVAR + cols, mask=cm, other=1.0).to(tl.float32)
    first = cm & (chunk + 0 * cols == 0)
    tl.store(MEAN + cols, mean, mask=first)
    tl.store(VAR + cols, var, mask=first)
    if UPDATE:  # the running statistics (torch's rule, unbiased variance; untouched without real rows)
        f = tl.where(n > 0, momentum, 0.0)
        rm = tl.load(RMEAN + cols, mask=first, other=0.0).to(tl.float32)
        rv = tl.load(RVAR + cols, mask=first, other=0.0).to(tl.float32)
        tl.store(RMEAN + cols, rm + (mean - rm) * f, mask=first)
        tl.store(RVAR + cols, rv + (var * (n / tl.maximum(n - 1.0, 1.0)) - rv) * f, mask=first)
    rstd = tl.rsqrt(var + eps)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
    for r0 in range(0, ROWS, BR):
        rows = (chunk * ROWS + r0 + tl.arange(0, BR)).to(tl.int64)
        ok = (rows < T)[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = x + sh[None, :]
        y = (x - mean[None, :]) * rstd[None, :]
        if HAS_W:
            y = y * w[None, :]
        if HAS_B:
            y = y + b[None, :]
        tl.store(Y + rows[:, None] * C + cols[None, :], to_output(y, Y), mask=ok)


@triton.jit
def _centre_and_rstd(MEAN, VAR, SHIFT, cols, cm, eps, HAS_SHIFT: tl.constexpr):
    """The backward's centre (``mean - shift``: xhat = (x - centre) * rstd for x + shift) and rstd."""
    mean = tl.load(MEAN + cols, mask=cm, other=0.0)
    if HAS_SHIFT:
        mean = mean - tl.load(SHIFT + cols, mask=cm, other=0.0).to(tl.float32)
    return mean, tl.rsqrt(tl.load(VAR + cols, mask=cm, other=1.0) + eps)


@triton.jit
def _chunk_sums(
    DY, X, MASK, mean, rstd, chunk, cols, cm, T, stride_dy, stride_x,
    ROWS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``sum dy``, ``sum dy * xhat`` (BC,) over the chunk's rows (all of them) and its number of real rows."""
    s1 = tl.zeros((BR, BC), tl.float32)
    s2 = tl.zeros((BR, BC), tl.float32)
    cnt = tl.zeros((BR,), tl.float32)
    for r0 in range(0, ROWS, BR):
        rows = chunk * ROWS + r0 + tl.arange(0, BR)
        inside = rows < T
        if HAS_MASK:
            cnt += (inside & (tl.load(MASK + rows, mask=inside, other=0) != 0)).to(tl.float32)
        else:
            cnt += inside.to(tl.float32)
        ok = inside[:, None] & cm[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s1 += dy
        s2 += dy * ((x - mean[None, :]) * rstd[None, :])
    return tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(cnt, axis=0)


@triton.jit
def _bn_bwd_sums_kernel(
    DY,
    X,
    SHIFT,
    MASK,
    MEAN,
    VAR,
    PCNT,
    P1,
    P2,
    T,
    C,
    stride_dy,
    stride_x,
    eps,
    ROWS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """Per (chunk, column block): ``sum dy``, ``sum dy * xhat`` over the chunk's rows (all of
    them) and the chunk's number of real rows."""
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    mean, rstd = _centre_and_rstd(MEAN, VAR, SHIFT, cols, cm, eps, HAS_SHIFT)
    s1, s2, n = _chunk_sums(
        DY, X, MASK, mean, rstd, chunk, cols, cm, T, stride_dy, stride_x, ROWS, BR, BC, HAS_MASK
    )
    out = chunk.to(tl.int64) * C + cols
    tl.store(P1 + out, s1, mask=cm)
    tl.store(P2 + out, s2, mask=cm)
    tl.store(PCNT + chunk, n, mask=cb == 0)


@triton.jit
def _bn_bwd_dx_kernel(
    DY,
    X,
    SHIFT,
    MASK,
    MEAN,
    VAR,
    W,
    PCNT,
    P1,
    P2,
    DX,
    DW,
    DB,
    DSHIFT,
    T,
    C,
    n_chunks,
    stride_dy,
    stride_x,
    eps,
    ROWS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    NCB: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    SUMS: tl.constexpr,
    NEED_DX: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    NEED_SHIFT: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """Merges the partial sums (when ``SUMS``: chunk 0 stores ``dweight``, ``dbias``), or with
    ``ONE_CHUNK`` (all rows in one chunk: small batches) computes them itself (one launch instead
    of two), and writes ``dx`` for the chunk's rows (when ``NEED_DX``)."""
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    mean, rstd = _centre_and_rstd(MEAN, VAR, SHIFT, cols, cm, eps, HAS_SHIFT)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    if SUMS and ONE_CHUNK:
        s1, s2, n = _chunk_sums(
            DY, X, MASK, mean, rstd, 0, cols, cm, T, stride_dy, stride_x, ROWS, BR, BC, HAS_MASK
        )
    elif SUMS:
        s1 = tl.zeros((BC,), tl.float32)
        s2 = tl.zeros((BC,), tl.float32)
        n = tl.zeros((), tl.float32)
        for c0 in range(0, n_chunks, NCB):
            ch = c0 + tl.arange(0, NCB)
            chm = ch < n_chunks
            offs = ch.to(tl.int64)[:, None] * C + cols[None, :]
            ok = chm[:, None] & cm[None, :]
            s1 += tl.sum(tl.load(P1 + offs, mask=ok, other=0.0), axis=0)
            s2 += tl.sum(tl.load(P2 + offs, mask=ok, other=0.0), axis=0)
            n += tl.sum(tl.load(PCNT + ch, mask=chm, other=0.0), axis=0)
    if SUMS:
        tl.store(DW + cols, s2, mask=cm & (chunk + 0 * cols == 0))
        tl.store(DB + cols, s1, mask=cm & (chunk + 0 * cols == 0))
        inv_n = 1.0 / tl.maximum(n, 1.0)
        if NEED_SHIFT:  # sum over rows of dx: 0 in training with real rows (exactly, analytically)
            if TRAINING:
                dsh = tl.where(n > 0, 0.0, scale * s1)
            else:
                dsh = scale * s1
            tl.store(DSHIFT + cols, dsh, mask=cm & (chunk + 0 * cols == 0))
    if NEED_DX:
        for r0 in range(0, ROWS, BR):
            rows = chunk * ROWS + r0 + tl.arange(0, BR)
            inside = rows < T
            ok = inside[:, None] & cm[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if TRAINING:
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                xhat = (x - mean[None, :]) * rstd[None, :]
                corr = (s1[None, :] + xhat * s2[None, :]) * inv_n
                if HAS_MASK:
                    real = tl.load(MASK + rows, mask=inside, other=0) != 0
                    corr = tl.where(real[:, None], corr, 0.0)
                dy = dy - corr
            tl.store(DX + rows64 * C + cols[None, :], to_output(dy * scale[None, :], DX), mask=ok)


# ---- launchers ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _config(T: int, C: int, dev: DeviceInfo) -> MappingProxyType:
    """Block sizes for x (T, C) on ``dev``: 128 columns per program; row chunks of 512 rows where
    that still gives 1.9 programs per SM (256 on an H200), else 256 (more for long inputs, so that
    a program merges at most 64 chunks' partials); at most T rows (one chunk, one launch, for small
    batches). Measured on one H200 in CUDA graphs at T 8192, C 2048 (16 x 16 programs): forward +
    backward 0.057 + 0.072 ms vs 0.058 + 0.081 with 256 rows, 0.059 + 0.087 with 64 columns
    (``benchmarks/kernels.py``, ``benchmarks/results/kernels-h200.json``, commit f869288). Cached:
    read-only."""
    bc = min(128, max(16, next_pow2(C)))
    br = 32
    rows = 512 if cdiv(T, 512) * cdiv(C, bc) >= 1.9 * dev.sms else 256
    while cdiv(T, rows) > 64:
        rows *= 2
    rows = max(br, min(rows, next_pow2(T)))
    return MappingProxyType({"ROWS": rows, "BR": br, "BC": bc, "NCB": 64, "num_warps": 4, "ONE_CHUNK": True})


def _y_dtype(x: torch.Tensor) -> torch.dtype:
    """The output's dtype: x's if 16-bit (as torch's BatchNorm), else float32."""
    return x.dtype if x.dtype in LOW_PRECISION else torch.float32


def _prepare(x: torch.Tensor, mask: torch.Tensor | None):
    if x.stride(-1) != 1:
        x = x.contiguous()
    if mask is not None:
        mask = mask.reshape(-1).contiguous().view(torch.uint8)
    return x, mask


def _unit_stride(*vectors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The (C,) vectors (weight, bias, statistics) as the kernels read them: contiguous."""
    return [None if t is None else t.contiguous() for t in vectors]


def _sizes(T: int, C: int, device: torch.device, config: dict | None) -> tuple[dict, int, int, int, bool]:
    """``(config, chunks, column blocks, chunks merged at a time, one launch)``; a ``config`` given
    by hand (benchmarks) is merged over the default and checked."""
    cfg = _config(T, C, device_info(device))
    if config:
        cfg = dict(cfg, **config)
        for name in ("ROWS", "BR", "BC", "NCB"):
            v = cfg[name]
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"config {name}={v!r} is not allowed: {name} must be a power of two")
        if cfg["ROWS"] < cfg["BR"]:
            raise ValueError(f"config ROWS={cfg['ROWS']} is not allowed: ROWS must be >= BR={cfg['BR']}")
    n_chunks = max(1, cdiv(T, cfg["ROWS"]))
    ncb = min(cfg["NCB"], next_pow2(n_chunks))
    # all rows in one chunk: the statistics (the backward's sums) computed in the normalising
    # (dx) kernel itself: one launch instead of two (ONE_CHUNK=False: two, for tests and benchmarks)
    one = n_chunks == 1 and bool(cfg["ONE_CHUNK"])
    return cfg, n_chunks, cdiv(C, cfg["BC"]), ncb, one


def batch_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
    training: bool,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = None,
    shift: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y (T, C), mean (C,), var (C,))`` of ``x + shift``, float32 (``y`` in x's dtype if that
    is 16-bit: the store rounds the float32 result): batch statistics of the real
    rows in training (biased variance), copies of the running statistics in eval. With a
    ``momentum`` (training), the normalising kernel also updates the running statistics in place."""
    check_batch_norm(x, weight, bias, mask, training, running_mean, running_var, momentum, shift)
    return _forward(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift, config)


def _forward(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift, config=None):
    """:func:`batch_norm_forward` on checked arguments."""
    update = training and momentum is not None
    if update and not (running_mean.is_contiguous() and running_var.is_contiguous()):
        y, mean, var = _forward(x, weight, bias, mask, eps, training, None, None, None, shift, config)
        update_running_stats(running_mean, running_var, mean, var, real_rows(x, mask), momentum)
        return y, mean, var
    T, C = x.shape
    dev = x.device
    x, m = _prepare(x, mask)
    weight, bias, running_mean, running_var, shift = _unit_stride(
        weight, bias, running_mean, running_var, shift
    )
    y = new_output(T, C, device=dev, dtype=_y_dtype(x))
    mean = new_output(C, device=dev, dtype=torch.float32)
    var = new_output(C, device=dev, dtype=torch.float32)
    if C == 0:
        return y, mean, var
    cfg, n_chunks, n_cb, ncb, one = _sizes(T, C, dev, config)
    if training and not one:
        pcnt = new_output(n_chunks, device=dev, dtype=torch.float32)
        pmean = new_output(n_chunks, C, device=dev, dtype=torch.float32)
        pm2 = new_output(n_chunks, C, device=dev, dtype=torch.float32)
        _bn_stats_kernel[(n_chunks, n_cb)](
            x,
            m if m is not None else x,
            shift if shift is not None else x,
            pcnt,
            pmean,
            pm2,
            T,
            C,
            x.stride(0),
            ROWS=cfg["ROWS"],
            BR=cfg["BR"],
            BC=cfg["BC"],
            HAS_MASK=m is not None,
            HAS_SHIFT=shift is not None,
            num_warps=cfg["num_warps"],
        )
    else:
        pcnt = pmean = pm2 = mean  # unused
    _bn_norm_kernel[(n_chunks, n_cb)](
        x,
        shift if shift is not None else x,
        pcnt,
        pmean,
        pm2,
        running_mean if not training or update else mean,
        running_var if not training or update else var,
        weight if weight is not None else mean,
        bias if bias is not None else mean,
        y,
        mean,
        var,
        T,
        C,
        n_chunks,
        x.stride(0),
        float(eps),
        float(momentum or 0.0),
        m if m is not None else x,
        ROWS=cfg["ROWS"],
        BR=cfg["BR"],
        BC=cfg["BC"],
        NCB=ncb,
        TRAINING=bool(training),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        UPDATE=update,
        HAS_SHIFT=shift is not None,
        ONE_CHUNK=one,
        HAS_MASK=m is not None,
        num_warps=cfg["num_warps"],
    )
    return y, mean, var


def batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    training: bool,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    shift: torch.Tensor | None = None,
    need_shift: bool = False,
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x`` (in x's dtype), ``weight``, ``bias`` and ``shift`` (float32), from the
    forward's float32 ``mean`` and ``var``. The shift's gradient (the sum of dx over the rows) is
    computed in closed form: 0 in training with real rows (the batch mean absorbs the shift),
    ``sum(dy) * weight * rstd`` in eval or without real rows."""
    T, C = x.shape
    dev = x.device
    x, m = _prepare(x, mask)
    weight, mean, var, shift = _unit_stride(weight, mean, var, shift)
    need_shift = need_shift and shift is not None
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    sums = need_weight or need_bias or need_shift or (training and need_x)
    dx = new_output(T if need_x else 0, C, device=dev, dtype=x.dtype)
    dw = new_output(C if sums else 0, device=dev, dtype=torch.float32)
    db = new_output(C if sums else 0, device=dev, dtype=torch.float32)
    dsh = new_output(C if need_shift else 0, device=dev, dtype=torch.float32)
    if C > 0 and (sums or need_x):
        cfg, n_chunks, n_cb, ncb, one = _sizes(T, C, dev, config)
        if sums and not one:
            pcnt = new_output(n_chunks, device=dev, dtype=torch.float32)
            p1 = new_output(n_chunks, C, device=dev, dtype=torch.float32)
            p2 = new_output(n_chunks, C, device=dev, dtype=torch.float32)
            _bn_bwd_sums_kernel[(n_chunks, n_cb)](
                grad_out,
                x,
                shift if shift is not None else x,
                m if m is not None else x,
                mean,
                var,
                pcnt,
                p1,
                p2,
                T,
                C,
                grad_out.stride(0),
                x.stride(0),
                float(eps),
                ROWS=cfg["ROWS"],
                BR=cfg["BR"],
                BC=cfg["BC"],
                HAS_MASK=m is not None,
                HAS_SHIFT=shift is not None,
                num_warps=cfg["num_warps"],
            )
        else:
            pcnt = p1 = p2 = mean  # unused
        _bn_bwd_dx_kernel[(n_chunks if need_x else 1, n_cb)](
            grad_out,
            x,
            shift if shift is not None else x,
            m if m is not None else x,
            mean,
            var,
            weight if weight is not None else mean,
            pcnt,
            p1,
            p2,
            dx,
            dw,
            db,
            dsh,
            T,
            C,
            n_chunks,
            grad_out.stride(0),
            x.stride(0),
            float(eps),
            ROWS=cfg["ROWS"],
            BR=cfg["BR"],
            BC=cfg["BC"],
            NCB=ncb,
            TRAINING=bool(training),
            HAS_MASK=m is not None,
            HAS_W=weight is not None,
            SUMS=sums,
            NEED_DX=need_x,
            HAS_SHIFT=shift is not None,
            NEED_SHIFT=need_shift,
            ONE_CHUNK=one,
            num_warps=cfg["num_warps"],
        )
    return (
        (dx if need_x else None),
        (dw if need_weight else None),
        (db if need_bias else None),
        (dsh if need_shift else None),
    )


# ---- autograd: one torch.autograd.Function, eager and compiled ---------------------------------------
#
# Eagerly the Function calls the launchers itself; under torch.compile it calls the two custom ops
# below instead (opaque to the compiler, with fake implementations), traced with the Function's own
# backward (see pkmem.ops.triton.search). The compiled forward is functional: the running
# statistics are then updated by traced ops after it (batch_norm below).

# torch.compile traces the branch that calls the custom ops (tests patch this to run it eagerly)
_compiling = torch.compiler.is_compiling


@torch.library.custom_op("pkmem::batch_norm", mutates_args=())
def _bn_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
    training: bool,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, mask, eps, training, running_mean, running_var, None, shift)


@_bn_op.register_fake
def _(x, weight, bias, mask, eps, training, running_mean, running_var, shift):
    C = x.shape[1]
    return (
        x.new_empty(x.shape, dtype=_y_dtype(x)),
        x.new_empty(C, dtype=torch.float32),
        x.new_empty(C, dtype=torch.float32),
    )


@torch.library.custom_op("pkmem::batch_norm_backward", mutates_args=())
def _bn_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    training: bool,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    shift: torch.Tensor | None,
    need_shift: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = batch_norm_backward(
        grad_out, x, weight, mask, mean, var, eps, training, need_x, need_weight, need_bias,
        shift=shift, need_shift=need_shift,
    )  # fmt: skip
    # one empty tensor per missing gradient: a custom op's outputs must not alias each other
    return tuple(g if g is not None else e.new_empty(0) for g, e in zip(grads, (x, mean, mean, mean)))


@_bn_backward_op.register_fake
def _(grad_out, x, weight, mask, mean, var, eps, training, need_x, need_weight, need_bias, shift, need_shift):
    C = x.shape[1]
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),  # contiguous, like the kernel's dx
        mean.new_empty(C if need_weight else 0),
        mean.new_empty(C if need_bias else 0),
        mean.new_empty(C if need_shift and shift is not None else 0),
    )


def _bn_forward(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift):
    if _compiling():  # functional: the caller updates the running statistics
        return _bn_op(x, weight, bias, mask, eps, training, running_mean, running_var, shift)
    return _forward(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift):
        args = (x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)
        y, mean, var = _bn_forward(*args)
        ctx.save_for_backward(x, weight, bias, mask, mean, var, shift)
        ctx.eps, ctx.training = eps, training
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, mask, mean, var, shift = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_s = ctx.needs_input_grad[9]
        if grad_out is None or not (need_x or need_w or need_b or need_s):
            return (None,) * 10
        args = (grad_out, x, weight, mask, mean, var, ctx.eps, ctx.training, need_x, need_w, need_b)
        if _compiling():
            dx, dw, db, ds = _bn_backward_op(*args, shift, need_s)
        else:
            dx, dw, db, ds = batch_norm_backward(*args, shift=shift, need_shift=need_s)
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None,
            ds.to(shift.dtype) if need_s else None,
        )  # fmt: skip


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
    training: bool,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_norm` on checked arguments: the op itself."""
    args = (x, weight, bias, mask, float(eps), bool(training), running_mean, running_var, momentum, shift)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, shift)):
        y, mean, var = _BatchNorm.apply(*args)
    else:  # nothing to differentiate: the forward alone (no autograd node)
        y, mean, var = _bn_forward(*args)
    if _compiling() and training and momentum is not None:  # traced ops
        update_running_stats(running_mean, running_var, mean, var, real_rows(x, mask), momentum)
    return y, mean, var


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
    training: bool,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused BatchNorm: see :func:`pkmem.ops.reference.batch_norm` (``mean`` and ``var`` are not
    differentiable)."""
    check_batch_norm(x, weight, bias, mask, training, running_mean, running_var, momentum, shift)
    return normalize(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)
