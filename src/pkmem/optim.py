"""Optimisation helpers for models with memories: value parameter groups, sparse-row optimizers and
gradient clipping that treats the value tables apart.

The paper trains the memory values with Adam at lr 1e-3, apart from the rest of the model (§4.3);
its code (XLM) clips the values' gradients separately and uses SparseAdam for sparse values::

    opt = pkmem.optim.make_optimizer(model, lr=3e-4, value_lr=1e-3, weight_decay=0.1)
    ...
    loss.backward()
    pkmem.optim.clip_grad_norm(model, max_norm=1.0)
    opt.step()
    opt.zero_grad()

Row-sparse value optimizers (``make_optimizer(..., value_optimizer="lazy_adam" | "exact_adam")``,
:class:`RowAdam`): the layer's backward writes only the value rows a step read (no dense
``num_slots x v_dim`` gradient, no host sync), clipping reads their precomputed norms, and one fused
kernel updates those rows (float32 moments; 16-bit tables rounded stochastically). ``"lazy_adam"``
leaves untouched rows alone (the paper's sparse updates); ``"exact_adam"`` gives dense AdamW's
result at the cost of the touched rows only.

A memory is a module with an int ``num_slots`` (or ``num_memories``, as product-key-memory 0.3.0's
own ``PKM``) and a value table: a ``values`` Parameter (``pkmem.ProductKeyMemory``) or a ``values``
module with a ``weight`` Parameter (``pkmem.compat.PKM``, an ``nn.EmbeddingBag``). Its table is
sparse (row-sparse gradients) when the module has ``sparse_values=True`` or its ``values`` module has
``sparse=True``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pkmem.ops.rows import ROW_GRAD_ATTR, RowGrad, active_row_grad, rounding_seed, row_adam_update

__all__ = [
    "value_parameters",
    "param_groups",
    "make_optimizer",
    "MultiOptimizer",
    "RowAdam",
    "clip_grad_norm",
    "VALUE_OPTIMIZERS",
]

VALUE_OPTIMIZERS = ("adamw", "lazy_adam", "exact_adam", "sparse_adam")
ROW_MODES = ("lazy", "exact")
TABLE_DTYPES = (torch.float32, torch.bfloat16)


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not allowed: model must be an nn.Module")


def _check_number(name: str, value, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(
            f"{name}={value!r} is not allowed: {name} must be a number {'> 0' if positive else '>= 0'}"
        )


def _memory_classes() -> tuple[type, ...]:
    from pkmem.layer import ProductKeyMemory

    classes: tuple[type, ...] = (ProductKeyMemory,)
    try:  # the compat layer is optional
        from pkmem.compat import PKM

        classes += (PKM,)
    except (ImportError, AttributeError):
        pass
    return classes


def _value_table(module: nn.Module, classes: tuple[type, ...]) -> tuple[nn.Parameter, bool] | None:
    """``(table, sparse)`` if ``module`` is a memory, else None."""
    slots = getattr(module, "num_slots", getattr(module, "num_memories", None))  # num_memories: 0.3.0
    if not (isinstance(module, classes) or isinstance(slots, int)):
        return None
    values = getattr(module, "values", None)
    if isinstance(values, nn.Parameter):
        return values, bool(getattr(module, "sparse_values", False))
    if isinstance(values, nn.Module) and isinstance(getattr(values, "weight", None), nn.Parameter):
        sparse = bool(getattr(module, "sparse_values", False)) or bool(getattr(values, "sparse", False))
        return values.weight, sparse
    return None


def _value_tables(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Every value table once, in order of appearance, with its sparsity.

    A table shared by memories that disagree on sparsity is an error: its gradient would be a mix.
    """
    _check_module(model)
    classes = _memory_classes()
    tables: dict[int, tuple[nn.Parameter, bool]] = {}
    for name, m in model.named_modules():
        found = _value_table(m, classes)
        if found is None:
            continue
        table, sparse = found
        if id(table) in tables and tables[id(table)][1] != sparse:
            raise ValueError(
                f"memory {name!r} has sparse_values={sparse} but shares its value table with a memory "
                f"with sparse_values={not sparse}: memories sharing a table must agree on sparse_values"
            )
        tables.setdefault(id(table), (table, sparse))
    return list(tables.values())


def value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The value tables of every memory in ``model``, each once (shared tables too), in order."""
    return [t for t, _ in _value_tables(model)]


def param_groups(
    model: nn.Module,
    lr: float,
    value_lr: float = 1e-3,
    weight_decay: float = 0.0,
    value_weight_decay: float = 0.0,
) -> list[dict]:
    """Parameter groups for a torch optimizer, each marked with a ``"name"``.

    ``"decay"``: non-value parameters with ``ndim >= 2`` (``lr``, ``weight_decay``);
    ``"no_decay"``: non-value parameters with ``ndim < 2``, biases and norms (``lr``, no decay);
    ``"values"``: the value tables (``value_lr``, ``value_weight_decay``). Empty groups are omitted,
    and so are parameters with ``requires_grad=False``.
    """
    for name, v in [
        ("lr", lr),
        ("value_lr", value_lr),
        ("weight_decay", weight_decay),
        ("value_weight_decay", value_weight_decay),
    ]:
        _check_number(name, v)
    values = value_parameters(model)
    value_ids = {id(p) for p in values}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in value_ids:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {
            "params": [p for p in values if p.requires_grad],
            "lr": value_lr,
            "weight_decay": value_weight_decay,
            "name": "values",
        },
    ]
    return [g for g in groups if g["params"]]


def _holds_row_adam(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, MultiOptimizer):
        return any(_holds_row_adam(o) for o in optimizer.optimizers)
    return isinstance(optimizer, RowAdam)


def _refuse_grad_scaler(optimizer: torch.optim.Optimizer, what: str) -> None:
    """The error for a step driven by ``torch.amp.GradScaler``, after removing the attributes it set
    (it removes them only after a step that returns)."""
    for name in ("grad_scale", "found_inf"):
        optimizer.__dict__.pop(name, None)
    raise RuntimeError(
        f"{type(optimizer).__name__}.step() was driven by torch.amp.GradScaler: {what} does not "
        "support GradScaler: its unscaling and inf checks read .grad, which RowAdam's gradient rows "
        "bypass, so they would be applied loss-scaled and unchecked; train in bfloat16 autocast (no "
        "scaler needed), or with value_optimizer='adamw' or 'sparse_adam' where a scaler is needed"
    )


class MultiOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (e.g. AdamW for dense parameters, SparseAdam for sparse values).

    ``param_groups`` is the concatenation of the wrapped optimizers' groups (the same dict objects,
    so ``group["lr"] = ...`` reaches them); it is an ``Optimizer``, so LR schedulers and step hooks
    work. ``state_dict()`` holds one state dict per wrapped optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        if len(optimizers) == 1 and isinstance(optimizers[0], (list, tuple)):
            optimizers = tuple(optimizers[0])
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            got = [type(o).__name__ for o in optimizers]
            raise ValueError(f"optimizers={got} is not allowed: give one or more torch.optim.Optimizer")
        self.optimizers = list(optimizers)
        # the base class checks that no parameter is in two groups and keeps the same group dicts
        self._building = True
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._building = False
        if _holds_row_adam(self):
            # torch.amp.GradScaler then hands its scale to step() instead of unscaling .grad and
            # stepping: step() refuses it (RowAdam's rows bypass .grad: they would stay loss-scaled
            # and unchecked for inf); pkmem's StepGuard steps the wrapped optimizers, not this flag
            self._step_supports_amp_scaling = True

    def _sync_groups(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        """The wrapped optimizers' per-parameter states, merged (a new dict: read only)."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns an empty state: the real one is wrapped
        if value:
            raise AttributeError(
                "MultiOptimizer.state is read-only: it merges the wrapped optimizers' states"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Step every wrapped optimizer; ``closure`` (if any) is evaluated once, with grad enabled."""
        if "grad_scale" in self.__dict__:  # torch.amp.GradScaler.step(self): see __init__
            _refuse_grad_scaler(self, "a MultiOptimizer holding a RowAdam")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            got = len(saved) if isinstance(saved, list) else type(state_dict).__name__
            raise ValueError(
                f"state_dict holds {got} optimizer states: expected a MultiOptimizer state dict with "
                f"{len(self.optimizers)}"
            )
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
        self._sync_groups()  # load_state_dict replaces the wrapped optimizers' group dicts

    def add_param_group(self, param_group: dict) -> None:
        if not self._building:
            raise RuntimeError("MultiOptimizer.add_param_group: add the group to one of .optimizers instead")
        super().add_param_group(param_group)

    def __getstate__(
        self,
    ) -> dict:  # the base class would drop .optimizers; an LR scheduler's step patch goes
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        return f"MultiOptimizer({inner})"


class RowAdam(torch.optim.Optimizer):
    """Adam(W) for value tables that reads and writes only the rows read since the last step.

    ``RowAdam(tables, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, mode="lazy")``. Each
    table ``(num_slots, v_dim)`` (float32 or bfloat16) gets a :class:`~pkmem.ops.rows.RowGrad`:
    while this optimizer lives, the weighted gather's backward adds the rows it read there, and
    ``table.grad`` stays None (a gradient that reaches ``table.grad`` anyway, dense or sparse, is
    folded in). :meth:`step` runs one fused kernel over those rows (no host sync; the same inputs
    give the same bits); :meth:`zero_grad` drops them (``model.zero_grad()`` does not: the rows
    wait for the next step); :func:`clip_grad_norm` clips them (their norms are computed by the
    backward; the scale is applied inside the update). Gradient accumulation (several backward
    passes before a step) and shared tables add up. Under ``torch.compile`` the gather of such a
    table runs outside the graph (a graph break).

    ``mode="lazy"``: the rows read get the AdamW update with the step count of the table (bias
    correction as dense AdamW); untouched rows and their moments are left alone (the paper's sparse
    updates; ``torch.optim.SparseAdam`` does the same, with ``eps`` before the bias correction and
    no weight decay). ``mode="exact"``: the result equals ``torch.optim.AdamW``'s on the same
    gradients: a row untouched for some steps still decays and moves; this is applied when the row
    is next read, updated or saved (``last`` step per row, the coefficients of every step kept), so
    a step still costs only the rows read. Under ``mode="exact"`` the table in memory may lag for
    rows nobody read: :meth:`flush` brings every row up to date (``state_dict()`` of this optimizer
    and, after :meth:`watch`, of a module, flush first).

    The step count of each table lives on the device (``state["step"]``, a float32 0-dim tensor, as
    torch's fused AdamW keeps it), and :meth:`step` honours ``found_inf`` as torch's fused
    optimizers do (``_step_supports_amp_scaling``: :class:`pkmem.train.guard.StepGuard` sets
    ``optimizer.found_inf``, a one-element tensor, around the step; where it is nonzero the step
    drops the pending rows and changes nothing, step count included): a step needs no host sync.
    States saved with a Python int step count load and continue. ``torch.amp.GradScaler`` is not
    supported (its unscaling and its inf checks read ``.grad``, which these rows bypass; a step it
    drives raises): train in bfloat16 autocast, which needs no scaler.

    Moments are float32 whatever the table's dtype. A bfloat16 table is updated in float32 and
    rounded stochastically (``stochastic_rounding=True``, unbiased: small updates are not lost;
    the random bits are a function of ``seed``, the step, the table and the element) or to nearest.
    ``backend``: "auto" (the Triton kernel on CUDA), "torch" (the PyTorch twin) or "triton".
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        mode: str = "lazy",
        stochastic_rounding: bool = True,
        seed: int = 0,
        backend: str = "auto",
    ):
        from pkmem.ops.dispatch import check_backend

        if mode not in ROW_MODES:
            raise ValueError(f"mode={mode!r} is not allowed: mode must be one of {ROW_MODES}")
        _check_number("lr", lr)
        _check_number("eps", eps, positive=True)
        _check_number("weight_decay", weight_decay)
        _check_betas(betas)
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(
                f"stochastic_rounding={stochastic_rounding!r} is not allowed: it must be True or False"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} is not allowed: seed must be an int >= 0")
        self.mode, self.stochastic_rounding, self.seed = mode, stochastic_rounding, seed
        self.backend = check_backend(backend)
        self._row_grads: dict[int, RowGrad] = {}
        self._index: dict[int, int] = {}
        self._bounds: dict[int, int] = {}  # per table: the host's count of steps, >= the device's
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.dtype not in TABLE_DTYPES:
                what = (tuple(p.shape), p.dtype) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(
                    f"params holds {what}: RowAdam takes value tables, 2-D float32 or bfloat16 tensors"
                )
        super().add_param_group(param_group)
        for p in params:  # attach after the base class accepted the group (no duplicates)
            rg = RowGrad(p, owner=self)
            if self.mode == "exact":
                rg.before_read = _weak_method(self, "_before_read")
            setattr(p, ROW_GRAD_ATTR, rg)
            self._row_grads[id(p)] = rg
            self._index[id(p)] = len(self._index)

    def row_grad(self, table: torch.Tensor) -> RowGrad:
        """The :class:`~pkmem.ops.rows.RowGrad` of one of this optimizer's tables."""
        return self._row_grads[id(table)]

    _step_supports_amp_scaling = True  # step() reads self.found_inf if set (StepGuard), as fused AdamW

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), device=p.device, dtype=torch.float32)
            self._bounds[id(p)] = 0
            state["exp_avg"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            if self.mode == "exact":
                state["last"] = torch.zeros(p.shape[0], device=p.device, dtype=torch.int32)
                state["hist"] = torch.zeros(64, 3, device=p.device, dtype=torch.float32)
        return state

    def _step_count(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        """The table's step count as a float32 tensor on its device (a state saved with an int, or
        loaded onto another device, is converted once)."""
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.device != p.device or step.dtype != torch.float32:
            step = torch.as_tensor(step, dtype=torch.float32).to(p.device).reshape(())
            state["step"] = step
        return step

    def _bound(self, p: torch.Tensor, state: dict) -> int:
        """The host's count of the table's steps (>= the device's: skipped steps count here); read
        from the device once after a state is loaded (one host sync)."""
        if not state:
            return 0
        if id(p) not in self._bounds:
            self._bounds[id(p)] = int(self._step_count(p, state).item())
        return self._bounds[id(p)]

    def _args(self, group: dict, p: torch.Tensor, state: dict, salt: int = 0) -> dict:
        beta1, beta2 = group["betas"]
        seed = rounding_seed(self.seed, 0, 2 * self._index[id(p)] + salt)  # the kernel mixes in the step
        return {
            "step": self._step_count(p, state),
            "step_bound": self._bound(p, state),
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "exact": self.mode == "exact",
            "last": state.get("last"),
            "hist": state.get("hist"),
            "stochastic_rounding": self.stochastic_rounding,
            "seed": seed,
            "backend": self.backend,
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Update the rows of every table with a pending gradient (a table without one is skipped,
        its step count unchanged, as ``torch.optim.AdamW`` skips parameters without a gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        # GradScaler sets grad_scale (None after its unscale_(), which skipped the rows) with found_inf;
        # StepGuard sets found_inf alone
        if "grad_scale" in self.__dict__:
            _refuse_grad_scaler(self, "RowAdam")
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            raise RuntimeError(
                f"RowAdam.step(): found_inf={found_inf!r} is not allowed: it must be a one-element tensor"
            )
        for group in self.param_groups:
            for p in group["params"]:
                rg = self._row_grads[id(p)]
                rg.fold_grad(p)
                if not rg.pending:
                    continue
                was_sparse = rg.folded_sparse
                state = self._state(p)
                step = self._step_count(p, state)
                self._bounds[id(p)] = bound = self._bound(p, state) + 1
                skip = None
                if found_inf is not None:  # counted only where taken, on the device
                    skip = (found_inf.reshape(()).to(p.device) != 0).to(torch.float32)  # (a sum, or NaN)
                    step.add_(1 - skip)
                else:
                    step.add_(1)
                if self.mode == "exact" and state["hist"].shape[0] <= bound:
                    hist = state["hist"]
                    state["hist"] = torch.cat([hist, torch.zeros_like(hist)])
                row_adam_update(
                    p, state["exp_avg"], state["exp_avg_sq"], rg, rows="grad", found_inf=skip,
                    **self._args(group, p, state),
                )  # fmt: skip
                if self.mode == "exact" and was_sparse:
                    # a sparse gradient comes from another reader of the table (an EmbeddingBag):
                    # it reads rows without this optimizer's catch-up, so every row stays current
                    self._catch_up(group, p, "all")
        return loss

    def _catch_up(self, group: dict, p: torch.Tensor, rows) -> None:
        state = self.state.get(p)
        if self.mode != "exact" or not state or self._bound(p, state) == 0:
            return
        row_adam_update(
            p, state["exp_avg"], state["exp_avg_sq"], None, rows=rows, **self._args(group, p, state, 1)
        )

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @torch.no_grad()
    def _before_read(self, table: torch.Tensor, indices: torch.Tensor) -> None:
        """Exact mode: bring the rows ``indices`` will read up to the last step (before a gather)."""
        state = self.state.get(table)
        if not state or self._bound(table, state) == 0 or indices.numel() == 0:
            return
        flags = self._row_grads[id(table)].read_flags(table)
        flags.index_fill_(0, indices.reshape(-1).clamp(min=0).to(torch.long), 1)  # row 0 for skipped
        self._catch_up(self._group_of(table), table, flags)  # entries: harmless, it is exact anyway

    @torch.no_grad()
    def flush(self) -> None:
        """Exact mode: bring every row of every table up to the last step (a no-op when lazy)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._catch_up(group, p, "all")

    def watch(self, module: nn.Module) -> None:
        """Exact mode: :meth:`flush` before ``module.state_dict()`` (checkpoints hold current values)."""
        ref = weakref.ref(self)

        def hook(*args, **kwargs):
            opt = ref()
            if opt is not None:
                opt.flush()

        module.register_state_dict_pre_hook(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for rg in self._row_grads.values():
            rg.clear()

    def state_dict(self) -> dict:
        self.flush()  # exact mode: the saved state and the tables agree, whichever is saved first
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._bounds.clear()  # read again from the loaded step counts
        # the base class casts every floating state tensor to the table's dtype: restore the saved
        # dtypes (float32 moments of a bfloat16 table, the exact mode's int32 "last" counters)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def __repr__(self) -> str:
        return f"RowAdam(mode={self.mode!r}, tables={len(self._row_grads)})"


def _weak_method(obj, name: str):
    """``obj.name`` without keeping ``obj`` alive (a no-op once it is gone)."""
    ref = weakref.ref(obj)

    def call(*args, **kwargs):
        o = ref()
        if o is not None:
            return getattr(o, name)(*args, **kwargs)

    return call


def _check_betas(betas, name: str = "betas") -> None:
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"{name}={betas!r} is not allowed: {name} must be two numbers in [0, 1)")


def make_optimizer(
    model: nn.Module,
    lr: float,
    value_lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    value_weight_decay: float = 0.0,
    value_optimizer: str = "adamw",
    fused: bool | None = None,
    value_betas: tuple[float, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, the value tables as ``value_optimizer`` says
    (``value_betas``: the value tables' Adam betas, default ``betas``).

    ``fused``: torch's fused AdamW kernel (one pass per tensor instead of ~10 ``foreach`` passes);
    None (default): fused when every parameter of the AdamW is a CUDA tensor.

    ``value_optimizer``:

    - ``"adamw"``: the tables in the AdamW (dense gradients), except tables with sparse gradients
      (``sparse_values=True``), which go to a ``torch.optim.SparseAdam``;
    - ``"lazy_adam"`` / ``"exact_adam"``: a :class:`RowAdam` (``mode="lazy"`` / ``"exact"``): the
      backward writes only the rows read and one fused kernel updates them; lazy leaves untouched
      rows alone (the paper's sparse updates), exact equals dense AdamW;
    - ``"sparse_adam"``: ``torch.optim.SparseAdam`` (every table needs ``sparse_values=True``).

    With ``"lazy_adam"`` / ``"exact_adam"`` a step driven by ``torch.amp.GradScaler`` raises (its
    unscaling and inf checks read ``.grad``, which the rows bypass): train in bfloat16 autocast.

    Returns the AdamW alone when it holds every parameter, else a :class:`MultiOptimizer` (AdamW,
    then the value optimizer) whose value group is also named ``"values"``. SparseAdam has no weight
    decay: ``value_weight_decay != 0`` with it is a ValueError. A bfloat16 table under ``"adamw"``
    gets bfloat16 moments and round-to-nearest updates (torch's AdamW): a warning suggests the row
    optimizers, whose moments are float32 and whose updates round stochastically.
    """
    _check_number("lr", lr, positive=True)
    _check_number("value_lr", value_lr, positive=True)
    _check_number("eps", eps, positive=True)
    _check_betas(betas)
    _check_betas(betas if value_betas is None else value_betas, "value_betas")
    if value_optimizer not in VALUE_OPTIMIZERS:
        raise ValueError(
            f"value_optimizer={value_optimizer!r} is not allowed: value_optimizer must be one of "
            f"{VALUE_OPTIMIZERS}"
        )
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused={fused!r} is not allowed: fused must be True, False or None")
    betas = (float(betas[0]), float(betas[1]))
    value_betas = betas if value_betas is None else (float(value_betas[0]), float(value_betas[1]))
    groups = param_groups(model, lr, value_lr, weight_decay, value_weight_decay)
    tables = [(t, sparse) for t, sparse in _value_tables(model) if t.requires_grad]
    if value_optimizer == "sparse_adam":
        dense_tables = [t for t, sparse in tables if not sparse]
        if dense_tables:
            raise ValueError(
                "value_optimizer='sparse_adam' is not allowed with a dense value table: set "
                "sparse_values=True on every memory, or use 'lazy_adam' (row-sparse without it)"
            )
    if value_optimizer in ("adamw", "sparse_adam"):
        apart = {id(t) for t, sparse in tables if sparse}
    else:
        apart = {id(t) for t, _ in tables}
    if value_optimizer == "adamw":
        low = [t.dtype for t, sparse in tables if not sparse and t.dtype in (torch.bfloat16, torch.float16)]
        if low:
            warnings.warn(
                f"a {low[0]} value table under value_optimizer='adamw' gets {low[0]} moments and "
                "round-to-nearest updates; value_optimizer='exact_adam' (the same result as AdamW, "
                "float32 moments, stochastic rounding) or 'lazy_adam' keep the precision",
                stacklevel=2,
            )
    if apart and value_weight_decay != 0 and value_optimizer in ("adamw", "sparse_adam"):
        raise ValueError(
            f"value_weight_decay={value_weight_decay!r} is not allowed with sparse_values=True: "
            "SparseAdam has no weight decay, use 0.0 (or value_optimizer='lazy_adam')"
        )
    dense_groups, table_params = [], []
    for g in groups:
        if g["name"] == "values":
            g["betas"] = value_betas
            table_params = [p for p in g["params"] if id(p) in apart]
            g["params"] = [p for p in g["params"] if id(p) not in apart]
        if g["params"]:
            dense_groups.append(g)
    if not dense_groups and not table_params:
        raise ValueError(f"model={type(model).__name__} has no parameter with requires_grad=True to optimize")
    dense = None
    if dense_groups:
        if fused is None:
            fused = all(p.is_cuda for g in dense_groups for p in g["params"])
        dense = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if not table_params:
        return dense
    if value_optimizer in ("adamw", "sparse_adam"):
        group = {"params": table_params, "lr": value_lr, "name": "values", "sparse": True}
        values = torch.optim.SparseAdam([group], lr=value_lr, betas=value_betas, eps=eps)
    else:
        group = {"params": table_params, "lr": value_lr, "weight_decay": value_weight_decay, "name": "values"}
        mode = "lazy" if value_optimizer == "lazy_adam" else "exact"
        values = RowAdam([group], lr=value_lr, betas=value_betas, eps=eps, mode=mode)
        if mode == "exact":
            classes = _memory_classes()
            for m in model.modules():
                found = _value_table(m, classes)
                if found is not None and id(found[0]) in apart:
                    values.watch(m)
    return MultiOptimizer([o for o in (dense, values) if o is not None])


# ---- gradient clipping --------------------------------------------------------------------------
def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _grad_norm(grads: list[torch.Tensor], device: torch.device, rows: list[RowGrad] = ()) -> torch.Tensor:
    """L2 norm of all ``grads`` and pending ``rows`` together (float32 or wider), on ``device``;
    sparse grads coalesced. Dense grads are measured with one ``torch._foreach_norm`` per device and
    dtype (as ``torch.nn.utils.clip_grad_norm_``): a few launches, not one per parameter."""
    norms = []
    dense = []
    for g in grads:
        if g.is_sparse:
            v = g.coalesce()._values()  # duplicate rows must be summed before the norm
            norms.append(torch.linalg.vector_norm(v, 2, dtype=torch.promote_types(v.dtype, torch.float32)))
        elif g.numel():  # an empty grad adds 0 (and trips _foreach_norm on some CUDA builds)
            dense.append(g)
    for (_, dtype), group in _by_device_and_dtype(dense).items():
        wide = torch.promote_types(dtype, torch.float32)
        norms += torch._foreach_norm(group, 2, dtype=None if wide == dtype else wide)
    norms += [rg.sq_norm().sqrt() for rg in rows]
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    dt = torch.float32
    for d in {n.dtype for n in norms}:
        dt = torch.promote_types(dt, d)
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dt) for n in norms]), 2)


def _scale(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float, rows: list[RowGrad] = ()) -> None:
    if math.isinf(max_norm):
        return
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # no host sync: always multiply
    dense = []
    for g in grads:
        if g.is_sparse:
            g._values().mul_(coef.to(device=g.device, dtype=g.dtype))  # in place, also uncoalesced
        elif g.numel():
            dense.append(g)
    for (dev, dtype), group in _by_device_and_dtype(dense).items():
        torch._foreach_mul_(group, coef.to(device=dev, dtype=dtype))
    for rg in rows:
        rg.mul_(coef)  # applied by the row optimizer's update


def _row_grads(params: list[torch.Tensor]) -> list[RowGrad]:
    """The pending row gradients of ``params`` (a ``.grad`` of such a table is folded in first)."""
    out = []
    for p in params:
        rg = active_row_grad(p)
        if rg is None:
            continue
        rg.fold_grad(p)
        if rg.pending:
            out.append(rg)
    return out


def clip_grad_norm(
    model_or_params: nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    value_max_norm: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the value tables' gradients apart from the rest's; returns ``(rest_norm, value_norm)``.

    Each set is scaled in place so that its total L2 norm is at most its limit (``max_norm``;
    ``value_max_norm`` for the values, default ``max_norm``; ``math.inf`` only measures), as
    ``torch.nn.utils.clip_grad_norm_``. The norms are those before clipping, 0-dim float32 (or
    wider) tensors: no host sync. Sparse (COO) gradients are coalesced before their norm is taken
    and scaled in place. The row gradients of a :class:`RowAdam`'s tables are measured from the
    squared row norms the backward wrote, and their scale is applied by the optimizer's update.
    Non-finite norms are not checked (the gradients then become non-finite).

    With a model, the value tables are :func:`value_parameters`. With a plain iterable of
    parameters, no parameter is known to be a value table: all are clipped together with
    ``max_norm`` and ``value_norm`` is 0.
    """
    _check_number("max_norm", max_norm, positive=True)
    value_max_norm = max_norm if value_max_norm is None else value_max_norm
    _check_number("value_max_norm", value_max_norm, positive=True)
    if isinstance(model_or_params, nn.Module):
        values = value_parameters(model_or_params)
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor):
        values, params = [], [model_or_params]
    elif isinstance(model_or_params, Iterable) and not isinstance(model_or_params, (str, bytes, dict)):
        values, params = [], list(model_or_params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            bad = next(type(p).__name__ for p in params if not isinstance(p, torch.Tensor))
            raise ValueError(f"model_or_params holds a {bad}: it must be a model or an iterable of tensors")
    else:
        raise ValueError(
            f"model_or_params={type(model_or_params).__name__} is not allowed: give an nn.Module or an "
            "iterable of parameters"
        )
    value_ids = {id(p) for p in values}
    rest_params = [p for p in params if id(p) not in value_ids]
    rest_rows, value_rows = _row_grads(rest_params), _row_grads(values)
    rest_grads = [p.grad for p in rest_params if p.grad is not None]
    value_grads = [p.grad for p in values if p.grad is not None]
    first = next((g for g in rest_grads + value_grads), None)
    if first is not None:
        device = first.device
    else:
        device = next((rg.grad.device for rg in rest_rows + value_rows), torch.device("cpu"))
    rest_norm = _grad_norm(rest_grads, device, rest_rows)
    value_norm = _grad_norm(value_grads, device, value_rows)
    _scale(rest_grads, rest_norm, max_norm, rest_rows)
    _scale(value_grads, value_norm, value_max_norm, value_rows)
    return rest_norm, value_norm
