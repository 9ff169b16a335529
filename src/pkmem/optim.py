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

A memory is a module with an int ``num_slots`` (or ``num_memories``, as product-key-memory 0.3.0's
own ``PKM``) and a value table: a ``values`` Parameter (``pkmem.ProductKeyMemory``) or a ``values``
module with a ``weight`` Parameter (``pkmem.compat.PKM``, an ``nn.EmbeddingBag``). Its table is
sparse (row-sparse gradients) when the module has ``sparse_values=True`` or its ``values`` module has
``sparse=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["value_parameters", "param_groups", "make_optimizer", "MultiOptimizer", "clip_grad_norm"]


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


def make_optimizer(
    model: nn.Module,
    lr: float,
    value_lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    value_weight_decay: float = 0.0,
    value_betas: tuple[float, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; sparse value tables go to a ``SparseAdam`` (``value_lr``).
    ``value_betas``: the value tables' Adam betas (default ``betas``).

    Returns the AdamW alone when no memory has sparse values, else a :class:`MultiOptimizer`
    (AdamW, SparseAdam) whose SparseAdam group is also named ``"values"`` (and has ``sparse=True``).
    SparseAdam has no weight decay: ``value_weight_decay != 0`` with sparse values is a ValueError.
    """
    _check_number("lr", lr, positive=True)
    _check_number("value_lr", value_lr, positive=True)
    _check_number("eps", eps, positive=True)
    for name, bs in [("betas", betas), ("value_betas", betas if value_betas is None else value_betas)]:
        if (
            not isinstance(bs, (tuple, list))
            or len(bs) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in bs)
        ):
            raise ValueError(f"{name}={bs!r} is not allowed: {name} must be two numbers in [0, 1)")
    betas = (float(betas[0]), float(betas[1]))
    value_betas = betas if value_betas is None else (float(value_betas[0]), float(value_betas[1]))
    groups = param_groups(model, lr, value_lr, weight_decay, value_weight_decay)
    sparse_ids = {id(t) for t, sparse in _value_tables(model) if sparse and t.requires_grad}
    if sparse_ids and value_weight_decay != 0:
        raise ValueError(
            f"value_weight_decay={value_weight_decay!r} is not allowed with sparse_values=True: "
            "SparseAdam has no weight decay, use 0.0"
        )
    dense_groups, sparse_params = [], []
    for g in groups:
        if g["name"] == "values":
            g["betas"] = value_betas
            sparse_params = [p for p in g["params"] if id(p) in sparse_ids]
            g["params"] = [p for p in g["params"] if id(p) not in sparse_ids]
        if g["params"]:
            dense_groups.append(g)
    if not dense_groups and not sparse_params:
        raise ValueError(f"model={type(model).__name__} has no parameter with requires_grad=True to optimize")
    dense = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps) if dense_groups else None
    if not sparse_params:
        return dense
    sparse_group = {"params": sparse_params, "lr": value_lr, "name": "values", "sparse": True}
    sparse = torch.optim.SparseAdam([sparse_group], lr=value_lr, betas=value_betas, eps=eps)
    return MultiOptimizer([o for o in (dense, sparse) if o is not None])


# ---- gradient clipping --------------------------------------------------------------------------
def _grad_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of all ``grads`` together (float32 or wider), on ``device``; sparse grads coalesced."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()._values()  # duplicate rows must be summed before the norm
        dt = torch.promote_types(g.dtype, torch.float32)
        norms.append(torch.linalg.vector_norm(g, 2, dtype=dt).to(device))
    dt = norms[0].dtype
    for n in norms[1:]:
        dt = torch.promote_types(dt, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dt) for n in norms]), 2)


def _scale(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> None:
    if math.isinf(max_norm):
        return
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # no host sync: always multiply
    for g in grads:
        c = coef.to(device=g.device, dtype=g.dtype)
        if g.is_sparse:
            g._values().mul_(c)  # in place, also when uncoalesced (scaling is linear)
        else:
            g.mul_(c)


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
    and scaled in place. Non-finite norms are not checked (the gradients then become non-finite).

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
    rest_grads = [p.grad for p in params if p.grad is not None and id(p) not in value_ids]
    value_grads = [p.grad for p in values if p.grad is not None]
    first = next((g for g in rest_grads + value_grads), None)
    device = first.device if first is not None else torch.device("cpu")
    rest_norm = _grad_norm(rest_grads, device)
    value_norm = _grad_norm(value_grads, device)
    _scale(rest_grads, rest_norm, max_norm)
    _scale(value_grads, value_norm, value_max_norm)
    return rest_norm, value_norm
