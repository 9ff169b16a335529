"""Row-sparse value gradients and the row-wise Adam(W) update of a value table (no host sync).

A value table ``(N, v)`` is read a few rows per token; a training step touches at most ``T * heads
* topk`` of its rows. :class:`RowGrad` holds the gradient of the rows a step touched, accumulated
over backward passes, on the device:

- ``grad`` ``(N, v)`` in the table's dtype: row ``r`` holds its gradient where ``touched[r]``;
- ``touched`` ``(N,)`` int8; ``sumsq`` ``(N,)`` float32: the squared norm of each touched row
  (the value gradient's norm for clipping without reading the rows again);
- ``bound``: a host-side upper bound of the number of touched rows (the update's grid);
- ``scale``: a pending factor (the clipping coefficient), applied when the rows are consumed.

:meth:`RowGrad.compact` lists the touched rows (``rows[:count]``, ascending, ``count`` on the
device: a prefix sum, no host sync). A row optimizer (:class:`pkmem.optim.RowAdam`) attaches a
``RowGrad`` to each table it owns (the table's ``_pkmem_row_grad`` attribute). While that optimizer
lives, the weighted gather's backward (:func:`pkmem.ops.weighted_gather`, both backends) adds the
rows it read into it and returns no dense gradient: ``table.grad`` stays None. Gradients that reach
``table.grad`` anyway (another op reading the table, ``torch.compile``) are folded in by the
optimizer (:meth:`RowGrad.fold_grad`).

:func:`row_adam_update` is one Adam(W) step over the rows (float32 moments; 16-bit tables rounded
stochastically or to nearest), lazy (untouched rows are left alone, the paper's sparse updates) or
exact (equal to dense AdamW: the steps a row missed are applied when it is next read or updated,
step by step in registers, from per-row "last step" counters and the per-step coefficients).
:func:`row_adam_reference` is its PyTorch twin; the Triton kernel is in ``pkmem.ops.triton.row_adam``.
"""

from __future__ import annotations

import weakref

import torch

__all__ = [
    "ROW_GRAD_ATTR",
    "RowGrad",
    "active_row_grad",
    "row_adam_update",
    "row_adam_reference",
    "step_coefficients",
    "device_step_coefficients",
    "rounding_seed",
]

ROW_GRAD_ATTR = "_pkmem_row_grad"


def active_row_grad(values: torch.Tensor) -> RowGrad | None:
    """The :class:`RowGrad` that takes ``values``' gradient rows, if a live optimizer attached one."""
    rg = getattr(values, ROW_GRAD_ATTR, None)
    return rg if rg is not None and rg.active else None


class RowGrad:
    """The row-sparse gradient of one value table, accumulated on the device (see the module doc)."""

    def __init__(self, table: torch.Tensor, owner: object | None = None):
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            what = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"table={what} is not allowed: table must be a 2-D tensor (num_slots, v_dim)")
        self._owner = weakref.ref(owner) if owner is not None else None
        self.grad: torch.Tensor | None = None
        self.touched: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # (N + 1,) int32 scratch of compact()
        self.count: torch.Tensor | None = None  # (1,) int32
        self.reads: torch.Tensor | None = None  # (N,) int8 scratch of before_read
        self.bound = 0  # host upper bound of the number of touched rows
        self.backwards = 0  # contributions since the last step / clear
        self.folded_sparse = False  # a sparse table.grad was folded in since the last step / clear
        self.scale: torch.Tensor | None = None
        self.before_read = None  # callable(table, indices) of an exact optimizer
        self._key = None
        from pkmem.ops.reference import row_gather_outside_graph

        row_gather_outside_graph()  # made now, in eager mode (torch.compile then finds it made)

    def __reduce__(self):  # a pickled table (torch.save(model)) leaves its optimizer's RowGrad behind
        return (type(None), ())

    @property
    def active(self) -> bool:
        """False once the owning optimizer is gone: the gather then returns dense gradients again."""
        return self._owner is None or self._owner() is not None

    @property
    def pending(self) -> bool:
        """Whether some gradient was added since the last step or :meth:`clear`."""
        return self.backwards > 0

    def prepare(self, table: torch.Tensor) -> None:
        """Allocate the buffers for ``table`` (again if its shape, device or dtype changed) and apply
        a pending scale (a backward after clipping adds to the clipped gradient, as with ``.grad``)."""
        key = (tuple(table.shape), table.device, table.dtype)
        if key != self._key:
            N, v = table.shape
            dev = table.device
            self.grad = torch.empty(N, v, device=dev, dtype=table.dtype)
            self.touched = torch.zeros(N, device=dev, dtype=torch.int8)
            self.sumsq = torch.zeros(N, device=dev, dtype=torch.float32)
            self.rows = torch.zeros(N + 1, device=dev, dtype=torch.int32)
            self.count = torch.zeros(1, device=dev, dtype=torch.int32)
            self.reads = None
            self.bound, self.backwards, self.scale, self._key = 0, 0, None, key
        if self.scale is not None:
            self._apply_scale()

    def _apply_scale(self) -> None:
        t = self.touched.bool()
        s = self.scale.to(torch.float32)
        scaled = (self.grad.float() * s).to(self.grad.dtype)
        self.grad.copy_(torch.where(t[:, None], scaled, self.grad))
        self.sumsq.copy_(torch.where(t, scaled.float().square().sum(1), self.sumsq))
        self.scale = None

    def added(self, entries: int) -> None:
        """Record a contribution of ``entries`` gathered entries (at most that many new rows)."""
        self.backwards += 1
        self.bound = min(self.grad.shape[0], self.bound + int(entries))

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, count)``: the touched rows, ascending, in ``rows[:count]`` (``rows`` has room for
        ``N``; ``count`` a ``(1,)`` int32 device tensor): a prefix sum and a scatter, no host sync."""
        N = self.touched.shape[0]
        pos = torch.cumsum(self.touched, 0, dtype=torch.int32)
        self.count.copy_(pos[-1:])
        dest = torch.where(self.touched.bool(), pos - 1, N)  # untouched rows: the spare slot N
        self.rows.scatter_(0, dest.long(), torch.arange(N, device=pos.device, dtype=torch.int32))
        return self.rows, self.count

    def sq_norm(self) -> torch.Tensor:
        """The squared L2 norm of the pending gradient (0-dim float32, no host sync)."""
        if not self.pending:
            dev = self.grad.device if self.grad is not None else "cpu"
            return torch.zeros((), device=dev, dtype=torch.float32)
        total = torch.where(self.touched.bool(), self.sumsq, 0.0).sum()
        return total if self.scale is None else total * self.scale.float().square()

    def mul_(self, coef: torch.Tensor) -> None:
        """Scale the pending gradient by ``coef`` (a 0-dim tensor), lazily: applied on consumption."""
        coef = coef.to(device=self.grad.device, dtype=torch.float32)
        self.scale = coef if self.scale is None else self.scale * coef

    @torch.no_grad()
    def fold_grad(self, table: torch.Tensor) -> None:
        """Move a dense or sparse (COO) ``table.grad`` into the pending rows and set ``table.grad``
        to None (dense: every row is touched; sparse: its rows, after a coalesce, which syncs)."""
        g = table.grad
        if g is None:
            return
        table.grad = None
        self.prepare(table)
        N = self.grad.shape[0]
        if g.is_sparse:
            g = g.coalesce()
            idx, vals = g.indices()[0], g.values()
            self.folded_sparse = True
        else:
            idx, vals = torch.arange(N, device=g.device), g
        idx = idx.to(self.grad.device)
        vals = vals.to(device=self.grad.device, dtype=torch.float32)
        was = self.touched[idx].bool()
        new = (torch.where(was[:, None], self.grad[idx].float(), 0.0) + vals).to(self.grad.dtype)
        self.grad[idx] = new
        self.sumsq[idx] = new.float().square().sum(1)
        self.touched[idx] = 1
        self.added(idx.numel())

    def consumed(self) -> None:
        """After an update that cleared ``touched`` of every listed row: nothing is pending."""
        self.bound, self.backwards, self.scale, self.folded_sparse = 0, 0, None, False

    def clear(self) -> None:
        """Drop the pending gradient (``optimizer.zero_grad()``)."""
        if self.pending:
            self.touched.zero_()
        self.bound, self.backwards, self.scale, self.folded_sparse = 0, 0, None, False

    def read_flags(self, table: torch.Tensor) -> torch.Tensor:
        """The ``(N,)`` int8 scratch that marks the rows a gather is about to read."""
        if self.reads is None or self.reads.shape[0] != table.shape[0] or self.reads.device != table.device:
            self.reads = torch.zeros(table.shape[0], device=table.device, dtype=torch.int8)
        return self.reads


# ---- the update -----------------------------------------------------------------------------------
def step_coefficients(lr: float, weight_decay: float, beta1: float, beta2: float, step: int):
    """``(step_size, bc2_sqrt, decay)`` of AdamW's step ``step`` (1-based), computed in float64 as
    ``torch.optim.AdamW`` does: ``lr / (1 - beta1**step)``, ``sqrt(1 - beta2**step)``, ``1 - lr * wd``."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, 1 - lr * weight_decay


def device_step_coefficients(
    step: torch.Tensor, lr: float, weight_decay: float, beta1: float, beta2: float
) -> torch.Tensor:
    """:func:`step_coefficients` of a step count held on the device (a 0-dim tensor), as a float32
    ``(3,)`` tensor on its device, computed there in float64: no host sync."""
    k = step.detach().to(torch.float64)
    bc1 = 1 - torch.pow(beta1, k)
    bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, k))
    return torch.stack([lr / bc1, bc2_sqrt, torch.full_like(k, 1 - lr * weight_decay)]).to(torch.float32)


def rounding_seed(seed: int, step: int, index: int = 0) -> int:
    """A 63-bit seed for the stochastic rounding of one table's step (splitmix64 of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


def _check_step(step, step_bound, found_inf, param: torch.Tensor) -> int:
    """The host's bound of the step number (``step`` itself when it is an int)."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != param.device or step.is_complex():
            raise ValueError(
                f"step is a tensor of shape {tuple(step.shape)} on {step.device}: a step count tensor must "
                f"be 0-dim, on the table's device ({param.device})"
            )
        if not isinstance(step_bound, int) or isinstance(step_bound, bool) or step_bound < 0:
            raise ValueError(
                f"step_bound={step_bound!r} is not allowed: a step count tensor needs step_bound, an int >= "
                "the step (the host's count of steps, for the exact mode's coefficient history)"
            )
        bound = step_bound
    elif isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        bound = step
    else:
        raise ValueError(f"step={step!r} is not allowed: step must be an int >= 0 or a 0-dim tensor")
    if found_inf is not None and (
        not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1 or found_inf.device != param.device
    ):
        what = found_inf
        if isinstance(found_inf, torch.Tensor):
            what = (tuple(found_inf.shape), str(found_inf.device))
        raise ValueError(
            f"found_inf={what!r} is not allowed: found_inf must be a one-element tensor on the table's "
            f"device ({param.device}), nonzero to skip the step"
        )
    return bound


def _check_update_args(param, exp_avg, exp_avg_sq, last, hist, step, exact) -> None:
    if param.dim() != 2 or exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
        raise ValueError(
            f"param {tuple(param.shape)}, exp_avg {tuple(exp_avg.shape)}, exp_avg_sq "
            f"{tuple(exp_avg_sq.shape)}: the moments must have the table's shape (N, v)"
        )
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"exp_avg has dtype {exp_avg.dtype}: the moments must be float32")
    if exact:
        if last is None or hist is None or last.shape != (param.shape[0],) or last.dtype != torch.int32:
            raise ValueError("the exact mode needs last (N,) int32 and hist (steps + 1, 3) float32")
        if hist.dim() != 2 or hist.shape[1] != 3 or hist.shape[0] <= step or hist.dtype != torch.float32:
            raise ValueError(
                f"hist has shape {tuple(hist.shape)}: it must be (at least step + 1 = {step + 1}, 3) float32"
            )


def row_adam_update(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: RowGrad | None,
    *,
    step: int | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    exact: bool = False,
    last: torch.Tensor | None = None,
    hist: torch.Tensor | None = None,
    rows: str | torch.Tensor = "grad",
    stochastic_rounding: bool = True,
    seed: int = 0,
    backend: str = "auto",
    found_inf: torch.Tensor | None = None,
    step_bound: int | None = None,
) -> None:
    """One Adam(W) step over rows of ``param`` ``(N, v)``, in place (``exp_avg``, ``exp_avg_sq``
    float32 ``(N, v)``; ``param`` float32 or bfloat16).

    ``rows="grad"``: the rows of ``grad`` (a :class:`RowGrad` with a pending gradient; its ``touched``
    flags are cleared and it is marked consumed), step number ``step`` (1-based) with ``lr``:
    ``p *= 1 - lr * weight_decay; m += (1 - beta1) (g - m); s = beta2 s + (1 - beta2) g²;
    p -= lr / (1 - beta1^step) * m / (sqrt(s) / sqrt(1 - beta2^step) + eps)``, as ``torch.optim.AdamW``.

    ``exact``: ``last`` ``(N,)`` int32 is the last step applied to each row and ``hist[k]`` the
    coefficients of step ``k`` (:func:`step_coefficients`; this call writes ``hist[step]``); the
    steps a row missed (``last[r] + 1 .. step - 1``) are applied first with a zero gradient, so the
    result equals dense AdamW's. Without a gradient, ``rows`` may also be ``"all"`` or an ``(N,)``
    int8 tensor of flags (cleared here): those rows are brought up to ``step`` (already applied).

    ``step`` may be an int or a 0-dim tensor on the table's device (the optimizer's step count: the
    kernel reads it there and computes the coefficients on the device, so no host sync); a tensor
    needs ``step_bound``, an int >= its value (the exact mode's ``hist`` must hold ``step_bound + 1``
    rows). ``found_inf`` (a one-element tensor on the device, as ``torch.amp.GradScaler`` and the
    fused optimizers use it): where nonzero, the rows of ``grad`` are consumed (their ``touched``
    flags cleared) and nothing else changes: parameters, moments, ``last`` and ``hist`` stay. The
    Triton kernel reads both on the device; the PyTorch twin reads them on the host.

    16-bit tables: the new rows are rounded stochastically (unbiased; random bits from ``seed``,
    the step, the row and the column: the same inputs give the same bits) or, with
    ``stochastic_rounding=False``, to nearest.
    """
    bound = _check_step(step, step_bound, found_inf, param)
    _check_update_args(param, exp_avg, exp_avg_sq, last, hist, bound, exact)
    has_grad = isinstance(rows, str) and rows == "grad"
    if has_grad and (grad is None or not grad.pending):
        raise ValueError("rows='grad' needs a RowGrad with a pending gradient")
    if not has_grad and not exact:
        raise ValueError(f"rows={rows!r} is not allowed without exact=True: only the exact mode catches up")
    from pkmem.ops.dispatch import resolve_backend

    if resolve_backend(backend, param, exp_avg, exp_avg_sq) == "torch":
        row_adam_reference(
            param, exp_avg, exp_avg_sq, grad, step=int(step), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, exact=exact, last=last, hist=hist, rows=rows,
            stochastic_rounding=stochastic_rounding, seed=seed,
            skip=found_inf is not None and bool(found_inf.reshape(()) != 0),
        )  # fmt: skip
    else:
        from pkmem.ops.triton.row_adam import row_adam_update as kernel

        kernel(
            param, exp_avg, exp_avg_sq, grad, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, exact=exact, last=last, hist=hist, rows=rows,
            stochastic_rounding=stochastic_rounding, seed=seed, found_inf=found_inf,
        )  # fmt: skip
    if has_grad:
        grad.consumed()


def _round_to(x: torch.Tensor, dtype: torch.dtype, stochastic: bool, seed: int) -> torch.Tensor:
    """``x`` (float32) in ``dtype``: to nearest, or (bfloat16) stochastically from a generator seeded
    by ``seed`` (the PyTorch twin's own random bits: not the kernel's)."""
    if dtype == torch.float32:
        return x
    if not stochastic or dtype != torch.bfloat16:
        return x.to(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed & (2**63 - 1))
    noise = torch.randint(0, 1 << 16, x.shape, generator=g, dtype=torch.int32).to(x.device)
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


@torch.no_grad()
def row_adam_reference(
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
    rows: str | torch.Tensor = "grad",
    stochastic_rounding: bool = True,
    seed: int = 0,
    skip: bool = False,
) -> None:
    """PyTorch twin of :func:`row_adam_update` (same arguments, ``step`` an int, ``skip`` for a
    nonzero ``found_inf``; the caller marks ``grad`` consumed). Its stochastic rounding draws its
    own random bits (not the kernel's)."""
    dev, f32 = param.device, torch.float32
    has_grad = isinstance(rows, str) and rows == "grad"
    if has_grad:
        r = grad.touched.nonzero().flatten()
        grad.touched[r] = 0
        if skip:  # a skipped step: its gradient rows are dropped, nothing else changes
            return
        g = grad.grad[r].float()
        if grad.scale is not None:
            g = g * grad.scale.float()
    elif isinstance(rows, str) and rows == "all":
        r = torch.arange(param.shape[0], device=dev)
    else:
        r = rows.nonzero().flatten()
        rows.zero_()

    def c(x: float) -> torch.Tensor:  # a float32 constant, as the kernel's scalar arguments
        return torch.tensor(x, dtype=f32, device=dev)

    one_minus_b1, b2, one_minus_b2, e = c(1 - beta1), c(beta2), c(1 - beta2), c(eps)
    if exact:
        if has_grad:
            hist[step] = torch.tensor(step_coefficients(lr, weight_decay, beta1, beta2, step), dtype=f32)
        else:
            r = r[last[r] < step]  # rows already up to date are left alone
    p, m, s = param[r].float(), exp_avg[r], exp_avg_sq[r]
    if exact and r.numel():  # the steps each row missed, with a zero gradient
        behind_from = last[r].long()
        stop = step if has_grad else step + 1
        for k in range(int(behind_from.min()) + 1, stop):
            behind = (behind_from < k)[:, None]
            step_size, bc2_sqrt, decay = hist[k].to(dev)
            p2 = p * decay
            m2 = m + one_minus_b1 * (0.0 - m)
            s2 = s * b2
            p2 = p2 - step_size * (m2 / (torch.sqrt(s2) / bc2_sqrt + e))
            p, m, s = torch.where(behind, p2, p), torch.where(behind, m2, m), torch.where(behind, s2, s)
        last[r] = step
    if has_grad:
        step_size, bc2_sqrt, decay = (c(x) for x in step_coefficients(lr, weight_decay, beta1, beta2, step))
        p = p * decay
        m = m + one_minus_b1 * (g - m)
        s = s * b2 + one_minus_b2 * g * g
        p = p - step_size * (m / (torch.sqrt(s) / bc2_sqrt + e))
    # through .data: a catch-up before a gather must not bump the version of a table that an
    # earlier gather of this forward saved for its backward (it changes no row that gather read)
    param.data[r] = _round_to(p, param.dtype, stochastic_rounding, rounding_seed(seed, step))
    exp_avg[r], exp_avg_sq[r] = m, s
