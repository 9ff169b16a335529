"""Exact product-key search (Triton): queries and sub-keys in, the final top-k out.

Twin of :func:`pkmem.ops.reference.product_topk`. The half scores ``(H, 2, T, n)`` come from one
batched matrix product (cuBLAS; or, with ``FUSED``, from ``tl.dot`` inside the kernel into a
per-program scratch). One program then handles a block of tokens of one head; per query half it

1. takes the maxima of NG interleaved column groups: the KP-th largest of them is a threshold
   with at least KP scores above it (typically ~k + a few of the n scores pass);
2. compacts the scores above it into a small scratch row (prefix sum of the mask) and sorts those
   exactly (packed ``(score, position)`` int64 keys, bitonic ``tl.topk``); a row with more than
   CAP survivors sends its block to a streaming bitonic top-k over all n scores instead;

then forms only the ~k ln k candidate sums ``s1[i] + s2[j]`` with ``(i + 1)(j + 1) <= k`` of the
two sorted lists (which provably hold the final top-k) and selects the final top-k in registers:
the ``(T, H, k*k)`` candidates never reach memory.

Backward: the gradient of the k selected scores lands on at most k distinct sub-keys per half,
so per token the duplicates are summed in registers and stored (plain stores, deterministic) into
a dense ``(H, 2, T, n)`` buffer; two batched matrix products then give the query and the
sub-key gradients.

Precision of float32 products (float32 queries): torch's float32 matmul setting at each call, as
torch's own matmuls (``torch.set_float32_matmul_precision``): "highest" (torch's default) gives
exact float32 products ("ieee"), as the reference; "high" / "medium" give tf32 (tensor cores,
~1e-3 relative error on the half scores, so near-ties may be resolved differently than in float32;
faster). The functions here also take ``precision`` explicitly ("tf32", "ieee", or "tf32x3": about
float32 accuracy, for the fused kernel's tl.dot). A 16-bit query (the query network's output under
autocast) takes the sub-keys in its dtype: 16-bit operands with float32 sums and results, in both
backends; under CUDA autocast the backward's products take 16-bit operands too, whatever the
float32 setting (as torch's matmuls under autocast).
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from pkmem.ops.reference import LOW_PRECISION, bmm_fp32, candidate_pair_list, check_score
from pkmem.ops.triton._common import (
    INTERPRET,
    DeviceInfo,
    cdiv,
    check_precision,
    device_info,
    float32_precision,
    from_orderable,
    key_or_lowest,
    new_output,
    next_pow2,
    orderable,
    pack,
    round_to_tf32,
    tf32_operand,
    to_output,
    unpack_payload,
    unpack_score,
)

__all__ = [
    "product_lookup",
    "product_topk",
    "search_forward",
    "search_backward",
    "half_scores",
]


@functools.lru_cache(maxsize=64)
def _candidate_table(topk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Positions (i, j) with (i + 1)(j + 1) <= topk as one int32 tensor (2, C_PAD), and C."""
    pairs = candidate_pair_list(topk)
    c_pad = max(next_pow2(len(pairs)), next_pow2(topk), 2)
    table = torch.zeros(2, c_pad, dtype=torch.int32)
    table[:, : len(pairs)] = torch.tensor(pairs, dtype=torch.int32).T
    return table.to(device), len(pairs)


def prepare_search(topk: int, device: torch.device) -> None:
    """Make the cached tables the search reads for ``topk`` on ``device`` (before CUDA graphs)."""
    _candidate_table(topk, device)


@triton.jit
def _topk_iterative(x, KP: tl.constexpr):
    """Sorted top-KP of integer keys along the last axis by KP max-reductions (used under the
    interpreter, where tl.topk's bitonic network is very slow). Keys are unique except for the
    padding's lowest key, which may repeat (and then fills the remaining places)."""
    out = tl.zeros((x.shape[0], KP), x.dtype)
    cols = tl.arange(0, KP)
    lo = tl.min(x, axis=1)[:, None]  # (not lo - 1: that overflows when lo is the lowest key)
    taken = x < lo
    for r in tl.static_range(KP):
        m = tl.max(tl.where(taken, lo, x), axis=1)[:, None]
        out = tl.where(cols[None, :] == r, m, out)
        taken = taken | (x == m)
    return out


@triton.jit
def _topk(x, KP: tl.constexpr, TOPK: tl.constexpr):
    """Sorted (descending) top-KP of unique integer keys along the last axis."""
    if TOPK == 0:
        return tl.topk(x, KP)
    else:
        return _topk_iterative(x, KP)


@triton.jit
def _trunc_key(x, payload, M: tl.constexpr):
    """An int32 key ordered as float32 ``x`` except in its low log2(M) bits, which carry ``payload``
    (< M, a power of two): rounding toward -inf, so a threshold decoded from it is never too high."""
    o = orderable(x)
    return (o - (o & (M - 1))) | payload


@triton.jit
def _scores(
    q_base,
    stride_qt,
    k_base,
    s_base,
    s_stride,
    rows,
    row_mask,
    lrows,
    c0,
    n,
    D,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    FUSED: tl.constexpr,
    WRITE: tl.constexpr,
):
    """Half scores (BT, BN) of sub-keys [c0, c0 + BN), -inf past n: computed on the tensor cores
    (FUSED, written to the program's scratch when WRITE) or read from the precomputed buffer."""
    cols = c0 + tl.arange(0, BN)
    cmask = cols < n
    if FUSED and WRITE:
        acc = tl.zeros((BT, BN), tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dmask = dd < D
            q = tl.load(
                q_base + rows[:, None] * stride_qt + dd[None, :],
                mask=row_mask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            kt = tl.load(
                k_base + cols[None, :] * D + dd[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0
            ).to(tl.float32)
            q = tf32_operand(q, PRECISION)
            kt = tf32_operand(kt, PRECISION)
            acc = tl.dot(q, kt, acc, input_precision=PRECISION)
        acc = tl.where(cmask[None, :], acc, float("-inf"))
        tl.store(s_base + lrows[:, None] * s_stride + cols[None, :], acc)
    elif FUSED:
        acc = tl.load(s_base + lrows[:, None] * s_stride + cols[None, :], cache_modifier=".cg")
    else:
        acc = tl.load(
            s_base + lrows[:, None] * s_stride + cols[None, :],
            mask=row_mask[:, None] & cmask[None, :],
            other=float("-inf"),
        ).to(tl.float32)
    acc = tl.where(acc == acc, acc, float("inf"))  # NaN ranks first (as in torch.topk), as +inf
    return acc, cols, cmask


@triton.jit
def _half_select(
    q_base,
    stride_qt,
    k_base,
    s_base,
    s_stride,
    cv_base,
    cc_base,
    rows,
    row_mask,
    n,
    D,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    NG: tl.constexpr,
    CAP: tl.constexpr,
    BNS: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPK: tl.constexpr,
    FUSED: tl.constexpr,
):
    """Exact sorted top-KP (scores fp32, columns int32), each (BT, KP), of one query half.

    Pass A: scores chunk by chunk and the maxima of NG interleaved column groups; the KP-th
    largest group maximum is a threshold with at least KP scores above it. Pass B: the scores
    above it (~k + a few for typical data) are compacted into a CAP-wide scratch row (prefix sum
    of the mask), then one small exact top-k. If a row has more than CAP survivors, the block
    falls back to a streaming bitonic top-k over all scores."""
    lrows = tl.arange(0, BT)
    gcols = tl.arange(0, NG)
    gm = tl.full((BT, NG), float("-inf"), tl.float32)
    for c0 in range(0, n, BN):
        s, cols, cmask = _scores(
            q_base, stride_qt, k_base, s_base, s_stride, rows, row_mask, lrows, c0, n, D,
            BT, BN, BD, PRECISION, FUSED, True,
        )  # fmt: skip
        gm = tl.maximum(gm, tl.max(tl.reshape(s, (BT, BN // NG, NG)), axis=1))
    gkey = _topk(_trunc_key(gm, tl.broadcast_to(gcols[None, :], (BT, NG)), NG), KP, TOPK)
    kth = tl.min(gkey, axis=1)
    tau = from_orderable(kth - (kth & (NG - 1)))
    tau = tl.where(tau == tau, tau, float("-inf"))  # -inf rounded down reads as NaN
    tl.debug_barrier()
    cnt = tl.zeros((BT,), tl.int32)
    for c0 in range(0, n, BN):
        s, cols, cmask = _scores(
            q_base, stride_qt, k_base, s_base, s_stride, rows, row_mask, lrows, c0, n, D,
            BT, BN, BD, PRECISION, FUSED, False,
        )  # fmt: skip
        keep = (s >= tau[:, None]) & cmask[None, :] & row_mask[:, None]
        ki = keep.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(ki, axis=1) - 1
        ok = keep & (pos < CAP)
        tl.store(cv_base + lrows[:, None] * CAP + pos, s, mask=ok)
        tl.store(cc_base + lrows[:, None] * CAP + pos, tl.broadcast_to(cols[None, :], (BT, BN)), mask=ok)
        cnt += tl.sum(ki, axis=1)
    tl.debug_barrier()
    if tl.max(cnt, axis=0) <= CAP:
        jj = tl.arange(0, CAP)
        valid = jj[None, :] < cnt[:, None]
        vals = tl.load(cv_base + lrows[:, None] * CAP + jj[None, :], mask=valid, other=float("-inf"))
        cc = tl.load(cc_base + lrows[:, None] * CAP + jj[None, :], mask=valid, other=0)
        top = _topk(key_or_lowest(pack(vals, tl.broadcast_to(jj[None, :], (BT, CAP))), valid, 64), KP, TOPK)
        pos = unpack_payload(top)
        best_s = tl.gather(vals, pos, axis=1)
        best_i = tl.gather(cc, pos, axis=1)
    else:  # more than CAP survivors in some row: streaming bitonic top-k over all scores
        s, cols, cmask = _scores(
            q_base, stride_qt, k_base, s_base, s_stride, rows, row_mask, lrows, 0, n, D,
            BT, BNS, BD, PRECISION, FUSED, False,
        )  # fmt: skip
        best = _topk(
            key_or_lowest(pack(s, tl.broadcast_to(cols[None, :], (BT, BNS))), cmask[None, :], 64), KP, TOPK
        )
        for c0 in range(BNS, n, BNS):
            s, cols, cmask = _scores(
                q_base, stride_qt, k_base, s_base, s_stride, rows, row_mask, lrows, c0, n, D,
                BT, BNS, BD, PRECISION, FUSED, False,
            )  # fmt: skip
            top = _topk(
                key_or_lowest(pack(s, tl.broadcast_to(cols[None, :], (BT, BNS))), cmask[None, :], 64),
                KP,
                TOPK,
            )
            best = _topk(tl.reshape(tl.join(best, top), (BT, 2 * KP)), KP, TOPK)
        best_s = unpack_score(best)
        best_i = unpack_payload(best)
    tl.debug_barrier()
    return best_s, best_i


# score functions applied to the selected scores in the kernels (SCORE constexpr)
SCORE_CODES = {"none": 0, "softmax": 1, "relu": 2}


@triton.jit
def _score_fn(s, valid, SCORE: tl.constexpr):
    """Weights from the (temperature-scaled) selected scores (BT, KP); ``valid`` marks the k columns."""
    if SCORE == 1:  # softmax over the k selected slots
        s = tl.where(valid, s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        s = e / tl.sum(e, axis=1)[:, None]
    elif SCORE == 2:
        s = tl.maximum(s, 0.0)
    return s


@triton.jit
def _score_fn_backward(g, w, SCORE: tl.constexpr):
    """Gradient of the scores from that of the weights ``g`` and the weights ``w`` (0 off the k
    columns); the temperature is applied by the caller."""
    if SCORE == 1:
        g = w * (g - tl.sum(g * w, axis=1)[:, None])
    elif SCORE == 2:
        g = tl.where(w > 0, g, 0.0)
    return g


@triton.jit
def _search_fwd_kernel(
    Q,
    K,
    S,
    CV,
    CC,
    CAND,
    S_OUT,
    I_OUT,
    T,
    H,
    n,
    D,
    topk,
    C,
    inv_temp,
    stride_qt,
    stride_qh,
    s_half,
    s_stride,
    s_block,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    CP: tl.constexpr,
    NG: tl.constexpr,
    CAP: tl.constexpr,
    BNS: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPK: tl.constexpr,
    FUSED: tl.constexpr,
    EXACT: tl.constexpr,
    SCORE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    prog = (h * tl.num_programs(0) + pid_t).to(tl.int64)
    rows = pid_t * BT + tl.arange(0, BT)
    row_mask = rows < T
    q_base = Q + h * stride_qh
    k_base = K + h * 2 * n * D
    cv_base = CV + prog * BT * CAP
    cc_base = CC + prog * BT * CAP
    if FUSED:  # the program's own scratch rows, reused by both halves
        s0 = S + prog * s_block
    else:  # precomputed half scores (H, 2, T, n)
        s0 = S + (h * 2 * T + pid_t * BT).to(tl.int64) * s_stride
    s1 = tl.zeros((BT, KP), tl.float32)
    s2 = tl.zeros((BT, KP), tl.float32)
    i1 = tl.zeros((BT, KP), tl.int32)
    i2 = tl.zeros((BT, KP), tl.int32)
    for p in range(2):  # a loop, not unrolled: one copy of the selection code (compile time)
        bs, bi = _half_select(
            q_base + p * D, stride_qt, k_base + p * n * D, s0 + p * s_half, s_stride, cv_base, cc_base,
            rows, row_mask, n, D, BT, BN, BD, KP, NG, CAP, BNS, PRECISION, TOPK, FUSED,
        )  # fmt: skip
        s1 = tl.where(p == 0, bs, s1)
        i1 = tl.where(p == 0, bi, i1)
        s2 = tl.where(p == 1, bs, s2)
        i2 = tl.where(p == 1, bi, i2)

    # the ~k ln k candidate pairs (i, j), (i + 1)(j + 1) <= k, of the two sorted lists
    cpos = tl.arange(0, CP)
    ci = tl.broadcast_to(tl.load(CAND + cpos)[None, :], (BT, CP))
    cj = tl.broadcast_to(tl.load(CAND + CP + cpos)[None, :], (BT, CP))
    cand = tl.gather(s1, ci, axis=1) + tl.gather(s2, cj, axis=1)
    slot = tl.gather(i1, ci, axis=1) * n + tl.gather(i2, cj, axis=1)
    used = (cpos < C)[None, :]
    if EXACT:  # packed (sum, slot) int64 keys: the exact float32 top-k
        final = _topk(key_or_lowest(pack(cand, slot), used, 64), KP, TOPK)
    else:
        # top-KP on int32 keys (the sums to 2**-(23 - log2 CP) relative, the position in the low
        # bits: near-ties closer than that are broken by position), then the chosen exact sums sorted
        top = _topk(
            key_or_lowest(_trunc_key(cand, tl.broadcast_to(cpos[None, :], (BT, CP)), CP), used, 32), KP, TOPK
        )
        pos = top & (CP - 1)
        final = _topk(pack(tl.gather(cand, pos, axis=1), tl.gather(slot, pos, axis=1)), KP, TOPK)

    jj = tl.arange(0, KP)
    out = rows[:, None] * (H * topk) + h * topk + jj[None, :]
    omask = row_mask[:, None] & (jj < topk)[None, :]
    w = _score_fn(unpack_score(final) * inv_temp, (jj < topk)[None, :], SCORE)
    tl.store(S_OUT + out, w, mask=omask)
    tl.store(I_OUT + out, unpack_payload(final).to(tl.int64), mask=omask)


@triton.jit
def _search_bwd_scatter_kernel(
    GS,
    W,
    IDX,
    G,
    T,
    H,
    n,
    topk,
    inv_temp,
    Q,
    Q16,
    stride_qt,
    stride_qh,
    kd,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BNZ: tl.constexpr,
    SCORE: tl.constexpr,
    KDP: tl.constexpr,
    CAST_Q: tl.constexpr,
):
    """Dense half-score gradient G (H, 2, T, n) from the k selected weights' gradient (through the
    score function and the temperature): the program's rows are zeroed (no separate fill), then per
    token the duplicated sub-key indices are summed in a fixed order and stored once (no atomics).
    With ``CAST_Q`` the program also writes its rows of the query in G's dtype (Q16, (T, H, kd)),
    the operand of the sub-key gradient's 16-bit product (no separate cast kernel)."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_mask = rows < T
    if CAST_Q:
        dd = tl.arange(0, KDP)
        qm = row_mask[:, None] & (dd < kd)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        q = tl.load(Q + r64 * stride_qt + h * stride_qh + dd[None, :], mask=qm, other=0.0)
        tl.store(Q16 + (r64 * H + h) * kd + dd[None, :], to_output(q.to(tl.float32), Q16), mask=qm)
    jj = tl.arange(0, KP)
    m = row_mask[:, None] & (jj < topk)[None, :]
    off = rows[:, None] * (H * topk) + h * topk + jj[None, :]
    g = tl.load(GS + off, mask=m, other=0.0).to(tl.float32)
    if SCORE != 0:
        g = _score_fn_backward(g, tl.load(W + off, mask=m, other=0.0), SCORE)
    g = g * inv_temp
    idx = tl.load(IDX + off, mask=m, other=0).to(tl.int32)  # slots < n * n < 2**31: half the work
    first = idx // n
    earlier = jj[None, None, :] < jj[None, :, None]  # [., j, j']: j' < j
    g_rows = (h * 2 * T + rows[:, None]).to(tl.int64) * n
    zeros = tl.zeros((BT, BNZ), tl.float32)
    for p in tl.static_range(2):
        for c0 in range(0, n, BNZ):
            cz = c0 + tl.arange(0, BNZ)
            tl.store(G + g_rows + p * T * n + cz[None, :], zeros, mask=row_mask[:, None] & (cz < n)[None, :])
    tl.debug_barrier()  # the zeros land before the program's own scattered stores
    for p in tl.static_range(2):
        if p == 0:
            hid = first
        else:
            hid = idx - first * n
        eq = (hid[:, :, None] == hid[:, None, :]) & m[:, None, :]  # [t, j, j']
        tot = tl.sum(tl.where(eq, g[:, None, :], 0.0), axis=2)
        dup = tl.sum((eq & earlier).to(tl.int32), axis=2)
        tl.store(G + g_rows + p * T * n + hid, tot, mask=m & (dup == 0))


# ---- launchers ------------------------------------------------------------------------------------


def _float32_products(precision: str, device: torch.device):
    """Set torch's float32 matmul precision to ``precision`` ("tf32" or "ieee") and turn autocast
    off, where they differ from what is set (host time per call: nothing is touched in the common
    case); returns what :func:`_restore` needs to undo it (None if nothing changed)."""
    mm = torch.backends.cuda.matmul
    change = float32_precision() != ("ieee" if precision == "ieee" else "tf32")
    autocast = torch.is_autocast_enabled(device.type)
    if not (change or autocast):
        return None
    name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"
    old = getattr(mm, name)
    if change:
        tf32 = precision != "ieee"
        setattr(mm, name, ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32)
    if autocast:
        torch.set_autocast_enabled(device.type, False)
    return device.type, autocast, name if change else None, old


def _restore(state) -> None:
    if state is not None:
        device_type, autocast, name, old = state
        if autocast:
            torch.set_autocast_enabled(device_type, True)
        if name is not None:
            setattr(torch.backends.cuda.matmul, name, old)


def _tf32_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A float32 operand of a cuBLAS product as a GPU reads it: on CPU tensors (the interpreter's
    tests) rounded to tf32 for precision "tf32", as the tensor cores round it."""
    return round_to_tf32(x) if precision == "tf32" and not x.is_cuda and x.dtype == torch.float32 else x


def _per_half(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(T, H, k_dim)`` in ``dtype`` as ``(H * 2, T, k_dim // 2)``: a strided view (no copy) if possible."""
    T, H, kd = x.shape
    x = x.to(dtype)
    if x.stride(2) != 1 or x.stride(1) != kd:
        x = x.contiguous()
    return x.as_strided((H * 2, T, kd // 2), (kd // 2, x.stride(0), 1))


def half_scores(query: torch.Tensor, subkeys: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """All half scores ``(H, 2, T, n)`` float32 by one batched matrix product (cuBLAS): float32
    products in ``precision`` ("tf32": tensor cores, "ieee": exact). A 16-bit query (the query
    network's output under autocast) takes the sub-keys in its dtype: 16-bit operands, float32
    sums (exact products: ``precision`` does not apply)."""
    T, H, kd = query.shape
    H_, _, n, D = subkeys.shape
    state = _float32_products(precision, query.device)
    try:
        if query.dtype in LOW_PRECISION:
            k = subkeys.to(query.dtype).reshape(H * 2, n, D).transpose(1, 2)
            s = bmm_fp32(_per_half(query, query.dtype), k)
        else:
            q = _tf32_operand(_per_half(query), precision)
            k = _tf32_operand(subkeys.float().reshape(H * 2, n, D), precision)
            s = torch.bmm(q, k.transpose(1, 2))
    finally:
        _restore(state)
    return s.view(H, 2, T, n)


@functools.lru_cache(maxsize=256)
def _fwd_config(T: int, H: int, n: int, D: int, KP: int, precision: str, dev: DeviceInfo) -> MappingProxyType:
    """Block sizes of the selection kernel for T tokens x H heads over n sub-keys per half, on ``dev``.

    The selection is latency-bound: small programs, several resident per SM. Measured on one
    H200 (132 SMs; k = 32, n = 512, k_dim = 512), device time of the kernel:

    - paper setting (8192 tokens x 4 heads): 8 rows x 64 columns, 4 warps: 0.40 ms vs 0.59 for
      32 x 128 with 8 warps, where one 242-register program filled an SM (12 % occupancy, Nsight
      Compute): ``benchmarks/kernels.py``, commit e8667f2;
    - decode sizes, CUDA-graph replays: 4 rows, 4 warps: 18.8 us vs 26.0 (8 rows) and 38.5 (16)
      at 64 tokens, 31.7 vs 36.3 and 50.0 at 512 tokens: the decode sweep of
      ``benchmarks/overhead.py``, ``benchmarks/results/overhead-h200.json``, commit deb4a07.

    8-row programs once they number 15.5 per SM (2048 on an H200, from 16384 token-heads, where the
    switch was set between the measured 2048 and 32768), so a GPU with fewer SMs switches at a
    smaller batch. ``precision`` is the fused variant's ``tl.dot`` precision (a compile-time
    constant; the default variant takes the half scores from cuBLAS in that precision). Cached:
    read-only."""
    many = cdiv(T * H, 8) >= 15.5 * dev.sms
    bt = 8 if many else 4
    bn = max(min(next_pow2(n), 64 if many else 128), KP, 16)
    cfg = {
        "BT": bt,
        "BN": bn,
        "BD": min(max(next_pow2(D), 16), 64),
        "NG": min(bn, max(KP, 64)),
        "CAP": max(2 * KP, 64),
        "FUSED": False,
        # final top-k on exact int64 (sum, slot) keys; False: int32 keys truncated by log2(CP) bits
        "EXACT": True,
        # at most one warp per 32 elements of a (BT, KP) tile: Triton 3.6 (torch 2.11) fails to
        # compile the candidates' tl.gather when its tile spans more warps than it fills (k <= 16;
        # "Assertion `GatherLoweringHelper(op).isWarpLocal()' failed"); Triton 3.9 compiles both
        "num_warps": max(1, min(4, bt * KP // 32)),
        # tl.topk's bitonic network is very slow under the interpreter: select by max-reductions there
        "TOPK": 1 if INTERPRET else 0,
        "PRECISION": precision,
    }
    return MappingProxyType(cfg)


def _bwd_config(T: int, H: int, n: int, dev: DeviceInfo) -> MappingProxyType:
    """Block sizes of the gradient scatter kernel: 8 rows, 4 warps. H200, paper setting: 0.286 ms;
    4 rows 0.281, 4 rows with 2 warps 0.285, 16 rows with 8 warps 0.318 (``benchmarks/kernels.py``,
    ``benchmarks/results/kernels-h200.json``, code of commit 9e2e638): no block size matters
    within 2 %, and the kernel writes every (token, sub-key) gradient, so it is bandwidth-bound on
    any GPU."""
    return _BWD_CONFIG


_BWD_CONFIG = MappingProxyType({"BT": 8, "num_warps": 4})


def _check_config(cfg: dict, KP: int) -> None:
    """Block sizes given by hand: powers of two, and the group maxima must give a threshold."""
    for name in ("BT", "BN", "BD", "NG", "CAP"):
        v = cfg[name]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"config {name}={v!r} is not allowed: {name} must be a power of two")
    if cfg["FUSED"] and min(cfg["BT"], cfg["BN"], cfg["BD"]) < 16:
        raise ValueError(
            f"config BT={cfg['BT']}, BN={cfg['BN']}, BD={cfg['BD']} is not allowed with FUSED: "
            "the fused half scores (tl.dot) need each of them >= 16"
        )
    if not KP <= cfg["NG"] <= cfg["BN"]:
        raise ValueError(
            f"config NG={cfg['NG']} is not allowed: NG must be in [next_pow2(topk)={KP}, BN={cfg['BN']}]"
        )
    check_precision(cfg["PRECISION"])


def search_forward(
    query: torch.Tensor,
    subkeys: torch.Tensor,
    topk: int,
    precision: str | None = None,
    config: dict | None = None,
    score: str = "none",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the search: ``(T, H, k_dim), (H, 2, n, k_dim/2) -> weights fp32, indices int64``
    (the weights are ``score`` of the selected scores / ``temperature``; the raw scores for "none").
    ``precision`` of float32 products: None follows torch's float32 matmul setting at this call
    (:func:`~pkmem.ops.triton._common.float32_precision`). ``config``: block sizes by hand
    (benchmarks), checked."""
    precision = float32_precision() if precision is None else check_precision(precision)
    T, H, kd = query.shape
    n, D = subkeys.shape[2], subkeys.shape[3]
    if query.stride(-1) != 1:
        query = query.contiguous()
    subkeys = subkeys.contiguous()
    KP = max(next_pow2(topk), 2)
    cand, C = _candidate_table(topk, query.device)
    scores = new_output(T, H, topk, device=query.device, dtype=torch.float32)
    indices = new_output(T, H, topk, device=query.device, dtype=torch.int64)
    if T == 0:
        return scores, indices
    cfg = _fwd_config(T, H, n, D, KP, precision, device_info(query.device))
    if config:
        cfg = dict(cfg, **config)
        if cfg["FUSED"] and "BT" not in config:
            cfg["BT"] = max(cfg["BT"], 16)  # tl.dot needs 16 rows
        _check_config(cfg, KP)
    BT, BN = cfg["BT"], cfg["BN"]
    grid = (cdiv(T, BT), H)
    progs = grid[0] * grid[1]
    if cfg["FUSED"]:
        if query.dtype in LOW_PRECISION:  # the sub-keys in the query's dtype, as half_scores takes them
            subkeys = subkeys.to(query.dtype)
        npad = cdiv(n, BN) * BN
        S = torch.empty(progs * BT * npad, device=query.device, dtype=torch.float32)
        s_half, s_stride, s_block = 0, npad, BT * npad
    else:
        S = half_scores(query, subkeys, cfg["PRECISION"])
        s_half, s_stride, s_block = T * n, n, 0
    CAP = cfg["CAP"]
    cv = torch.empty(progs * BT * CAP, device=query.device, dtype=torch.float32)
    cc = torch.empty(progs * BT * CAP, device=query.device, dtype=torch.int32)
    _search_fwd_kernel[grid](
        query,
        subkeys,
        S,
        cv,
        cc,
        cand,
        scores,
        indices,
        T,
        H,
        n,
        D,
        topk,
        C,
        1.0 / temperature,
        query.stride(0),
        query.stride(1),
        s_half,
        s_stride,
        s_block,
        BT=BT,
        BN=BN,
        BD=cfg["BD"],
        KP=KP,
        CP=cand.shape[1],
        NG=cfg["NG"],
        CAP=CAP,
        BNS=min(BN, 2 * KP),
        PRECISION=cfg["PRECISION"],
        TOPK=cfg["TOPK"],
        FUSED=cfg["FUSED"],
        EXACT=cfg["EXACT"],
        SCORE=SCORE_CODES[score],
        num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
    )
    return scores, indices


GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_grad_dtype(device: torch.device) -> str:
    """The dtype of the backward's matrix products for a forward run now: the autocast dtype
    under CUDA autocast (as torch's own matmuls under autocast, whatever the float32 precision),
    else "float32"."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in LOW_PRECISION:
            return str(dtype).removeprefix("torch.")
    return "float32"


def search_backward(
    grad_scores: torch.Tensor,
    query: torch.Tensor,
    subkeys: torch.Tensor,
    indices: torch.Tensor,
    need_query: bool = True,
    need_subkeys: bool = True,
    precision: str | None = None,
    weights: torch.Tensor | None = None,
    score: str = "none",
    temperature: float = 1.0,
    grad_dtype: str = "float32",
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the search with respect to ``query`` and ``subkeys`` (each in its own dtype),
    from the gradient of its output (``weights``, the forward's output, is needed unless ``score``
    is "none"). ``grad_dtype`` "bfloat16" / "float16" (what :func:`autocast_grad_dtype` picks
    under autocast): the half-score gradient is stored in that dtype and the two matrix products
    take 16-bit operands (float32 accumulation and results): half the bytes, twice the rate.
    ``precision`` of the float32 products (grad_dtype "float32"): None follows torch's setting.
    ``config``: the scatter kernel's block sizes by hand (benchmarks)."""
    precision = float32_precision() if precision is None else check_precision(precision)
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(
            f"grad_dtype={grad_dtype!r} is not allowed: grad_dtype must be one of {tuple(GRAD_DTYPES)}"
        )
    g_dtype = GRAD_DTYPES[grad_dtype]
    T, H, kd = query.shape
    n, D = subkeys.shape[2], subkeys.shape[3]
    topk = indices.shape[-1]
    G = new_output(H, 2, T, n, device=query.device, dtype=g_dtype)  # every element is written
    # the sub-key gradient's 16-bit product needs the query in G's dtype: the scatter kernel
    # writes that copy, unless the query already is in it (a 16-bit query network's output)
    cast_q = g_dtype != torch.float32 and need_subkeys and query.dtype != g_dtype
    if cast_q and query.stride(-1) != 1:
        query = query.contiguous()
    q16 = torch.empty(T, H, kd, device=query.device, dtype=g_dtype) if cast_q else query
    if T > 0:
        cfg = dict(_bwd_config(T, H, n, device_info(query.device)), **config) if config else _BWD_CONFIG
        BT = cfg["BT"]
        grad_scores = grad_scores.contiguous()
        _search_bwd_scatter_kernel[(cdiv(T, BT), H)](
            grad_scores,
            grad_scores if weights is None else weights.contiguous(),
            indices.contiguous(),
            G,
            T,
            H,
            n,
            topk,
            1.0 / temperature,
            query,
            q16 if cast_q else G,
            query.stride(0),
            query.stride(1),
            kd,
            BT=BT,
            KP=max(next_pow2(topk), 2),
            BNZ=min(max(next_pow2(n), 16), 128),
            SCORE=SCORE_CODES[score],
            KDP=next_pow2(kd),
            CAST_Q=cast_q,
            num_warps=cfg["num_warps"],
        )
    gq = gk = None
    G = G.view(H * 2, T, n)
    if g_dtype != torch.float32:
        if need_query:
            k16 = subkeys.reshape(H * 2, n, D).to(g_dtype)
            if query.dtype == g_dtype:  # a 16-bit query: its gradient straight from the product
                gq = torch.empty(T, H, kd, device=query.device, dtype=g_dtype)
                torch.bmm(G, k16, out=_per_half(gq, g_dtype))
            else:
                gq = torch.empty(T, H, kd, device=query.device, dtype=torch.float32)
                bmm_fp32(G, k16, out=_per_half(gq))
                gq = gq.to(query.dtype)
        if need_subkeys:  # the query in G's dtype
            gk = bmm_fp32(G.transpose(1, 2), _per_half(q16, g_dtype)).view(H, 2, n, D).to(subkeys.dtype)
        return gq, gk
    state = _float32_products(precision, query.device)
    try:
        G = _tf32_operand(G, precision)
        if need_query:  # (H*2, T, n) @ (H*2, n, D), written straight into (T, H, k_dim)
            gq = torch.empty(T, H, kd, device=query.device, dtype=torch.float32)
            k = _tf32_operand(subkeys.float().reshape(H * 2, n, D), precision)
            torch.bmm(G, k, out=_per_half(gq))
            gq = gq.to(query.dtype)
        if need_subkeys:  # (H*2, n, T) @ (H*2, T, D)
            q = _tf32_operand(_per_half(query), precision)
            gk = torch.bmm(G.transpose(1, 2), q).view(H, 2, n, D).to(subkeys.dtype)
    finally:
        _restore(state)
    return gq, gk


# ---- autograd: one torch.autograd.Function, eager and compiled ---------------------------------------
#
# Eagerly the Function calls search_forward / search_backward itself. Under torch.compile it calls
# the two custom ops below instead: opaque to the compiler (their fake implementations give the
# output shapes), traced with the Function's own backward. A custom op with its own autograd
# (register_autograd) costs several times the host time of a Function per eager call.

# torch.compile traces the branch that calls the custom ops (tests patch this to run it eagerly)
_compiling = torch.compiler.is_compiling


@torch.library.custom_op("pkmem::product_lookup", mutates_args=())
def _product_lookup_op(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int, precision: str, score: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return search_forward(query, subkeys, topk, precision, score=score, temperature=temperature)


@_product_lookup_op.register_fake
def _(query, subkeys, topk, precision, score, temperature):
    T, H, _ = query.shape
    return (
        query.new_empty(T, H, topk, dtype=torch.float32),
        query.new_empty(T, H, topk, dtype=torch.int64),
    )


@torch.library.custom_op("pkmem::product_lookup_backward", mutates_args=())
def _product_lookup_backward_op(
    grad_weights: torch.Tensor,
    weights: torch.Tensor,
    query: torch.Tensor,
    subkeys: torch.Tensor,
    indices: torch.Tensor,
    need_query: bool,
    need_subkeys: bool,
    precision: str,
    score: str,
    temperature: float,
    grad_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    gq, gk = search_backward(
        grad_weights, query, subkeys, indices, need_query, need_subkeys, precision, weights, score,
        temperature, grad_dtype,
    )  # fmt: skip
    # one empty tensor per missing gradient: a custom op's outputs must not alias each other
    return (gq if gq is not None else query.new_empty(0)), (gk if gk is not None else subkeys.new_empty(0))


@_product_lookup_backward_op.register_fake
def _(grad_weights, weights, query, subkeys, indices, need_query, need_subkeys, precision, score, temperature,
      grad_dtype):  # fmt: skip
    # contiguous, as search_backward writes them (empty_like would keep a strided input's strides)
    return (
        query.new_empty(query.shape if need_query else 0),
        subkeys.new_empty(subkeys.shape if need_subkeys else 0),
    )


def _lookup_forward(query, subkeys, topk, precision, score, temperature):
    if _compiling():
        return _product_lookup_op(query, subkeys, topk, precision, score, temperature)
    return search_forward(query, subkeys, topk, precision, score=score, temperature=temperature)


class _ProductLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, subkeys, topk, precision, score, temperature):
        weights, indices = _lookup_forward(query, subkeys, topk, precision, score, temperature)
        ctx.save_for_backward(query, subkeys, indices, weights)
        ctx.precision, ctx.score, ctx.temperature = precision, score, temperature
        ctx.grad_dtype = autocast_grad_dtype(query.device)
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, grad_weights, grad_indices):
        query, subkeys, indices, weights = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_weights is None or not (need_q or need_k):
            return None, None, None, None, None, None
        args = (grad_weights, weights, query, subkeys, indices, need_q, need_k, ctx.precision, ctx.score)
        if _compiling():
            gq, gk = _product_lookup_backward_op(*args, ctx.temperature, ctx.grad_dtype)
        else:
            gq, gk = search_backward(
                grad_weights, query, subkeys, indices, need_q, need_k, ctx.precision, weights, ctx.score,
                ctx.temperature, ctx.grad_dtype,
            )  # fmt: skip
        return (gq if need_q else None), (gk if need_k else None), None, None, None, None


def lookup(query, subkeys, topk: int, score: str, temperature: float, precision: str):
    """:func:`product_lookup` on checked arguments (``precision`` given): the op itself."""
    if torch.is_grad_enabled() and (query.requires_grad or subkeys.requires_grad):
        return _ProductLookup.apply(query, subkeys, topk, precision, score, temperature)
    # nothing to differentiate: the forward alone (no autograd node, less host time per call)
    return _lookup_forward(query, subkeys, topk, precision, score, temperature)


def product_lookup(
    query: torch.Tensor,
    subkeys: torch.Tensor,
    topk: int,
    score: str = "softmax",
    temperature: float = 1.0,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key search and the score function: see :func:`pkmem.ops.reference.product_lookup`.
    ``precision`` of float32 products: None (default) follows torch's float32 matmul setting at
    this call ("highest": exact float32; "high" / "medium": tf32), as torch's own matmuls do."""
    precision = float32_precision() if precision is None else check_precision(precision)
    temperature = check_score(score, temperature)
    return lookup(query, subkeys, topk, score, temperature, precision)


def product_topk(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int, precision: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key search: see :func:`pkmem.ops.reference.product_topk`."""
    return product_lookup(query, subkeys, topk, "none", 1.0, precision)
