"""`ProductKeyMemory`: the product-key memory layer of Lample et al. 2019 ("Large Memory Layers
with Product Keys", §3), with the options of the paper's code (XLM), of product-key-memory and of
"Memory Layers at Scale" (the swilu gate).

    x ─ query network ─ norm ─► q (heads, k_dim) ─ product top-k over num_keys² slots ─► scores, slots
      ─ softmax/relu ─► weights ─ weighted sum of value rows (all heads, one table) ─► (gate) ─► (proj)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from pkmem import ops
from pkmem._util import not_allowed
from pkmem.ops import dispatch
from pkmem.ops.dispatch import check_backend
from pkmem.ops.reference import check_score, real_rows, score_weights, update_running_stats

QUERY_NORMS = ("batchnorm", "layernorm", "none")
GATES = (None, "swilu")
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise not_allowed(name, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cast(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``x`` in the linear layer's dtype, unless autocast decides the dtype."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(linear.weight.dtype)


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, skipped (no module call: host time per step) when it would be the identity."""
    return module(x) if module.training and module.p > 0 else x


def _plain_linear(linear: nn.Module) -> bool:
    """An ``nn.Linear`` itself, with no forward hooks (pruning, a subclass or a wrapper such as a
    LoRA or quantized layer keep their own forward): its bias may be folded into a BatchNorm."""
    hooks = (
        linear._forward_pre_hooks,
        linear._forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_forward_hooks,
    )
    return type(linear) is nn.Linear and not any(hooks)


def check_input(x, dim: int) -> None:
    """``x`` must be a floating-point tensor whose last dimension is ``dim``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x has dtype {what}: x must be a floating-point tensor (fp32, bf16, fp16)")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be dim={dim}")


def check_device(x: torch.Tensor, param: torch.Tensor) -> None:
    """``x`` and the layer's parameters (``param``) must be on one device, and not on the meta device."""
    if param.is_meta or x.is_meta:
        raise ValueError(
            "ProductKeyMemory cannot run on the meta device (its top-k search needs values): create it "
            "on a real device, or materialise it with .to_empty(device=...) and initialise its parameters"
        )
    if param.device != x.device:
        raise ValueError(
            f"x is on {x.device}, the layer's parameters on {param.device}: move one of them "
            "(layer.to(x.device))"
        )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses to build a graph: the layer's gradients are first order only
    (the weighted gather's backward has no derivative), so ``create_graph=True`` is a clear error."""

    @staticmethod
    def forward(ctx, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=True)
            raise RuntimeError(
                "ProductKeyMemory has first-order gradients only: a backward with create_graph=True "
                "(double backward, e.g. a gradient penalty) cannot go through it"
            )
        return grad


def _checked_output(out: torch.Tensor, x: torch.Tensor, fp16: bool) -> torch.Tensor:
    """The layer's output, with a first-order-only backward; in float16 (which overflows above
    65504), a warning when it is not finite (a host sync: float16 computations only)."""
    if fp16 and not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        warnings.warn(
            f"ProductKeyMemory: the float16 output holds NaN or infinity (|x| up to "
            f"{float(x.detach().abs().float().max()):.4g}; float16 overflows above 65504): use bfloat16 or "
            "float32, or scale the input down",
            RuntimeWarning,
            stacklevel=2,
        )
    if torch.is_grad_enabled() and out.requires_grad and not torch.compiler.is_compiling():
        return _FirstOrderOnly.apply(out)  # (a compiled graph refuses double backward itself)
    return out


def check_bool_mask(name: str, mask, shape: tuple, shape_text: str, meaning: str) -> None:
    """``mask`` must be a bool tensor of ``shape``; the error names ``name`` and what is allowed."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{name}={got} is not allowed: {name} must be a bool tensor of shape "
            f"{shape_text} = {tuple(shape)} ({meaning})"
        )


def masked_batch_norm(
    bn: nn.BatchNorm1d,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    backend: str = "auto",
    shift: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """BatchNorm over the rows of ``x + shift`` (T, C) whose ``mask`` is True (all rows if None).

    In training the statistics (and the running averages) use the real rows only, so padding does
    not shift them (one row trains too: torch's BatchNorm refuses to); in eval the running
    statistics are used. ``shift``: the preceding linear layer's bias, folded in. Output in x's
    dtype if 16-bit, else float32 (:func:`pkmem.ops.reference.batch_norm`; on CUDA one fused op).
    ``check=False``: the caller has checked the arguments (``x`` (T, C), ``mask`` bool of T).
    """
    batch_stats = bn.training or not bn.track_running_stats
    sync = getattr(bn, "masked_batch_norm", None)
    if batch_stats and sync is not None:  # statistics of the global batch (pkmem.distributed)
        return sync(x, mask, shift)
    track = bn.training and bn.track_running_stats
    # with a momentum the op updates the running statistics itself (in the kernel on CUDA)
    momentum = bn.momentum if track else None
    out, mean, var = (ops.batch_norm if check else dispatch.run_batch_norm)(
        x,
        bn.weight,
        bn.bias,
        mask,
        bn.eps,
        batch_stats,
        bn.running_mean,
        bn.running_var,
        backend,
        momentum,
        shift,
    )
    if track:  # num_batches_tracked counts batches with real rows and finite statistics (no sync)
        n = real_rows(x, mask)
        with torch.no_grad():
            finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
            bn.num_batches_tracked.add_(finite & (n > 0) if torch.is_tensor(n) else finite & (n > 0))
            if bn.momentum is None:  # cumulative average
                momentum = 1.0 / bn.num_batches_tracked.clamp(min=1)
                update_running_stats(bn.running_mean, bn.running_var, mean, var, n, momentum)
    return out


class QueryNetwork(nn.Module):
    """Linear layers ``dim -> *hidden -> out`` with ReLU between them and, with ``batchnorm``, a
    BatchNorm after each linear layer (as XLM's ``QueryMLP``)."""

    def __init__(self, dim: int, out: int, hidden: Sequence[int] = (), bias: bool = True, batchnorm=False):
        super().__init__()
        sizes = [dim, *hidden, out]
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in sizes[1:]) if batchnorm else None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto", check: bool = True
    ) -> torch.Tensor:
        """``check=False``: ``mask`` is known to be None or a bool tensor of ``x.shape[0]`` elements."""
        for i, linear in enumerate(self.linears):
            # before a BatchNorm the bias is added inside it (no bias add and bias-gradient sum here)
            fold = self.norms is not None and _plain_linear(linear)
            x = F.linear(_cast(x, linear), linear.weight) if fold else linear(_cast(x, linear))
            if self.norms is not None:
                x = masked_batch_norm(self.norms[i], x, mask, backend, linear.bias if fold else None, check)
            if i < len(self.linears) - 1:
                x = F.relu(x)
        return x


class ProductKeyMemory(nn.Module):
    """A product-key memory layer: ``(..., dim) -> (..., dim)``.

    Args:
        dim: input and output size.
        heads: number of memory heads; each has its own query and sub-keys, all read one value
            table and their outputs are summed (paper §3.3).
        num_keys: sub-keys per half; the memory has ``num_keys**2`` slots.
        topk: slots read per head (the per-half and the final top-k).
        k_dim: query size per head (each half ``k_dim // 2``).
        v_dim: value size (default ``dim``); if different, an output projection maps it to ``dim``.
        query_hidden: hidden sizes of the query MLP (default: one linear layer).
        query_bias: bias in the query network's linear layers.
        query_norm: "batchnorm" (paper, over real tokens only), "layernorm" (per half) or "none".
        normalize_query: L2-normalise each query half (XLM ``mem_normalize_query``).
        product_keys: False searches ``num_keys**2`` flat keys exhaustively (paper's ablation).
        score: "softmax" (paper), "relu" (Csordás et al.) or "none" (raw scores, XLM).
        temperature: scores are divided by it before the score function.
        gate: None or "swilu": ``proj(values_out * silu(W x))`` (Memory Layers at Scale).
        input_dropout, query_dropout, value_dropout, score_dropout: dropout probabilities.
        sparse_values: values get a row-sparse gradient (for ``torch.optim.SparseAdam``).
        values: an existing value table ``(num_keys**2, v_dim)`` to share (XLM ``mem_share_values``).
        zero_init_values: start the values at zero instead of N(0, v_dim**-0.5).
        value_dtype: the value table's dtype, ``torch.float32`` (default) or ``torch.bfloat16`` (or
            "float32" / "bfloat16"): half the bytes of the gathers, the gradient and the table;
            train it with ``make_optimizer(..., value_optimizer="exact_adam" | "lazy_adam")``
            (float32 moments, stochastic rounding). Default for a shared table: its own dtype.
        backend: "auto" (Triton kernels on CUDA when available), "torch" or "triton".

    The arguments are checked here, once; a call checks only its input (``x``, ``mask``) and
    picks each op's implementation once per device type and dtypes (the host's time per call).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        num_keys: int = 512,
        topk: int = 32,
        k_dim: int = 512,
        v_dim: int | None = None,
        *,
        query_hidden: Sequence[int] = (),
        query_bias: bool = True,
        query_norm: str = "batchnorm",
        normalize_query: bool = False,
        product_keys: bool = True,
        score: str = "softmax",
        temperature: float = 1.0,
        gate: str | None = None,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        score_dropout: float = 0.0,
        sparse_values: bool = False,
        values: nn.Parameter | None = None,
        zero_init_values: bool = False,
        value_dtype: torch.dtype | str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        v_dim = dim if v_dim is None else v_dim
        for name, val in [
            ("dim", dim),
            ("heads", heads),
            ("num_keys", num_keys),
            ("topk", topk),
            ("k_dim", k_dim),
            ("v_dim", v_dim),
        ]:
            _check(_is_int(val) and val > 0, name, val, "a positive int")
        _check(k_dim % 2 == 0, "k_dim", k_dim, "even (each query is split into two halves)")
        max_k = num_keys if product_keys else num_keys**2
        _check(topk <= max_k, "topk", topk, f"<= {max_k} ({'num_keys' if product_keys else 'num_keys**2'})")
        _check(
            isinstance(query_hidden, (list, tuple)) and all(_is_int(h) and h > 0 for h in query_hidden),
            "query_hidden",
            query_hidden,
            "a list or tuple of positive ints",
        )
        for name, flag in [
            ("query_bias", query_bias),
            ("normalize_query", normalize_query),
            ("product_keys", product_keys),
            ("sparse_values", sparse_values),
            ("zero_init_values", zero_init_values),
        ]:
            _check(isinstance(flag, bool), name, flag, "True or False")
        _check(query_norm in QUERY_NORMS, "query_norm", query_norm, f"one of {QUERY_NORMS}")
        temperature = check_score(score, temperature)  # the ops' own check of both
        _check(gate in GATES, "gate", gate, f"one of {GATES}")
        for name, p in [
            ("input_dropout", input_dropout),
            ("query_dropout", query_dropout),
            ("value_dropout", value_dropout),
            ("score_dropout", score_dropout),
        ]:
            _check(isinstance(p, (int, float)) and 0 <= p < 1, name, p, "in [0, 1)")
        self.dim, self.heads, self.num_keys, self.topk = dim, heads, num_keys, topk
        self.k_dim, self.v_dim, self.num_slots = k_dim, v_dim, num_keys**2
        self.query_norm, self.normalize_query, self.product_keys = query_norm, normalize_query, product_keys
        self.score, self.temperature, self.gate, self.sparse_values = (
            score,
            float(temperature),
            gate,
            sparse_values,
        )
        self.backend = check_backend(backend)
        self.usage_stats = None  # set by pkmem.metrics.UsageTracker to accumulate slot weights

        # query network: x -> (heads * k_dim), then the query normalisation
        self.query_net = QueryNetwork(dim, heads * k_dim, query_hidden, query_bias, query_norm == "batchnorm")
        self.query_ln = nn.LayerNorm(k_dim // 2) if query_norm == "layernorm" else None

        # keys: uniform in ±1/sqrt(size), as the paper's code
        half = k_dim // 2
        if product_keys:
            self.subkeys = nn.Parameter(
                torch.empty(heads, 2, num_keys, half).uniform_(-1, 1) / math.sqrt(half)
            )
        else:
            self.keys = nn.Parameter(
                torch.empty(heads, num_keys**2, k_dim).uniform_(-1, 1) / math.sqrt(k_dim)
            )

        # values: one table for all heads, N(0, v_dim^-0.5), or a shared one
        dtype = VALUE_DTYPES.get(value_dtype, value_dtype) if isinstance(value_dtype, str) else value_dtype
        _check(
            dtype is None or dtype in VALUE_DTYPES.values(),
            "value_dtype",
            value_dtype,
            "torch.float32, torch.bfloat16, 'float32', 'bfloat16' or None",
        )
        if dtype is not None and isinstance(values, torch.Tensor) and values.dtype != dtype:
            raise ValueError(
                f"value_dtype={value_dtype!r} is not allowed with a shared table of dtype {values.dtype}: "
                "leave value_dtype out (None) or give the table's dtype"
            )
        if values is not None and (
            not isinstance(values, nn.Parameter) or tuple(values.shape) != (self.num_slots, v_dim)
        ):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(
                f"values={shape} is not allowed: values must be an nn.Parameter of shape "
                f"(num_keys**2, v_dim) = {(self.num_slots, v_dim)}"
            )
        self.values = (
            values if values is not None else self._new_values(zero_init_values, dtype or torch.float32)
        )

        # output: optional swilu gate, projection when v_dim != dim or gated
        self.gate_proj = nn.Linear(dim, v_dim, bias=False) if gate == "swilu" else None
        self.out_proj = nn.Linear(v_dim, dim, bias=False) if (v_dim != dim or gate) else None
        self.input_dropout = nn.Dropout(input_dropout)
        self.query_dropout = nn.Dropout(query_dropout)
        self.score_dropout = nn.Dropout(score_dropout)
        self.value_dropout = nn.Dropout(value_dropout)

    # ---- inspection API -------------------------------------------------------------------------
    def query(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised queries ``(..., heads, k_dim)``, in the query network's dtype (16-bit
        under autocast with the BatchNorm or no norm, as torch's layers give it; float32 or float64
        otherwise).

        Like :meth:`lookup`, in training mode this is a forward step of the query network: it
        updates the BatchNorm running statistics and applies the query dropout (use ``eval()``
        to inspect without side effects)."""
        x2, m = self._flatten(x, mask)
        return self._query(x2, m).reshape(*x.shape[:-1], self.heads, self.k_dim)

    def lookup(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, indices)``, each ``(..., heads, topk)``: the slots read and their weights.

        Slot ``i`` is the sub-key pair ``(i // num_keys, i % num_keys)``. Masked positions get
        weight 0 and index -1.
        """
        x2, m = self._flatten(x, mask)
        w, idx = self._lookup(self._query(x2, m), m)
        shape = (*x.shape[:-1], self.heads, self.topk)
        return w.reshape(shape), idx.reshape(shape)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (..., dim)``, ``mask (...)`` bool with True = real token -> ``(..., dim)``, x's dtype."""
        x2, m = self._flatten(x, mask)  # (T, dim), (T,)
        x2 = _dropout(self.input_dropout, x2)
        w, idx = self._lookup(self._query(x2, m), m)  # (T, H, k) each
        if self.usage_stats is not None:
            self.usage_stats.update(idx, w)
        w = _dropout(self.score_dropout, w)
        T, J = x2.shape[0], self.heads * self.topk
        out = self.read_values(idx.reshape(T, J), w.reshape(T, J))
        out = _dropout(self.value_dropout, out)  # (T, v_dim), float32
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(_cast(x2, self.gate_proj)).to(out.dtype))
        if self.out_proj is not None:
            out = self.out_proj(_cast(out, self.out_proj))
        if m is not None:
            out = torch.where(m[:, None], out, 0.0)
        return _checked_output(out.to(x.dtype).reshape(*x.shape[:-1], self.dim), x, self._fp16(x))

    def _fp16(self, x: torch.Tensor) -> bool:
        """Whether this call computes in float16 (its input, its parameters or autocast)."""
        dev = x.device.type
        autocast16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
        return x.dtype == torch.float16 or self.values.dtype == torch.float16 or autocast16

    def _new_values(self, zero_init: bool, dtype: torch.dtype) -> nn.Parameter:
        """A new value table ``(num_slots, v_dim)`` of ``dtype``: N(0, v_dim**-0.5) drawn in float32
        then rounded, or zeros (a memory whose table is sharded across processes,
        :mod:`pkmem.distributed`, makes only its part)."""
        table = torch.zeros(self.num_slots, self.v_dim)
        if not zero_init:
            nn.init.normal_(table, std=self.v_dim**-0.5)
        return nn.Parameter(table.to(dtype))

    def read_values(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum_j weights[t, j] * values[indices[t, j]]``: ``(T, J), (T, J) -> (T, v_dim)``
        float32, the layer's one read of its value table (a table sharded across processes,
        :mod:`pkmem.distributed`, overrides it)."""
        return dispatch.run_weighted_gather(self.values, indices, weights, self.sparse_values, self.backend)

    # ---- steps ----------------------------------------------------------------------------------
    def _flatten(self, x: torch.Tensor, mask: torch.Tensor | None):
        check_input(x, self.dim)
        check_device(x, self.values)
        if mask is not None:
            check_bool_mask("mask", mask, x.shape[:-1], "x.shape[:-1]", "True = real token")
            mask = mask.reshape(-1).to(x.device)
            # padded rows read as zeros: whatever they hold (NaN from a fully masked attention row,
            # say) cannot reach the real tokens or the gradients
            return torch.where(mask[:, None], x.reshape(-1, self.dim), 0.0), mask
        return x.reshape(-1, self.dim), mask

    def _query(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # (T, H, 2, half) in the query network's dtype: 16-bit under autocast (the search then
        # takes 16-bit operands with float32 sums, as a matmul under autocast), else float32 / float64
        q = self.query_net(x, mask, self.backend, check=False).view(-1, self.heads, 2, self.k_dim // 2)
        if self.query_ln is not None:
            q = F.layer_norm(
                q,
                q.shape[-1:],
                self.query_ln.weight.to(q.dtype),
                self.query_ln.bias.to(q.dtype),
                self.query_ln.eps,
            )
        if self.normalize_query:
            q = F.normalize(q, dim=-1)
        return _dropout(self.query_dropout, q.flatten(-2))  # (T, H, k_dim)

    def _lookup(self, q: torch.Tensor, mask: torch.Tensor | None):
        if self.product_keys:  # (T, H, k) each; the kernel applies the score function in registers
            w, idx = dispatch.run_product_lookup(
                q, self.subkeys, self.topk, self.score, self.temperature, self.backend
            )
        else:
            scores, idx = ops.flat_topk(q, self.keys, self.topk, self.backend)
            w = score_weights(scores, self.score, self.temperature)
        if mask is not None:
            w = torch.where(mask[:, None, None], w, 0.0)
            idx = torch.where(mask[:, None, None], idx, -1)
        return w, idx

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys} ({self.num_slots} slots), "
            f"topk={self.topk}, k_dim={self.k_dim}, v_dim={self.v_dim}, query_norm={self.query_norm!r}, "
            f"score={self.score!r}, product_keys={self.product_keys}, gate={self.gate!r}, "
            f"sparse_values={self.sparse_values}"
            + ("" if self.values.dtype == torch.float32 else f", value_dtype={self.values.dtype}")
        )
