"""Fused exact product-key search (Triton): queries and sub-keys in, the final top-k out.

Twin of :func:`pkmem.ops.reference.product_topk`. One program handles a block of tokens of one
head; for each query half it computes the half scores against the sub-keys chunk by chunk on the
tensor cores (``tl.dot``), keeps a running sorted top-k of packed ``(score, column)`` int64 keys
(bitonic ``tl.topk``), then forms only the ~k ln k candidate sums ``s1[i] + s2[j]`` with
``(i + 1)(j + 1) <= k`` (which provably hold the final top-k) and selects the final top-k. Neither
the ``(T, H, 2, n)`` half scores nor the ``(T, H, k*k)`` candidates ever reach memory.

Backward: the gradient of the k selected scores lands on at most k distinct sub-keys per half,
so per token the duplicates are summed in registers and stored (plain stores, deterministic) into
a dense ``(H, 2, T, n)`` buffer; two batched matrix products on the tensor cores then give the
query and the sub-key gradients.

``precision`` picks tl.dot's float32 mode: "tf32" (default: fast, ~1e-3 relative error on the
half scores, so near-ties may be resolved differently than in float32), "tf32x3" (about float32
accuracy, three tensor-core passes) or "ieee" (exact float32 FMA, slowest).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pkmem.ops.triton._common import (
    INTERPRET,
    check_precision,
    new_output,
    next_pow2,
    pack,
    unpack_payload,
    unpack_score,
)

__all__ = ["product_topk", "search_forward", "search_backward", "DEFAULT_PRECISION"]

DEFAULT_PRECISION = check_precision(os.environ.get("PKMEM_SEARCH_PRECISION", "tf32"))


@functools.lru_cache(maxsize=64)
def _candidate_table(topk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Positions (i, j) with (i + 1)(j + 1) <= topk as one int32 tensor (2, C_PAD), and C."""
    pairs = [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]
    c_pad = max(next_pow2(len(pairs)), next_pow2(topk), 2)
    table = torch.zeros(2, c_pad, dtype=torch.int32)
    table[:, : len(pairs)] = torch.tensor(pairs, dtype=torch.int32).T
    return table.to(device), len(pairs)


@triton.jit
def _topk_iterative(x, KP: tl.constexpr):
    """Sorted top-KP of unique int64 keys along the last axis by KP max-reductions (fast under
    the interpreter, where tl.topk's bitonic network is slow; a variant on the GPU)."""
    out = tl.zeros((x.shape[0], KP), x.dtype)
    cols = tl.arange(0, KP)
    lo = tl.min(x, axis=1)[:, None] - 1
    for r in tl.static_range(KP):
        m = tl.max(x, axis=1)[:, None]
        out = tl.where(cols[None, :] == r, m, out)
        x = tl.where(x == m, lo, x)
    return out


@triton.jit
def _topk(x, KP: tl.constexpr, TOPK: tl.constexpr):
    """Sorted (descending) top-KP of unique int64 keys along the last axis."""
    if TOPK == 0:
        return tl.topk(x, KP)
    else:
        return _topk_iterative(x, KP)


@triton.jit
def _chunk_topk(
    q_base,
    stride_qt,
    k_base,
    rows,
    row_mask,
    c0,
    n,
    D,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPK: tl.constexpr,
):
    """Sorted top-KP packed (score, column) keys of one query half over sub-keys [c0, c0 + BN)."""
    cols = c0 + tl.arange(0, BN)
    cmask = cols < n
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
        acc = tl.dot(q, kt, acc, input_precision=PRECISION)
    acc = tl.where(cmask[None, :], acc, float("-inf"))
    return _topk(pack(acc, tl.broadcast_to(cols[None, :], (BT, BN))), KP, TOPK)


@triton.jit
def _half_topk(
    q_base,
    stride_qt,
    k_base,
    rows,
    row_mask,
    n,
    D,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPK: tl.constexpr,
):
    """Sorted (descending) top-KP packed (score, column) keys of one query half: (BT, KP) int64."""
    best = _chunk_topk(q_base, stride_qt, k_base, rows, row_mask, 0, n, D, BT, BN, BD, KP, PRECISION, TOPK)
    for c0 in range(BN, n, BN):
        top = _chunk_topk(
            q_base, stride_qt, k_base, rows, row_mask, c0, n, D, BT, BN, BD, KP, PRECISION, TOPK
        )
        best = _topk(tl.reshape(tl.join(best, top), (BT, 2 * KP)), KP, TOPK)
    return best


@triton.jit
def _search_fwd_kernel(
    Q,
    K,
    CAND,
    S_OUT,
    I_OUT,
    T,
    H,
    n,
    D,
    topk,
    C,
    stride_qt,
    stride_qh,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    CP: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_mask = rows < T
    q_base = Q + h * stride_qh
    k_base = K + h * 2 * n * D
    best1 = _half_topk(q_base, stride_qt, k_base, rows, row_mask, n, D, BT, BN, BD, KP, PRECISION, TOPK)
    best2 = _half_topk(
        q_base + D, stride_qt, k_base + n * D, rows, row_mask, n, D, BT, BN, BD, KP, PRECISION, TOPK
    )
    s1 = unpack_score(best1)
    i1 = unpack_payload(best1)
    s2 = unpack_score(best2)
    i2 = unpack_payload(best2)

    # the ~k ln k candidate pairs (i, j), (i + 1)(j + 1) <= k, of the two sorted lists
    cpos = tl.arange(0, CP)
    ci = tl.broadcast_to(tl.load(CAND + cpos)[None, :], (BT, CP))
    cj = tl.broadcast_to(tl.load(CAND + CP + cpos)[None, :], (BT, CP))
    cand = tl.gather(s1, ci, axis=1) + tl.gather(s2, cj, axis=1)
    slot = tl.gather(i1, ci, axis=1) * n + tl.gather(i2, cj, axis=1)
    cand = tl.where((cpos < C)[None, :], cand, float("-inf"))
    top = _topk(pack(cand, slot), KP, TOPK)

    jj = tl.arange(0, KP)
    out = rows[:, None] * (H * topk) + h * topk + jj[None, :]
    omask = row_mask[:, None] & (jj < topk)[None, :]
    tl.store(S_OUT + out, unpack_score(top), mask=omask)
    tl.store(I_OUT + out, unpack_payload(top).to(tl.int64), mask=omask)


@triton.jit
def _search_bwd_scatter_kernel(
    GS,
    IDX,
    G,
    T,
    H,
    n,
    topk,
    BT: tl.constexpr,
    KP: tl.constexpr,
):
    """Dense half-score gradient G (H, 2, T, n) from the k selected scores' gradient: per token,
    duplicated sub-key indices are summed in a fixed order and stored once (no atomics)."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_mask = rows < T
    jj = tl.arange(0, KP)
    m = row_mask[:, None] & (jj < topk)[None, :]
    off = rows[:, None] * (H * topk) + h * topk + jj[None, :]
    idx = tl.load(IDX + off, mask=m, other=0)
    first = idx // n
    second = idx - first * n
    tot1 = tl.zeros((BT, KP), tl.float32)
    tot2 = tl.zeros((BT, KP), tl.float32)
    dup1 = tl.zeros((BT, KP), tl.int32)
    dup2 = tl.zeros((BT, KP), tl.int32)
    base = rows * (H * topk) + h * topk
    for j in range(0, topk):
        gj = tl.load(GS + base + j, mask=row_mask, other=0.0).to(tl.float32)
        ij = tl.load(IDX + base + j, mask=row_mask, other=0)
        fj = ij // n
        sj = ij - fj * n
        e1 = first == fj[:, None]
        e2 = second == sj[:, None]
        tot1 += tl.where(e1, gj[:, None], 0.0)
        tot2 += tl.where(e2, gj[:, None], 0.0)
        later = (jj > j)[None, :]
        dup1 += (e1 & later).to(tl.int32)
        dup2 += (e2 & later).to(tl.int32)
    g_rows = (h * 2 * T + rows[:, None]).to(tl.int64) * n
    tl.store(G + g_rows + first, tot1, mask=m & (dup1 == 0))
    tl.store(G + g_rows + T * n + second, tot2, mask=m & (dup2 == 0))


@triton.jit
def _bmm_kernel(
    A,
    B,
    C,
    M,
    N,
    Kdim,
    NB1,
    sa0,
    sa1,
    sam,
    sak,
    sb0,
    sb1,
    sbk,
    sbn,
    sc0,
    sc1,
    scm,
    scn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C[b] = A[b] @ B[b] in float32, batch index b = (b0, b1) with b1 < NB1, any strides."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    b0 = b // NB1
    b1 = b - b0 * NB1
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    a_base = A + b0.to(tl.int64) * sa0 + b1.to(tl.int64) * sa1
    b_base = B + b0.to(tl.int64) * sb0 + b1.to(tl.int64) * sb1
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, Kdim, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(
            a_base + rm[:, None].to(tl.int64) * sam + rk[None, :].to(tl.int64) * sak,
            mask=(rm < M)[:, None] & (rk < Kdim)[None, :],
            other=0.0,
        ).to(tl.float32)
        bt = tl.load(
            b_base + rk[:, None].to(tl.int64) * sbk + rn[None, :] * sbn,
            mask=(rk < Kdim)[:, None] & (rn < N)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    c = C + b0.to(tl.int64) * sc0 + b1.to(tl.int64) * sc1 + rm[:, None].to(tl.int64) * scm + rn[None, :] * scn
    tl.store(c, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


# ---- launchers ------------------------------------------------------------------------------------


def _fwd_config(T: int, n: int, D: int, KP: int) -> dict:
    bd = min(max(next_pow2(D), 16), 64)
    bn = max(min(next_pow2(n), 128), KP, 16)
    return {
        "BT": 32 if KP <= 32 else 16,
        "BN": bn,
        "BD": bd,
        "num_warps": 4,
        # tl.topk's bitonic network is very slow under the interpreter: select by max-reductions there
        "TOPK": 1 if INTERPRET else 0,
    }


def search_forward(
    query: torch.Tensor,
    subkeys: torch.Tensor,
    topk: int,
    precision: str = DEFAULT_PRECISION,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused search: ``(T, H, k_dim), (H, 2, n, k_dim/2) -> scores fp32, indices int64``."""
    check_precision(precision)
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
    cfg = dict(_fwd_config(T, n, D, KP), **(config or {}))
    grid = (triton.cdiv(T, cfg["BT"]), H)
    _search_fwd_kernel[grid](
        query,
        subkeys,
        cand,
        scores,
        indices,
        T,
        H,
        n,
        D,
        topk,
        C,
        query.stride(0),
        query.stride(1),
        BT=cfg["BT"],
        BN=cfg["BN"],
        BD=cfg["BD"],
        KP=KP,
        CP=cand.shape[1],
        PRECISION=precision,
        TOPK=cfg["TOPK"],
        num_warps=cfg["num_warps"],
    )
    return scores, indices


def _bmm(a, b, c, M, N, Kdim, NB0, NB1, sa, sb, sc, precision):
    """Launch C[b0, b1] = A[b0, b1] @ B[b0, b1]; sa/sb/sc = (batch0, batch1, row, col) strides."""
    BM, BN, BK = 64, max(16, min(64, next_pow2(N))), 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), NB0 * NB1)
    _bmm_kernel[grid](a, b, c, M, N, Kdim, NB1, *sa, *sb, *sc, BM=BM, BN=BN, BK=BK, PRECISION=precision)


def search_backward(
    grad_scores: torch.Tensor,
    query: torch.Tensor,
    subkeys: torch.Tensor,
    indices: torch.Tensor,
    need_query: bool = True,
    need_subkeys: bool = True,
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the search with respect to ``query`` and ``subkeys`` (each in its own dtype)."""
    T, H, kd = query.shape
    n, D = subkeys.shape[2], subkeys.shape[3]
    topk = indices.shape[-1]
    dev = query.device
    if query.stride(-1) != 1:
        query = query.contiguous()
    subkeys = subkeys.contiguous()
    grad_scores = grad_scores.contiguous()
    indices = indices.contiguous()
    G = torch.zeros(H, 2, T, n, device=dev, dtype=torch.float32)
    if T > 0:
        BT = 16
        _search_bwd_scatter_kernel[(triton.cdiv(T, BT), H)](
            grad_scores, indices, G, T, H, n, topk, BT=BT, KP=max(next_pow2(topk), 2)
        )
    gq = gk = None
    if need_query:
        gq = new_output(T, H, kd, device=dev, dtype=torch.float32)
        if T > 0:
            # gq[t, h, p*D:(p+1)*D] = G[h, p] (T x n) @ subkeys[h, p] (n x D)
            _bmm(
                G,
                subkeys,
                gq,
                T,
                D,
                n,
                H,
                2,
                (2 * T * n, T * n, n, 1),
                (2 * n * D, n * D, D, 1),
                (kd, D, H * kd, 1),
                precision,
            )
        gq = gq.to(query.dtype)
    if need_subkeys:
        gk = new_output(H, 2, n, D, device=dev, dtype=torch.float32)
        # gk[h, p] = G[h, p]^T (n x T) @ query[:, h, p*D:(p+1)*D] (T x D)
        _bmm(
            G,
            query,
            gk,
            n,
            D,
            T,
            H,
            2,
            (2 * T * n, T * n, 1, n),
            (query.stride(1), D, query.stride(0), 1),
            (2 * n * D, n * D, D, 1),
            precision,
        )
        gk = gk.to(subkeys.dtype)
    return gq, gk


# ---- autograd: a custom op (for torch.compile) and a plain Function (cheaper in eager) -------------


@torch.library.custom_op("pkmem::product_topk", mutates_args=())
def _product_topk_op(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return search_forward(query, subkeys, topk, precision)


@_product_topk_op.register_fake
def _(query, subkeys, topk, precision):
    T, H, _ = query.shape
    return (
        query.new_empty(T, H, topk, dtype=torch.float32),
        query.new_empty(T, H, topk, dtype=torch.int64),
    )


@torch.library.custom_op("pkmem::product_topk_backward", mutates_args=())
def _product_topk_backward_op(
    grad_scores: torch.Tensor,
    query: torch.Tensor,
    subkeys: torch.Tensor,
    indices: torch.Tensor,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    gq, gk = search_backward(grad_scores, query, subkeys, indices, True, True, precision)
    return gq, gk


@_product_topk_backward_op.register_fake
def _(grad_scores, query, subkeys, indices, precision):
    return torch.empty_like(query), torch.empty_like(subkeys)


def _setup_context(ctx, inputs, output):
    query, subkeys, topk, precision = inputs
    ctx.save_for_backward(query, subkeys, output[1])
    ctx.precision = precision


def _backward(ctx, grad_scores, grad_indices):
    query, subkeys, indices = ctx.saved_tensors
    if grad_scores is None:
        return None, None, None, None
    gq, gk = _product_topk_backward_op(grad_scores, query, subkeys, indices, ctx.precision)
    return gq, gk, None, None


_product_topk_op.register_autograd(_backward, setup_context=_setup_context)


class _ProductTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, subkeys, topk, precision):
        scores, indices = search_forward(query, subkeys, topk, precision)
        ctx.save_for_backward(query, subkeys, indices)
        ctx.precision = precision
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    def backward(ctx, grad_scores, grad_indices):
        query, subkeys, indices = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_scores is None or not (need_q or need_k):
            return None, None, None, None
        gq, gk = search_backward(grad_scores, query, subkeys, indices, need_q, need_k, ctx.precision)
        return gq, gk, None, None


def product_topk(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int, precision: str = DEFAULT_PRECISION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key search, fused: see :func:`pkmem.ops.reference.product_topk`."""
    check_precision(precision)
    if torch.compiler.is_compiling():
        return _product_topk_op(query, subkeys, topk, precision)
    return _ProductTopk.apply(query, subkeys, topk, precision)
