"""Non-finite steps skipped on the device, as ``torch.amp.GradScaler`` skips them: no host sync.

:class:`StepGuard` replaces ``optimizer.step()`` in the training loop. Each step it forms one flag on
the device, "the loss and the gradient norms are finite", and the optimizer's update applies only
when the flag is set:

- On a CPU (where reading the flag costs nothing: the ops have already run) the step is taken or
  not.
- Adam and AdamW (what :func:`pkmem.optim.make_optimizer` builds for dense parameters) run their
  fused kernel, which takes the flag as ``found_inf`` (the mechanism ``GradScaler`` uses): a flagged
  step leaves parameters, moments and step counts untouched.
- An optimizer that declares it takes ``found_inf`` (``_step_supports_amp_scaling``, as torch's
  fused optimizers do) gets the flag the same way: :class:`pkmem.optim.RowAdam`
  (``value_optimizer="lazy_adam"`` / ``"exact_adam"``) among them, whose kernel reads the flag and
  its step count on the device.
- Any other optimizer (``SparseAdam`` for ``sparse_values=True`` tables, an optimizer of your own):
  what its step may change is copied first and put back with ``torch.where`` when the flag is not
  set. For sparse gradients only the rows they touch are copied; for dense ones the parameters and
  their state, which costs their size in memory. A step count kept as a Python number (SparseAdam's)
  still counts a skipped step.

The guard counts skipped steps on the device; :meth:`StepGuard.read` (called at log steps, where
the loop syncs anyway) returns how many were skipped and the longest run of them in a row.
"""

from __future__ import annotations

import torch

from pkmem.optim import MultiOptimizer

__all__ = ["StepGuard", "finite_flag"]


def finite_flag(*values: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the first value's device: every element of every value is finite."""
    dev, dtype = values[0].device, values[0].dtype
    # the loop's loss and norms (0-dim floats of one dtype and device): 3 launches; a mixed stack
    # could cast a large int to an infinite float16, so other values are checked one by one
    if all(v.dim() == 0 and v.device == dev and v.dtype == dtype and v.is_floating_point() for v in values):
        return torch.isfinite(torch.stack([v.detach() for v in values])).all()
    ok = torch.ones((), dtype=torch.bool, device=dev)
    for v in values:
        ok = ok & torch.isfinite(v.detach()).all().to(ok.device)
    return ok


def _leaves(optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that step parameters (a MultiOptimizer's, nested ones flattened)."""
    if isinstance(optimizer, MultiOptimizer):
        return [leaf for o in optimizer.optimizers for leaf in _leaves(o)]
    return [optimizer]


def _use_fused(opt: torch.optim.Optimizer) -> bool:
    """Switch an Adam / AdamW to its fused kernel (which honours ``found_inf``); False if it cannot."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(g.get("differentiable") for g in opt.param_groups) or not params:
        return False
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = _get_fused_kernels_supported_devices()
    if not all(p.is_floating_point() and not p.is_complex() and p.device.type in supported for p in params):
        return False
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, None
        for p in g["params"]:  # a state loaded from a non-fused run keeps its step on the host
            st = opt.state.get(p)
            if st and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
    opt._step_supports_amp_scaling = True
    return True


def _on_cpu(opt: torch.optim.Optimizer) -> bool:
    return all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"])


class _Restore:
    """Copies of what a step of ``opt`` may change, put back where the step's flag is not set."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.saved: list = []

    def before(self) -> None:
        self.saved = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.opt.state.get(p, {})
                tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                rows = None
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    rows = p.grad.indices()[0]
                    tensors = {k: v for k, v in tensors.items() if v.shape == p.shape}
                    copy = {k: v[rows].clone() for k, v in tensors.items()}
                    self.saved.append((p, rows, p.detach()[rows].clone(), copy, bool(state)))
                else:
                    copy = {k: v.clone() for k, v in tensors.items()}
                    self.saved.append((p, rows, p.detach().clone(), copy, bool(state)))

    @torch.no_grad()
    def after(self, ok: torch.Tensor) -> None:
        for p, rows, old, old_state, had_state in self.saved:
            state = self.opt.state.get(p, {})
            pairs = [(p, old)]
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k in old_state:
                    pairs.append((v, old_state[k]))
                elif not had_state and (rows is None or v.shape == p.shape):  # created by this step
                    pairs.append((v, torch.zeros_like(v if rows is None else v[rows])))
            for new, before in pairs:
                if rows is None:
                    new.copy_(torch.where(ok.to(new.device), new, before))
                else:
                    new.index_copy_(0, rows, torch.where(ok.to(new.device), new[rows], before))
        self.saved = []


class StepGuard:
    """``step(loss, *norms)``: ``optimizer.step()`` if every value is finite, else nothing, on the device.

    Args:
        optimizer: a torch optimizer or a :class:`pkmem.optim.MultiOptimizer`; off the CPU its Adam /
            AdamW are switched to their fused kernel (see the module's docstring).
        on_device: True: skip on the device everywhere (as on CUDA, the CPU included: for tests);
            None (default): on a CPU, read the flag instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, on_device: bool | None = None):
        self.optimizer = optimizer
        leaves = _leaves(optimizer)
        self._synced = [] if on_device else [o for o in leaves if _on_cpu(o)]
        rest = [o for o in leaves if o not in self._synced]
        self._fused = [o for o in rest if _use_fused(o) or getattr(o, "_step_supports_amp_scaling", False)]
        self._restore = [_Restore(o) for o in leaves if o not in self._fused and o not in self._synced]
        self._counts = None  # skipped since the last read, the current run, the longest run

    def step(self, loss: torch.Tensor, *norms: torch.Tensor) -> torch.Tensor:
        """Step the optimizer where ``loss`` and ``norms`` are finite; returns the 0-dim bool flag."""
        ok = finite_flag(loss, *norms)
        found_inf = (~ok).to(torch.float32)
        for o in self._fused:
            o.found_inf = found_inf.to(o.param_groups[0]["params"][0].device)
        try:
            for r in self._restore:
                r.before()
            if not self._synced:
                self.optimizer.step()
            else:  # each optimizer on its own: those on a CPU only if the flag is set
                take = bool(ok)
                for o in _leaves(self.optimizer):
                    if take or o not in self._synced:
                        o.step()
        finally:  # as GradScaler does: the flag lives only around the step
            for o in self._fused:
                if hasattr(o, "found_inf"):
                    del o.found_inf
        for r in self._restore:
            r.after(ok)
        bad = (~ok).to(torch.int64)
        if self._counts is None:
            self._counts = torch.zeros(3, dtype=torch.int64, device=ok.device)
        c = self._counts
        c[0] += bad
        c[1] = (c[1] + 1) * bad
        c[2] = torch.maximum(c[2], c[1])
        return ok

    def read(self) -> tuple[int, int]:
        """``(skipped, longest run in a row)`` since the last read (one host sync); a run still going
        on counts in the next read too."""
        if self._counts is None:
            return 0, 0
        skipped, run, longest = self._counts.tolist()
        self._counts[0] = 0
        self._counts[2] = run
        return skipped, longest
