"""A drop-in for lucidrains' ``product_key_memory.PKM`` (product-key-memory 0.3.0) on pkmem's ops.

Same constructor, forward signature, module and parameter names (a 0.3.0 ``state_dict`` loads with
``strict=True``), same initialisation order (one seed gives the same parameters) and the same outputs
and gradients for 0.3.0's working configurations. Where 0.3.0 is broken (its BatchNorm path,
``concat_values_and_combine`` ignoring the scores, ``mem_trainable_mask``) this module does what
0.3.0 intended; ``docs/compat.md`` lists every difference.

    x ─ (pre LN) ─ Linear ─► queries (token, half, head, dim_head) ─ LN or BN ─► half scores
      ─ (gumbel noise) ─ (coordinate-descent gates) ─ exact product top-k ─ softmax | relu
      ─ weighted sum of value rows ─ (per-head concat + Linear) ─ (output LN)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pkmem._util import not_allowed
from pkmem.layer import ProductKeyMemory as _LayerPKM
from pkmem.layer import _cast, check_bool_mask, check_input, masked_batch_norm
from pkmem.ops import dispatch, reference

__all__ = [
    "PKM",
    "MaskedBatchNorm1D",
    "coordinate_descent_topk_mask",
    "fetch_pkm_value_parameters",
    "fetch_optimizer_parameters",
]

# CoLT5's defaults for its coordinate-descent top-k, used by 0.3.0's ``differentiable_topk=True``.
CD_K_RATIO = 9 / 8
CD_ITERS = 20
CD_EPS = 0.1


def _fail(name: str, value, allowed: str):
    raise not_allowed(name, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def coordinate_descent_topk_mask(
    scores: torch.Tensor, k: float, n_iters: int = CD_ITERS, eps: float = CD_EPS
) -> torch.Tensor:
    """Soft top-k mask of ``scores`` along the last dimension by coordinate descent.

    Solves ``max_x <scores, x> + eps * H(x)`` subject to ``sum(x) = k`` and ``0 <= x <= 1``
    (Wright 2015, as used by CoLT5) through its dual: ``a`` (one per row, enforces the sum) and
    ``b <= 0`` (one per entry, enforces ``x <= 1``) are updated in turn, ``n_iters`` times, and
    ``x = exp((scores + a + b) / eps)``. Differentiable by plain autograd through the iterations.
    """
    log_k = torch.log(torch.tensor(k, dtype=scores.dtype, device=scores.device).clamp(min=1e-20))
    b = -scores
    a = None
    for _ in range(n_iters):
        a = eps * (log_k - ((scores + b) / eps).logsumexp(dim=-1, keepdim=True))  # rows sum to k
        b = -F.relu(scores + a)  # entries capped at 1
    return ((scores + a + b) / eps).exp()


class MaskedBatchNorm1D(nn.Module):
    """``BatchNorm1d`` (held as ``fn``, as 0.3.0 names it) over rows ``(R, C)``; training
    statistics use only the rows whose ``mask`` is True (see :func:`pkmem.layer.masked_batch_norm`)."""

    def __init__(self, fn: nn.BatchNorm1d):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_batch_norm(self.fn, x, mask).to(x.dtype)


class PKM(nn.Module):
    """Drop-in for ``product_key_memory.PKM`` 0.3.0: ``(..., dim) -> (..., dim)``.

    Args are those of 0.3.0: ``heads`` query heads, each with its own two sets of ``num_keys``
    sub-keys of size ``dim_head`` (so its query has ``2 * dim_head`` features); ``num_keys**2``
    value slots read ``topk`` at a time per head; ``use_layernorm`` (else BatchNorm) normalises each
    query half; ``pre_layernorm`` / ``norm_output`` add a LayerNorm before / after;
    ``non_competitive_gates`` uses relu instead of softmax on the scores; ``differentiable_topk`` adds
    CoLT5's coordinate-descent gates (same forward, different gradients);
    ``concat_values_and_combine`` reads ``dim_head``-sized values per head, concatenates heads and
    projects to ``dim``. ``backend`` (keyword only, not in 0.3.0) picks pkmem's op implementation.

    Identical to 0.3.0 (outputs and gradients, fp32 ~1e-5, after loading its ``state_dict``): every
    configuration 0.3.0 runs correctly, including dropouts and gumbel noise with a fixed seed (the
    global RNG is consumed in the same order and layout).

    Differences (0.3.0 is broken there; this class does what it intended):

    - ``use_layernorm=False``: one ``BatchNorm1d(dim_head)`` over every (token, head, half) query
      vector, training statistics over real tokens only (``input_mask``); 0.3.0 normalises the time
      axis or crashes.
    - ``concat_values_and_combine=True``: value rows are weighted by the scores before the per-head
      sum; 0.3.0 sums them unweighted (its queries and keys got no gradient).
    - ``mem_trainable_mask`` (bool, ``(num_keys**2,)``) works: the forward is unchanged and the
      contributions of slots marked False are constants (no gradient to their value rows nor
      through their weights); 0.3.0's shapes do not broadcast.
    - inputs and masks are validated (``ValueError``); any leading shape ``(..., dim)`` is accepted.

    As in 0.3.0, ``input_mask`` (bool, True = real token) only affects the BatchNorm statistics
    (and pkmem's usage statistics): outputs at masked positions are computed, not zeroed.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        num_keys: int = 128,
        topk: int = 32,
        dim_head: int = 128,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        use_layernorm: bool = True,
        pre_layernorm: bool = False,
        differentiable_topk: bool = False,
        concat_values_and_combine: bool = False,
        norm_output: bool = False,
        non_competitive_gates: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        for name, v in [
            ("dim", dim),
            ("heads", heads),
            ("num_keys", num_keys),
            ("topk", topk),
            ("dim_head", dim_head),
        ]:
            if not (_is_int(v) and v > 0):
                _fail(name, v, "a positive int")
        if topk > num_keys:
            _fail("topk", topk, f"<= num_keys={num_keys} (each half's top-k is taken over num_keys)")
        for name, p in [
            ("input_dropout", input_dropout),
            ("query_dropout", query_dropout),
            ("value_dropout", value_dropout),
            ("attn_dropout", attn_dropout),
        ]:
            if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
                _fail(name, p, "a number in [0, 1)")
        flags = {
            "use_layernorm": use_layernorm,
            "pre_layernorm": pre_layernorm,
            "differentiable_topk": differentiable_topk,
            "concat_values_and_combine": concat_values_and_combine,
            "norm_output": norm_output,
            "non_competitive_gates": non_competitive_gates,
        }
        for name, v in flags.items():
            if not (isinstance(v, (bool, int)) and v in (0, 1)):
                _fail(name, v, "a bool")
        self.backend = dispatch.check_backend(backend)
        self.dim, self.heads, self.num_keys, self.topk, self.dim_head = dim, heads, num_keys, topk, dim_head
        self.num_memories = self.num_slots = num_keys**2
        self.use_layernorm = bool(use_layernorm)
        self.differentiable_topk = bool(differentiable_topk)
        self.concat_values_and_combine = bool(concat_values_and_combine)
        self.usage_stats = None  # set by pkmem.metrics to accumulate slot weights

        # Modules are created in 0.3.0's order, so that one seed gives the same initial parameters
        # and named_parameters() (hence optimizer state) come in the same order.
        self.to_queries = nn.Linear(dim, 2 * heads * dim_head, bias=False)  # features (half, head, d)
        self.pre_layernorm = nn.LayerNorm(dim) if pre_layernorm else nn.Identity()
        self.norm = nn.LayerNorm(dim_head) if use_layernorm else MaskedBatchNorm1D(nn.BatchNorm1d(dim_head))
        self.keys = nn.Parameter(torch.zeros(heads, num_keys, 2, dim_head))  # (H, n, half, d)
        nn.init.normal_(self.keys, std=dim_head**-0.5)

        self.maybe_concat_combine = nn.Identity()
        if self.concat_values_and_combine:
            values = nn.Embedding(self.num_slots, dim_head)
            # the weighted per-head sum happens in the gather; 0.3.0's Linear sits at index 2
            self.maybe_concat_combine = nn.Sequential(
                nn.Identity(), nn.Flatten(1), nn.Linear(dim_head * heads, dim, bias=False)
            )
        else:
            values = nn.EmbeddingBag(self.num_slots, dim, mode="sum")
        nn.init.normal_(values.weight, std=values.weight.shape[-1] ** -0.5)
        self.values = values

        self.input_dropout = nn.Dropout(input_dropout)
        self.query_dropout = nn.Dropout(query_dropout)
        self.value_dropout = nn.Dropout(value_dropout)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.gate_activation = nn.ReLU() if non_competitive_gates else nn.Softmax(dim=-1)
        self.output_norm = nn.LayerNorm(dim) if norm_output else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        mem_trainable_mask: torch.Tensor | None = None,
        gumbel_noise_scale: float = 0.0,
        **kwargs,
    ) -> torch.Tensor:
        """``x (..., dim)``; ``input_mask (...)`` bool, True = real token; ``mem_trainable_mask``
        bool ``(num_keys**2,)``; ``gumbel_noise_scale >= 0``. Extra keyword arguments are ignored
        (as in 0.3.0)."""
        mask, trainable, noise_scale = self._check_inputs(
            x, input_mask, mem_trainable_mask, gumbel_noise_scale
        )
        lead, in_dtype = x.shape[:-1], x.dtype
        T, H, n, k, D = math.prod(lead), self.heads, self.num_keys, self.topk, self.dim_head

        x = _cast(x, self.to_queries)  # the module's dtype (0.3.0 fails on a mismatch), or autocast's
        x = self.pre_layernorm(x)
        x = self.input_dropout(x)
        q = self.to_queries(x).reshape(T, 2, H, D)  # (T, half, H, d)
        q = self._normalise(q, mask)
        q = self._query_dropout(q, lead)  # (T, H, half, d)
        q = q.reshape(T, H, 2 * D)
        subkeys = self.keys.transpose(1, 2)  # (H, half, n, d)

        if noise_scale > 0 or self.differentiable_topk:
            half = reference.subkey_scores(q, subkeys)  # (T, H, 2, n)
            if noise_scale > 0:
                half = half + self._gumbel(half) * noise_scale
            if self.differentiable_topk:
                soft = coordinate_descent_topk_mask(half, min(k * CD_K_RATIO, n))
                half = half * (soft + (1 - soft).detach())  # straight-through gates: value 1
            scores, idx = reference.topk_from_half_scores(half, k)  # (T, H, k) each
        else:
            scores, idx = dispatch.product_topk(q, subkeys, k, self.backend)  # (T, H, k) each

        attn = self.gate_activation(scores)  # (T, H, k)
        if self.usage_stats is not None:
            w, i = attn.detach(), idx
            if mask is not None:
                w = torch.where(mask[:, None, None], w, 0.0)
                i = torch.where(mask[:, None, None], i, -1)
            self.usage_stats.update(i, w)
        attn = self.attn_dropout(attn)

        out = self._read_values(idx, attn, trainable)  # (T, dim) or (T, H, dim_head)
        out = self.maybe_concat_combine(out)
        out = self.value_dropout(out)
        out = self.output_norm(out)
        return out.to(in_dtype).reshape(*lead, self.dim)

    # ---- steps ----------------------------------------------------------------------------------
    def _check_inputs(self, x, input_mask, trainable, noise_scale):
        check_input(x, self.dim)
        mask = None
        if input_mask is not None:
            check_bool_mask("input_mask", input_mask, x.shape[:-1], "x.shape[:-1]", "True = real token")
            mask = input_mask.reshape(-1).to(x.device)
        if trainable is not None:
            check_bool_mask(
                "mem_trainable_mask", trainable, (self.num_slots,), "(num_keys**2,)", "True = slot is trained"
            )
            trainable = trainable.to(self.values.weight.device)
        if isinstance(noise_scale, torch.Tensor) and noise_scale.numel() == 1:
            noise_scale = noise_scale.item()
        if (
            not isinstance(noise_scale, (int, float))
            or isinstance(noise_scale, bool)
            or not math.isfinite(noise_scale)
            or noise_scale < 0
        ):
            _fail("gumbel_noise_scale", noise_scale, "a finite number >= 0")
        return mask, trainable, float(noise_scale)

    def _normalise(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """LayerNorm of each query half, or one BatchNorm over all (token, half, head) vectors."""
        if self.use_layernorm:
            return self.norm(q)
        T, P, H, D = q.shape
        rows_mask = None if mask is None else mask[:, None].expand(T, P * H).reshape(-1)
        return self.norm(q.reshape(-1, D), rows_mask).view(T, P, H, D)

    def _query_dropout(self, q: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        """Dropout on ``(T, half, H, d)`` -> ``(T, H, half, d)``. While training, the mask is drawn on
        the layout (batch, half, head, time, d) of 0.3.0, so a seed drops the same entries."""
        if not (self.training and self.query_dropout.p > 0):
            return q.transpose(1, 2)
        B, t = (math.prod(lead[:-1]), lead[-1]) if len(lead) else (1, 1)
        T, P, H, D = q.shape
        q = self.query_dropout(q.view(B, t, P, H, D).permute(0, 2, 3, 1, 4).contiguous())
        return q.permute(0, 3, 2, 1, 4).reshape(T, H, P, D)

    @staticmethod
    def _gumbel(half: torch.Tensor) -> torch.Tensor:
        """Gumbel(0, 1) noise of ``half``'s shape ``(T, H, 2, n)``. The uniforms are drawn in the
        memory layout (H, 2, T, n) that 0.3.0's einsum output has, so a seed gives 0.3.0's noise."""
        T, H, P, n = half.shape
        u = torch.empty(H, P, T, n, dtype=half.dtype, device=half.device).uniform_(0, 1)
        u = u.permute(2, 0, 1, 3)
        neg_log_u = -torch.log(u.clamp(min=1e-20))  # Exp(1)
        return -torch.log(neg_log_u.clamp(min=1e-20))

    def _read_values(self, idx: torch.Tensor, attn: torch.Tensor, trainable: torch.Tensor | None):
        """Weighted sum of value rows: over heads and k ``(T, dim)``, or per head ``(T, H, dim_head)``
        with ``concat_values_and_combine``. Slots with ``trainable`` False are read as constants."""
        T, H, k = idx.shape
        table = self.values.weight
        rows, cols = (T * H, k) if self.concat_values_and_combine else (T, H * k)
        idx, attn = idx.reshape(rows, cols), attn.reshape(rows, cols)
        if trainable is None:
            out = dispatch.weighted_gather(table, idx, attn, False, self.backend)
        else:
            live = trainable[idx]
            out = dispatch.weighted_gather(
                table, torch.where(live, idx, -1), attn, False, self.backend
            ) + dispatch.weighted_gather(
                table.detach(), torch.where(live, -1, idx), attn.detach(), False, self.backend
            )
        out = out.to(table.dtype)
        return out.view(T, H, self.dim_head) if self.concat_values_and_combine else out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys} ({self.num_slots} slots), "
            f"topk={self.topk}, dim_head={self.dim_head}, use_layernorm={self.use_layernorm}, "
            f"differentiable_topk={self.differentiable_topk}, "
            f"concat_values_and_combine={self.concat_values_and_combine}"
        )


# ---- optimisation helpers (0.3.0's API) ----------------------------------------------------------
def fetch_pkm_value_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(value_params, rest)``: the value tables of every compat ``PKM`` and ``pkmem.ProductKeyMemory``
    in ``module`` (each shared table once), and all other parameters of ``module``."""
    if not isinstance(module, nn.Module):
        _fail("module", type(module).__name__, "an nn.Module")
    values: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, PKM):
            p = m.values.weight
        elif isinstance(m, _LayerPKM):
            p = m.values
        else:
            continue
        if id(p) not in seen:
            seen.add(id(p))
            values.append(p)
    rest = [p for p in module.parameters() if id(p) not in seen]
    return values, rest


def fetch_optimizer_parameters(module: nn.Module, pkm_learning_rate: float = 1e-2) -> list[dict]:
    """Two optimizer parameter groups: everything else (the optimizer's lr), then the memory values
    with ``lr=pkm_learning_rate``."""
    if not (
        isinstance(pkm_learning_rate, (int, float))
        and not isinstance(pkm_learning_rate, bool)
        and math.isfinite(pkm_learning_rate)
        and pkm_learning_rate >= 0
    ):
        _fail("pkm_learning_rate", pkm_learning_rate, "a finite number >= 0")
    values, rest = fetch_pkm_value_parameters(module)
    return [{"params": rest}, {"params": values, "lr": pkm_learning_rate}]
