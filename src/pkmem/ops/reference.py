"""The readable PyTorch version of every pkmem op.

It is the CPU path, the fallback on any device, and the oracle that every GPU kernel is tested
against. Conventions shared by all backends:

- ``query``: ``(T, H, k_dim)``; each head's query is split into two halves of ``k_dim // 2``.
- ``subkeys``: ``(H, 2, n, k_dim // 2)``: per head, the two sub-key sets of ``n = num_keys`` keys.
- slot ``i`` of the ``n**2`` memory slots is the sub-key pair ``(i // n, i % n)``.
- scores are computed and returned in float32 (float64 if an input is float64), whatever the
  input dtype and autocast state; indices are int64.
- in a gather, an entry with a negative index is skipped: it adds nothing to the output, gets a
  zero weight-gradient and no row of the value gradient (this is how masked tokens are dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pkmem.ops.rows import RowGrad, active_row_grad

__all__ = [
    "acc_dtype",
    "subkey_scores",
    "topk_from_half_scores",
    "product_topk",
    "check_indices_below",
    "check_score",
    "score_weights",
    "product_lookup",
    "flat_topk",
    "bmm_fp32",
    "brute_force_product_topk",
    "weighted_gather",
    "gather_backward_rows",
    "check_batch_norm",
    "real_rows",
    "update_running_stats",
    "batch_norm",
    "normalize",
]


LOW_PRECISION = (torch.bfloat16, torch.float16)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def subkey_scores(query: torch.Tensor, subkeys: torch.Tensor) -> torch.Tensor:
    """Inner products of each query half with its sub-keys: ``(T, H, k_dim) -> (T, H, 2, n)``,
    accumulated and returned in float32 (float64 if an input is). A 16-bit query (what the query
    network gives under autocast) takes the sub-keys rounded to its dtype: 16-bit operands with
    float32 sums, as a matrix product under autocast."""
    T, H, D = query.shape
    dt = acc_dtype(query, subkeys)
    if query.dtype in LOW_PRECISION:
        subkeys = subkeys.to(query.dtype)
    with _no_autocast(query.device):
        q = query.to(dt).reshape(T, H, 2, D // 2)
        return torch.einsum("thpd,hpnd->thpn", q, subkeys.to(dt))


_PAIRS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _candidate_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (i, j) in the two sorted per-half top-k lists with (i + 1) * (j + 1) <= topk.

    With both lists sorted in decreasing order, candidate (i, j) scores at most as much as every
    (i', j') <= (i, j), a rectangle of (i + 1) * (j + 1) candidates. Ordering candidates by score
    and breaking ties by i + j, the m-th one therefore has (i + 1) * (j + 1) <= m: the top-k of the
    k*k candidate sums always lies in this set of about k * ln(k) pairs (130 of 1024 for k = 32).
    """
    key = (topk, device)
    if torch.compiler.is_compiling():  # a constant of the graph (filling the cache would recompile it)
        return _make_pairs(topk, device)
    if key not in _PAIRS:
        _PAIRS[key] = _make_pairs(topk, device)
    return _PAIRS[key]


def candidate_pair_list(topk: int) -> list[tuple[int, int]]:
    """The pairs ``(i, j)`` with ``(i + 1) * (j + 1) <= topk`` (see :func:`_candidate_pairs`), in
    row-major order; the search kernel reads the same list."""
    return [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]


def _make_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ij = torch.tensor(candidate_pair_list(topk), dtype=torch.long, device=device).T.contiguous()
    return ij[0], ij[1]


def topk_from_half_scores(half_scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all ``n**2`` slots given the half scores ``(T, H, 2, n)``.

    Per-half top-k, then the final top-k over the candidate sums ``s1[i] + s2[j]``. Returns
    ``scores, indices``, each ``(T, H, topk)``, sorted by decreasing score.
    """
    n = half_scores.shape[-1]
    s, i = half_scores.topk(topk, dim=-1)  # (T, H, 2, k), sorted
    ci, cj = _candidate_pairs(topk, half_scores.device)
    cand = s[..., 0, :][..., ci] + s[..., 1, :][..., cj]  # (T, H, C)
    scores, pos = cand.topk(topk, dim=-1)  # (T, H, k)
    first = i[..., 0, :].gather(-1, ci[pos])
    second = i[..., 1, :].gather(-1, cj[pos])
    return scores, first * n + second


def product_topk(query: torch.Tensor, subkeys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key search (paper §3.1): ``(T, H, k_dim), (H, 2, n, k_dim/2) -> (T, H, topk)`` x 2.

    Differentiable with respect to ``query`` and ``subkeys`` through the selected scores: the
    selection runs without autograd, then the k selected scores are gathered from the half scores.
    """
    half = subkey_scores(query, subkeys)  # (T, H, 2, n)
    n = half.shape[-1]
    with torch.no_grad():
        _, indices = topk_from_half_scores(half, topk)
    scores = half[..., 0, :].gather(-1, indices // n) + half[..., 1, :].gather(-1, indices % n)
    return scores, indices


SCORES = ("softmax", "relu", "none")


def check_indices_below(indices: torch.Tensor, bound: int, bound_name: str) -> None:
    """Indices must be < ``bound`` (negative ones are skipped). Checked for eager CPU tensors only:
    on a GPU it would cost a host synchronisation per call, under ``torch.compile`` a graph break."""
    if (
        indices.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and indices.numel()
        and int(indices.max()) >= bound
    ):
        raise ValueError(
            f"indices has a maximum of {int(indices.max())}: indices must be < {bound_name}={bound} "
            "(or negative: skipped)"
        )


def check_score(score: str, temperature: float) -> float:
    """``score`` must be one of :data:`SCORES` and ``temperature`` a finite number > 0 (returned
    as a float)."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not allowed: score must be one of {SCORES}")
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature={temperature!r} is not allowed: temperature must be a finite number > 0"
        )
    return float(temperature)


def score_weights(scores: torch.Tensor, score: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """The weights of the selected slots: ``score`` ("softmax" over the last axis, "relu" or
    "none") of ``scores / temperature``."""
    if temperature != 1.0:
        scores = scores / temperature
    if score == "softmax":
        return scores.softmax(dim=-1)
    if score == "relu":
        return F.relu(scores)
    return scores


def product_lookup(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int, score: str = "softmax", temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`product_topk`, then :func:`score_weights`: ``(weights, indices)``, each ``(T, H, topk)``."""
    scores, indices = product_topk(query, subkeys, topk)
    return score_weights(scores, score, temperature), indices


def flat_topk(
    query: torch.Tensor, keys: torch.Tensor, topk: int, chunk_elements: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive search over flat keys ``(H, N, k_dim)`` (the paper's ablation, Table 4):
    ``(T, H, k_dim) -> scores (T, H, topk), indices (T, H, topk)``.

    Products as :func:`subkey_scores` takes them: accumulated and returned in float32 (float64 if
    an input is), a 16-bit query (the query network's output under autocast) with the keys rounded
    to its dtype. Queries are processed in chunks so that at most ``chunk_elements`` scores exist at
    once. The gradient reaches only the selected keys: the backward reads ``topk`` keys per token
    and head, not all ``N`` (a dense gradient of every score would cost two more exhaustive
    products)."""
    return _FlatTopk.apply(query, keys, topk, chunk_elements)


def bmm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (16-bit operands) accumulated and returned in float32 (into ``out`` if given): on
    CUDA one cuBLAS call with 16-bit inputs; elsewhere the same numbers from float32 operands
    (products of 16-bit values are exact in float32)."""
    if a.is_cuda:
        if out is None:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a, b, out_dtype=torch.float32, out=out)
    r = torch.bmm(a.float(), b.float())
    return r if out is None else out.copy_(r)


def _flat_operands(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and the keys as the products take them (see :func:`flat_topk`)."""
    dt = acc_dtype(query, keys)
    if query.dtype in LOW_PRECISION:
        return query, keys.to(query.dtype)
    return query.to(dt), keys.to(dt)


class _FlatTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, topk: int, chunk_elements: int):
        T, H, _ = query.shape
        N = keys.shape[1]
        q_op, k_op = _flat_operands(query, keys)
        step = max(1, chunk_elements // max(1, H * N))
        scores, indices = [], []
        with _no_autocast(query.device):
            for start in range(0, max(T, 1), step):
                q = q_op[start : start + step]
                if q.dtype in LOW_PRECISION:  # 16-bit operands, float32 sums
                    s = bmm_fp32(q.transpose(0, 1), k_op.transpose(1, 2)).transpose(0, 1)
                else:
                    s = torch.einsum("thd,hnd->thn", q, k_op)
                v, i = s.topk(topk, dim=-1)
                scores.append(v)
                indices.append(i)
        idx = torch.cat(indices)
        ctx.chunk_elements = chunk_elements
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(query, keys, idx)
        return torch.cat(scores), idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, grad_indices):
        query, keys, indices = ctx.saved_tensors
        T, H, D = query.shape
        N, k = keys.shape[1], indices.shape[-1]
        dt = acc_dtype(query, keys)
        q_op, k_op = _flat_operands(query, keys)
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = torch.empty(T, H, D, device=query.device, dtype=dt) if need_q else None
        gk = torch.zeros(H * N, D, device=keys.device, dtype=dt) if need_k else None
        rows = indices + (torch.arange(H, device=indices.device) * N)[None, :, None]  # (T, H, k)
        k_flat = k_op.reshape(H * N, D)
        step = max(1, ctx.chunk_elements // max(1, H * k * D))
        g_all = grad_scores.to(dt)
        with _no_autocast(query.device):
            for start in range(0, T, step):
                r = rows[start : start + step]
                g = g_all[start : start + step]
                if need_q:  # d score / d query = the selected key (as the product took it)
                    gq[start : start + step] = torch.einsum("thk,thkd->thd", g, k_flat[r].to(dt))
                if need_k:  # d score / d key = the query, summed over every read of the key
                    q = q_op[start : start + step].to(dt)
                    gk.index_add_(0, r.reshape(-1), (g[..., None] * q[:, :, None, :]).reshape(-1, D))
        gq = None if gq is None else gq.to(query.dtype)
        gk = None if gk is None else gk.view(H, N, D).to(keys.dtype)
        return gq, gk, None, None


def brute_force_product_topk(
    query: torch.Tensor, subkeys: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over all ``n**2`` full keys, materialised: for tests at small sizes only."""
    s = subkey_scores(query, subkeys)  # (T, H, 2, n)
    full = s[..., 0, :, None] + s[..., 1, None, :]  # (T, H, n, n): slot i*n + j
    return full.flatten(-2).topk(topk, dim=-1)


def weighted_gather(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * values[indices[t, j]]``: ``(N, v), (T, J), (T, J) -> (T, v)``.

    Accumulates in float32 (float64 for float64 inputs) and returns that dtype. Entries with a
    negative index are skipped. With ``sparse=True`` the values receive a row-sparse (COO) gradient
    holding only the rows the valid entries touched, as ``nn.EmbeddingBag(sparse=True)``. When a row
    optimizer owns ``values`` (:class:`pkmem.ops.rows.RowGrad`), the rows read are first brought up
    to date (exact mode) and the backward adds the value gradient's rows to its ``RowGrad``
    (:func:`gather_backward_rows`) instead of returning one.
    """
    rg = active_row_grad(values)
    if rg is not None:
        if torch.compiler.is_compiling():
            return row_gather_outside_graph()(values, indices, weights, sparse, rg)
        return _row_gather(values, indices, weights, sparse, rg)
    return _weighted_gather(values, indices, weights, sparse)


def _row_gather(values, indices, weights, sparse: bool, rg: RowGrad) -> torch.Tensor:
    if rg.before_read is not None:
        rg.before_read(values, indices)
    if torch.is_grad_enabled() and values.requires_grad:
        return _RowGather.apply(values, indices, weights, rg)
    return _weighted_gather(values, indices, weights, sparse)


_row_gather_eager = None


def row_gather_outside_graph():
    """``_row_gather`` behind ``torch.compiler.disable`` (a graph break under torch.compile), made
    on the first call: it imports torch._dynamo, which ``import pkmem`` must not (a RowGrad makes it
    when its optimizer attaches, before anything is compiled)."""
    global _row_gather_eager
    if _row_gather_eager is None:
        _row_gather_eager = torch.compiler.disable(_row_gather)
    return _row_gather_eager


def _weighted_gather(values, indices, weights, sparse: bool = False) -> torch.Tensor:
    T, J = indices.shape
    dt = acc_dtype(values, weights)
    if J == 0:
        return values.new_zeros(T, values.shape[1], dtype=dt)
    valid = indices >= 0
    w = torch.where(valid, weights.to(dt), 0.0)  # a skipped entry's weight may be anything (NaN too)
    offsets = None
    flat_idx, flat_w = indices.clamp(min=0), w
    if sparse and not bool(valid.all()):  # skipped entries must not appear in a sparse gradient
        flat_idx, flat_w = indices[valid], w[valid]
        offsets = torch.cumsum(valid.sum(1), 0) - valid.sum(1)
    if values.dtype == dt:
        return F.embedding_bag(
            flat_idx, values, offsets, mode="sum", per_sample_weights=flat_w, sparse=sparse
        )
    # low-precision table: gather the rows, accumulate in `dt`
    rows = F.embedding(flat_idx, values, sparse=sparse).to(dt)
    if offsets is None:
        return torch.einsum("tj,tjv->tv", flat_w, rows)
    bag = torch.arange(T, device=indices.device).repeat_interleave(valid.sum(1))
    return rows.new_zeros(T, values.shape[1]).index_add(0, bag, rows * flat_w[:, None])


@torch.no_grad()
def gather_backward_rows(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    row_grad: RowGrad,
    need_weights: bool = True,
) -> torch.Tensor | None:
    """Backward of :func:`weighted_gather` into a :class:`~pkmem.ops.rows.RowGrad`: each row read
    (a valid index) gets its gradient added to ``row_grad`` (``touched`` set, ``sumsq`` its squared
    norm); returns the weights' gradient (or None).
    Twin of the Triton kernel's row mode (``pkmem.ops.triton.gather.gather_backward(row_grad=...)``).
    """
    v = values.detach().requires_grad_()
    w = weights.detach().requires_grad_(need_weights)
    with torch.enable_grad():
        out = _weighted_gather(v, indices, w)
        grads = torch.autograd.grad(out, [v, w] if need_weights else [v], grad_out)
    dense = grads[0]  # (N, v_dim) in the table's dtype, zeros where not read
    rows = torch.unique(indices[indices >= 0])
    row_grad.prepare(values)
    was = row_grad.touched[rows].bool()
    acc = torch.where(was[:, None], row_grad.grad[rows].float(), 0.0) + dense[rows].float()
    new = acc.to(row_grad.grad.dtype)
    row_grad.grad[rows] = new
    row_grad.sumsq[rows] = new.float().square().sum(1)
    row_grad.touched[rows] = 1
    row_grad.added(indices.numel())
    return grads[1].to(weights.dtype) if need_weights else None


class _RowGather(torch.autograd.Function):
    """The weighted gather whose value gradient goes to a RowGrad (``table.grad`` stays None)."""

    @staticmethod
    def forward(ctx, values, indices, weights, row_grad):
        ctx.save_for_backward(values, indices, weights)
        ctx.row_grad = row_grad
        with torch.no_grad():
            return _weighted_gather(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        rg = ctx.row_grad
        if grad_out is None or not (need_v or need_w):
            return None, None, None, None
        if need_v and rg.active:
            gw = gather_backward_rows(grad_out, values, indices, weights, rg, need_w)
            return None, None, gw, None
        v = values.detach().requires_grad_(need_v)  # the optimizer is gone: a dense gradient again
        w = weights.detach().requires_grad_(need_w)
        with torch.enable_grad():
            out = _weighted_gather(v, indices, w)
            want = [t for t in (v, w) if t.requires_grad]
            got = iter(torch.autograd.grad(out, want, grad_out))
        return (next(got) if need_v else None), None, (next(got) if need_w else None), None


def check_batch_norm(
    x, weight, bias, mask, training: bool, running_mean, running_var, momentum=None, shift=None
) -> None:
    """``x`` (T, C); ``weight``, ``bias``, ``shift`` (C,) or None; ``mask`` bool with T elements or
    None; in eval (``training`` False), or with a ``momentum`` (a number in [0, 1]), the running
    statistics (C,)."""
    if momentum is not None:
        number = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
        if not number or not 0 <= momentum <= 1:
            raise ValueError(
                f"momentum={momentum!r} is not allowed: momentum must be a number in [0, 1] or None"
            )
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x has shape {tuple(getattr(x, 'shape', ()))}: batch_norm needs x (T, C)")
    T, C = x.shape
    named = [("weight", weight), ("bias", bias), ("shift", shift)]
    if not training or momentum is not None:
        named += [("running_mean", running_mean), ("running_var", running_var)]
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm in eval (training=False) or with a momentum needs running_mean and running_var"
            )
    for name, t in named + [("mask", mask)]:
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}={t!r} is not allowed: {name} must be a tensor or None")
    for name, t in named:
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: it must be (C,) = ({C},)")
    if mask is not None and (mask.dtype != torch.bool or mask.numel() != T):
        raise ValueError(
            f"mask={(mask.dtype, tuple(mask.shape))} is not allowed: mask must be a bool tensor of "
            f"T = {T} elements (True = real row)"
        )


def real_rows(x: torch.Tensor, mask: torch.Tensor | None):
    """The number of rows of ``x`` whose ``mask`` is True: an int without a mask, else a tensor
    (kept on the device: no synchronisation)."""
    return x.shape[0] if mask is None else mask.reshape(-1).sum()


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, n, momentum) -> None:
    """torch's BatchNorm update of running averages, in place: ``r += momentum * (stat - r)`` with
    the unbiased variance ``var * n / (n - 1)`` of ``n`` real rows (an int, or a tensor kept on the
    device); a batch without real rows leaves them alone, and so does a column whose batch
    statistics are not finite (a NaN or infinite token): on the device, no host sync.
    ``momentum``: a float or a tensor."""
    if isinstance(n, int) and not torch.is_tensor(momentum):
        if n > 0:
            c = n / max(n - 1, 1)
            ok = torch.isfinite(mean) & torch.isfinite(var)
            new_mean = torch.lerp(running_mean, mean.to(running_mean.dtype), momentum)
            new_var = torch.add(running_var * (1 - momentum), var.to(running_var.dtype), alpha=momentum * c)
            running_mean.copy_(torch.where(ok, new_mean, running_mean))
            running_var.copy_(torch.where(ok, new_var, running_var))
        return
    n = torch.as_tensor(n, device=mean.device).to(mean.dtype)
    momentum = momentum * (n > 0).to(mean.dtype)
    unbiased = var * (n / (n - 1).clamp(min=1))
    ok = torch.isfinite(mean) & torch.isfinite(unbiased)
    new_mean = running_mean + ((mean - running_mean) * momentum).to(running_mean.dtype)
    new_var = running_var + ((unbiased - running_var) * momentum).to(running_var.dtype)
    running_mean.copy_(torch.where(ok, new_mean, running_mean))
    running_var.copy_(torch.where(ok, new_var, running_var))


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
    """BatchNorm over the rows of ``x + shift`` (T, C): ``(y, mean, var)``.

    ``shift`` (C,): the bias of a linear layer before the norm, folded in (the product is then
    computed without it: one op fewer each way; its gradient is 0 in training with real rows,
    where the batch mean absorbs it).

    Training: ``mean`` and the biased ``var`` per column over the rows whose ``mask`` is True (all
    rows if None; with no real row, mean 0 and var 0). Eval: the running statistics (copies).
    ``y = (x - mean) * rsqrt(var + eps) * weight + bias`` for ALL rows (a None ``weight`` / ``bias``
    is not applied). Computed in float32 (float64 if an input is), whatever x's dtype and autocast;
    ``y`` is returned in x's dtype if that is 16-bit (as torch's BatchNorm gives it), else in the
    computing dtype; ``mean`` and ``var`` (float32 / float64) are detached (they feed the running
    averages). Without a mask (and in eval) ``y`` is torch's ``F.batch_norm``. With a ``momentum``
    (training), the running statistics are also updated in place (:func:`update_running_stats`).
    """
    check_batch_norm(x, weight, bias, mask, training, running_mean, running_var, momentum, shift)
    return normalize(x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)


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
    """:func:`batch_norm` on checked arguments."""
    y, mean, var = _batch_norm(x, weight, bias, mask, eps, training, running_mean, running_var, shift)
    if x.dtype in LOW_PRECISION:
        y = y.to(x.dtype)
    if training and momentum is not None:
        update_running_stats(running_mean, running_var, mean, var, real_rows(x, mask), momentum)
    return y, mean, var


def _batch_norm(x, weight, bias, mask, eps, training, running_mean, running_var, shift=None):
    params = [t for t in (weight, bias, shift) if t is not None]
    dt = acc_dtype(x, *params, *(() if training else (running_mean, running_var)))
    with _no_autocast(x.device):
        x = x.to(dt) if shift is None else x.to(dt) + shift.to(dt)
        w, b = (None if t is None else t.to(dt) for t in (weight, bias))
        if not training:
            mean, var = running_mean.to(dt, copy=True), running_var.to(dt, copy=True)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, eps), mean, var
        if mask is None and x.shape[0] > 1:  # torch's BatchNorm refuses to train on one row
            with torch.no_grad():
                var, mean = torch.var_mean(x, 0, correction=0)
            return F.batch_norm(x, None, None, w, b, True, 0.0, eps), mean, var
        # where, not a product: NaN / inf in the other rows must not reach the statistics
        m = (
            torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
            if mask is None
            else mask.reshape(-1, 1)
        )
        n = m.sum().to(dt).clamp(min=1)
        mean = torch.where(m, x, 0.0).sum(0) / n
        var = torch.where(m, x - mean, 0.0).pow(2).sum(0) / n
        y = (x - mean) * torch.rsqrt(var + eps)
        y = y if w is None else y * w
        y = y if b is None else y + b
    return y, mean.detach(), var.detach()
