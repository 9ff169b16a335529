"""Memory usage statistics (paper §4.2), accumulated on the device without a host sync per step.

A memory module (``ProductKeyMemory``, ``pkmem.compat.PKM``) has an int ``num_slots`` and an
attribute ``usage_stats`` (None by default). When it is set, each forward calls
``usage_stats.update(indices, weights)`` with the ``(..., heads, topk)`` slots read and their
weights (index -1 and weight 0 for masked tokens). :class:`UsageStats` adds them up;
:class:`UsageTracker` attaches one to every memory of a model::

    with pkmem.metrics.track_usage(model) as tracker:
        for batch in loader:
            model(batch)
    tracker.report()  # {"layers.3.memory": {"usage": 0.97, "kl": 0.51, ...}, ...}

The metrics of a weight vector ``z`` (one accumulated weight per slot):

- ``usage``: fraction of slots with a non-zero weight (the paper's "memory usage");
- ``kl``: KL divergence of ``z / sum(z)`` to the uniform distribution, ``log N + sum z log z``
  (natural log, ``0 log 0 = 0``): 0 for a perfectly even use, ``log N`` for a single slot;
- ``gini``: Gini coefficient of ``z``: 0 for an even use, ``(N - 1) / N`` for a single slot;
- ``slots_50`` / ``slots_90`` / ``slots_99``: the smallest number of slots that together hold
  50 / 90 / 99 % of the total weight.

Weights are accumulated as absolute values, so that signed raw scores (``score="none"``) still
give a distribution of mass; softmax and relu weights are non-negative and unchanged.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch
from torch import nn

from pkmem.ops.reference import check_indices_below

__all__ = [
    "UsageStats",
    "UsageTracker",
    "track_usage",
    "usage",
    "kl_to_uniform",
    "gini",
    "slots_for_mass",
]

MASS_FRACTIONS = (0.5, 0.9, 0.99)


# ---- pure functions on a weight vector --------------------------------------------------------------
def _check_weights(z: torch.Tensor) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.dim() != 1 or z.numel() == 0 or not z.is_floating_point():
        what = (z.dtype, tuple(z.shape)) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z={what} is not allowed: z must be a non-empty 1-D floating-point tensor")
    if bool((z < 0).any()):
        raise ValueError("z has negative entries: z must hold non-negative weights (one per slot)")
    return z.double() if z.device.type != "mps" else z.float()


def _usage(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype).mean()


def _kl_to_uniform(z: torch.Tensor) -> torch.Tensor:
    total = z.sum()
    p = z / total  # NaN everywhere when total == 0
    return math.log(z.numel()) + torch.xlogy(p, p).sum()


def _gini(z: torch.Tensor) -> torch.Tensor:
    n = z.numel()
    x, _ = z.sort()  # ascending
    rank = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)
    return 2 * (rank * x).sum() / (n * x.sum()) - (n + 1) / n  # NaN when the total is 0


def _slots_for_masses(z: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    cum = z.sort(descending=True)[0].cumsum(0)
    total = cum[-1]
    share = (cum / total).contiguous()  # compared as ratios: exact when the fraction is (0.4 of 10 -> 4)
    count = torch.searchsorted(share, fractions.to(z.dtype).contiguous(), side="left") + 1
    return count.clamp(max=z.numel()) * (total > 0)


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is not allowed: fraction must be a number in (0, 1]")


def usage(z: torch.Tensor) -> torch.Tensor:
    """Fraction of entries of ``z`` (accumulated weight per slot) that are non-zero, a 0-dim tensor."""
    return _usage(_check_weights(z))


def kl_to_uniform(z: torch.Tensor) -> torch.Tensor:
    """``KL(z / sum(z) || uniform) = log N + sum p log p`` (natural log, ``0 log 0 = 0``).

    A 0-dim float64 tensor; NaN when ``z`` sums to 0.
    """
    return _kl_to_uniform(_check_weights(z))


def gini(z: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of ``z``: 0 when all entries are equal, ``(N - 1) / N`` for a single non-zero.

    A 0-dim float64 tensor; NaN when ``z`` sums to 0.
    """
    return _gini(_check_weights(z))


def slots_for_mass(z: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest number of entries of ``z`` whose sum is at least ``fraction`` of the total.

    A 0-dim int64 tensor; 0 when ``z`` sums to 0. ``fraction`` is in (0, 1].
    """
    _check_fraction(fraction)
    z = _check_weights(z)
    return _slots_for_masses(z, torch.tensor([float(fraction)], dtype=z.dtype, device=z.device))[0]


# ---- accumulation ---------------------------------------------------------------------------------
class UsageStats:
    """Accumulates, per slot, the weight read and the number of reads, and counts real tokens.

    Buffers (``weight`` float32 and ``reads`` int64 of size ``num_slots``, ``tokens`` a 0-dim int64)
    are made by :meth:`UsageTracker.start` on the memory's device, or else by the first ``update``
    on its device; ``update`` never syncs with the host.
    :meth:`compute` returns the metrics (one host sync). Before anything was accumulated, or when
    the accumulated weight is 0, ``compute`` gives ``usage`` 0, ``kl`` and ``gini`` NaN and
    ``slots_*`` 0.
    """

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots <= 0:
            raise ValueError(f"num_slots={num_slots!r} is not allowed: num_slots must be a positive int")
        self.num_slots = num_slots
        self.weight: torch.Tensor | None = None  # (num_slots,) float32: sum of |weight| per slot
        self.reads: torch.Tensor | None = None  # (num_slots,) int64: number of reads per slot
        self.tokens: torch.Tensor | None = None  # () int64: positions with at least one valid index

    def _init(self, device: torch.device) -> None:
        self.weight = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
        self.reads = torch.zeros(self.num_slots, dtype=torch.int64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._mark_static()

    def _to(self, device: torch.device) -> None:
        self.weight, self.reads, self.tokens = (t.to(device) for t in (self.weight, self.reads, self.tokens))
        self._mark_static()

    def _mark_static(self) -> None:
        """The buffers keep their addresses (they are only updated in place): tell ``torch.compile``,
        so that a compiled forward updating them can replay from CUDA graphs (mode="reduce-overhead").
        Not guarded: new buffers (another tracker) re-record the CUDA graphs instead of recompiling.
        Only once torch.compile is in use (``torch._dynamo`` imported: importing it takes a second)."""
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not torch.compiler.is_compiling():
            for t in (self.weight, self.reads, self.tokens):
                dynamo.mark_static_address(t, guard=False)

    @property
    def device(self) -> torch.device | None:
        """The buffers' device, None before they are made."""
        return None if self.weight is None else self.weight.device

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Add a batch: ``indices`` (int, -1 = masked) and ``weights``, both ``(..., heads, topk)``."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            what = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices has dtype {what}: indices must be an integer tensor")
        if not isinstance(weights, torch.Tensor) or weights.shape != indices.shape or indices.dim() < 2:
            what = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(
                f"weights={what} is not allowed with indices of shape {tuple(indices.shape)}: both must "
                "have the same shape (..., heads, topk)"
            )
        check_indices_below(indices, self.num_slots, "num_slots")
        if self.weight is None:
            self._init(indices.device)
        elif self.weight.device != indices.device:
            self._to(indices.device)
        idx = indices.reshape(-1).long()
        valid = idx >= 0
        w = weights.reshape(-1).to(device=idx.device, dtype=torch.float32).abs() * valid
        idx = idx.clamp(min=0)
        self.weight.index_add_(0, idx, w)
        self.reads.index_add_(0, idx, valid.long())
        per_token = valid.view(-1, indices.shape[-2] * indices.shape[-1])
        self.tokens += per_token.any(dim=1).sum()

    def reset(self) -> None:
        """Zero the accumulated statistics (the buffers keep their device)."""
        if self.weight is not None:
            self.weight.zero_()
            self.reads.zero_()
            self.tokens.zero_()

    def merge(self, other: UsageStats) -> UsageStats:
        """Add ``other``'s statistics into this one (e.g. from another process); returns self."""
        if not isinstance(other, UsageStats) or other.num_slots != self.num_slots:
            got = other.num_slots if isinstance(other, UsageStats) else type(other).__name__
            raise ValueError(
                f"other={got!r} is not allowed: other must be a UsageStats with num_slots={self.num_slots}"
            )
        if other.weight is None:
            return self
        if self.weight is None:
            self._init(other.weight.device)
        self.weight += other.weight.to(self.weight.device)
        self.reads += other.reads.to(self.reads.device)
        self.tokens += other.tokens.to(self.tokens.device)
        return self

    def all_reduce_(self, group=None, device: torch.device | str | None = None) -> UsageStats:
        """Sum the statistics over all processes with ``torch.distributed`` (no-op if not initialised).

        Every process must call it. A process that has not accumulated anything contributes zeros,
        created on ``device`` (default: the current CUDA device with the NCCL backend, else CPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.weight is None:
            if device is None:
                nccl = dist.get_backend(group) == "nccl"
                device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            self._init(torch.device(device))
        for t in (self.weight, self.reads, self.tokens):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict:
        """The statistics as tensors (``weight``, ``reads``, ``tokens``) plus ``num_slots``."""
        if self.weight is None:
            return {"num_slots": self.num_slots}
        return {
            "num_slots": self.num_slots,
            "weight": self.weight.clone(),
            "reads": self.reads.clone(),
            "tokens": self.tokens.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load statistics saved by :meth:`state_dict` (replaces the current ones)."""
        if not isinstance(state, dict) or state.get("num_slots") != self.num_slots:
            got = state.get("num_slots") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state has num_slots={got!r}: state must come from a UsageStats with "
                f"num_slots={self.num_slots}"
            )
        if "weight" not in state:  # nothing accumulated: zeroed (in place, if made)
            self.reset()
            return
        w, r, t = state["weight"], state["reads"], state["tokens"]
        if tuple(w.shape) != (self.num_slots,) or tuple(r.shape) != (self.num_slots,) or t.dim() != 0:
            raise ValueError(
                f"state has weight {tuple(w.shape)}, reads {tuple(r.shape)}, tokens {tuple(t.shape)}: "
                f"expected ({self.num_slots},), ({self.num_slots},) and ()"
            )
        if self.weight is not None:  # in place: the buffers keep their addresses (CUDA graphs)
            self.weight.copy_(w)
            self.reads.copy_(r)
            self.tokens.copy_(t)
            return
        self.weight = w.to(dtype=torch.float32).clone()
        self.reads = r.to(dtype=torch.int64).clone()
        self.tokens = t.to(dtype=torch.int64).clone()
        self._mark_static()

    def compute(self) -> dict:
        """The metrics (module docstring) as Python numbers; one host sync.

        Keys: ``usage``, ``kl``, ``gini``, ``slots_50``, ``slots_90``, ``slots_99``,
        ``read_fraction`` (fraction of slots read at least once, whatever the weight), ``tokens``
        and ``num_slots``.
        """
        if self.weight is None:
            out = {"usage": 0.0, "kl": math.nan, "gini": math.nan}
            out.update({f"slots_{round(f * 100)}": 0 for f in MASS_FRACTIONS})
            return {**out, "read_fraction": 0.0, "tokens": 0, "num_slots": self.num_slots}
        z = self.weight.double() if self.weight.device.type != "mps" else self.weight.cpu().double()
        fractions = torch.tensor(MASS_FRACTIONS, dtype=z.dtype, device=z.device)
        slots = _slots_for_masses(z, fractions).to(z.dtype)
        scalars = torch.stack(
            [
                _usage(z),
                _kl_to_uniform(z),
                _gini(z),
                (self.reads > 0).to(z.device, z.dtype).mean(),
                self.tokens.to(z.device, z.dtype),
            ]
        )
        u, kl, g, read_fraction, tokens, *slot_counts = torch.cat([scalars, slots]).tolist()
        out = {"usage": u, "kl": kl, "gini": g}
        out.update({f"slots_{round(f * 100)}": int(c) for f, c in zip(MASS_FRACTIONS, slot_counts)})
        return {**out, "read_fraction": read_fraction, "tokens": int(tokens), "num_slots": self.num_slots}

    def __repr__(self) -> str:
        return f"UsageStats(num_slots={self.num_slots}, device={self.device})"


# ---- tracking every memory of a model -----------------------------------------------------------
def _is_memory(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_slots", None), int) and hasattr(module, "usage_stats")


class UsageTracker:
    """Attaches a :class:`UsageStats` to every memory of ``model`` and reports their metrics.

    Memories are the submodules with an int ``num_slots`` and a ``usage_stats`` attribute, keyed by
    their name in ``model.named_modules()`` (a module reachable under several names appears once,
    under its first name); ``model`` itself, if it is a memory, is named ``"memory"``. Raises
    ValueError if the model holds no memory.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is not allowed: model must be an nn.Module")
        self._modules: dict[str, nn.Module] = {
            (name or "memory"): m for name, m in model.named_modules() if _is_memory(m)
        }
        if not self._modules:
            raise ValueError(
                f"model={type(model).__name__} holds no memory: expected a submodule with `num_slots` "
                "and `usage_stats` attributes (pkmem.ProductKeyMemory, pkmem.compat.PKM)"
            )
        self.stats: dict[str, UsageStats] = {n: UsageStats(m.num_slots) for n, m in self._modules.items()}
        self.active = False

    @property
    def names(self) -> list[str]:
        """The memories' names, in the order of ``model.named_modules()``."""
        return list(self._modules)

    @property
    def memories(self) -> dict[str, nn.Module]:
        """``{name: memory module}`` (a new dict)."""
        return dict(self._modules)

    def start(self) -> UsageTracker:
        """Attach fresh (zeroed) statistics to every memory and start accumulating; returns self.

        The statistics' buffers are made here, on each memory's device, and a restart zeroes them in
        place: a compiled forward that updates them keeps its graph (and its CUDA graphs)."""
        for name, m in self._modules.items():
            current = m.usage_stats
            if current is not None and current is not self.stats[name]:
                raise RuntimeError(
                    f"memory {name!r} is already tracked by another UsageTracker: stop it first"
                )
        for name, m in self._modules.items():
            stats = self.stats[name]
            devices = {p.device for p in m.parameters()}
            # one device: the buffers are made there now; else by the first update, on its device
            device = devices.pop() if len(devices) == 1 else None
            if device is not None and device.type == "meta":
                device = None
            if stats.weight is not None and (device is None or stats.device == device):
                stats.reset()
            else:
                stats = self.stats[name] = UsageStats(m.num_slots)
                if device is not None:
                    stats._init(device)
            m.usage_stats = stats
        self.active = True
        return self

    def stop(self) -> UsageTracker:
        """Detach the statistics (they are kept for :meth:`report`); returns self."""
        for name, m in self._modules.items():
            if m.usage_stats is self.stats[name]:
                m.usage_stats = None
        self.active = False
        return self

    def reset(self) -> None:
        """Zero the accumulated statistics (tracking goes on if started)."""
        for s in self.stats.values():
            s.reset()

    def all_reduce_(self, group=None) -> UsageTracker:
        """Sum every memory's statistics over processes (see :meth:`UsageStats.all_reduce_`)."""
        for s in self.stats.values():
            s.all_reduce_(group)
        return self

    def report(self) -> dict[str, dict]:
        """``{name: UsageStats.compute()}`` for every memory."""
        return {name: s.compute() for name, s in self.stats.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __enter__(self) -> UsageTracker:
        return self if self.active else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"UsageTracker(names={self.names}, active={self.active})"


def track_usage(model: nn.Module) -> UsageTracker:
    """A started :class:`UsageTracker` on ``model``, also usable as a context manager."""
    return UsageTracker(model).start()
