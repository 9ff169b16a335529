"""Picks the implementation of each op: ``backend="auto" | "torch" | "triton"``.

``"auto"`` (the default, overridable with the environment variable ``PKMEM_BACKEND``) uses the
Triton kernels for CUDA tensors when triton imports, and the PyTorch reference otherwise. Asking
for ``"triton"`` where it cannot run is an error, never a silent fallback. The kernels also run on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before the first kernel use):
that is how CI tests them. Triton is imported lazily, on the first call that needs it.
"""

from __future__ import annotations

import os

import torch

from pkmem.ops import reference

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: backend must be one of {BACKENDS}")
    return backend


_KERNELS: tuple | None = None


def _triton_module():
    """``(pkmem.ops.triton, None)`` if the kernels import, else ``(None, reason)`` (imported once)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import pkmem.ops.triton as kernels

            _KERNELS = (kernels, None)
        except Exception as e:  # ImportError, or a triton too old for the kernels
            _KERNELS = (None, f"the Triton kernels do not import ({type(e).__name__}: {e})")
    return _KERNELS


def _interpreting() -> bool:
    kernels, _ = _triton_module()
    return kernels is not None and kernels.INTERPRET


_REASONS: dict[tuple, str | None] = {}


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot run on ``tensors`` (None if they can); remembered per device types,
    dtypes and ``TRITON_INTERPRET`` (this runs on every op call)."""
    key = (os.environ.get("TRITON_INTERPRET", "0"), *((t.device.type, t.dtype) for t in tensors))
    if key not in _REASONS:
        _REASONS[key] = _unavailable_reason(tensors)
    return _REASONS[key]


def _unavailable_reason(tensors: tuple[torch.Tensor, ...]) -> str | None:
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        return f"the tensors are on several device types {sorted(devices)}"
    device = devices.pop() if devices else "cpu"
    if device not in ("cuda", "cpu"):
        return f"the kernels need CUDA tensors (got {device} tensors)"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "the tensors are on the CPU (the kernels need CUDA tensors, or TRITON_INTERPRET=1 set)"
    bad = [t.dtype for t in tensors if t.is_floating_point() and t.dtype not in _KERNEL_DTYPES]
    if bad:
        return f"the kernels support float32, bfloat16 and float16 tensors (got {bad[0]})"
    _, reason = _triton_module()
    if reason is not None:
        return reason
    if device == "cpu" and not _interpreting():
        return "TRITON_INTERPRET=1 was set after the kernels were imported (set it before the first use)"
    if device == "cuda" and _interpreting():
        return "the kernels were imported under TRITON_INTERPRET=1, which runs them on CPU tensors only"
    return None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") for an op on ``tensors``."""
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get("PKMEM_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"PKMEM_BACKEND={env!r} is not allowed: it must be one of {BACKENDS}")
        backend = env
    if backend == "torch":
        return "torch"
    if backend == "auto":
        cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        return "triton" if cuda and triton_unavailable_reason(*tensors) is None else "torch"
    reason = triton_unavailable_reason(*tensors)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run here: {reason}. Use backend='auto' or 'torch'.")
    return "triton"


def _check_topk(topk: int, n: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 < topk <= n:
        raise ValueError(f"topk={topk!r} is not allowed: topk must be an int in [1, {n}]")


def product_topk(query: torch.Tensor, subkeys: torch.Tensor, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.product_topk`."""
    return product_lookup(query, subkeys, topk, "none", 1.0, backend)


def product_lookup(
    query: torch.Tensor,
    subkeys: torch.Tensor,
    topk: int,
    score: str = "softmax",
    temperature: float = 1.0,
    backend: str = "auto",
):
    """See :func:`pkmem.ops.reference.product_lookup` (the kernel applies the score function to the
    selected scores in registers, forward and backward)."""
    temperature = reference.check_score(score, temperature)
    if resolve_backend(backend, query, subkeys) == "torch":
        return reference.product_lookup(query, subkeys, topk, score, temperature)
    T, H, kd = query.shape
    if subkeys.dim() != 4 or subkeys.shape[0] != H or subkeys.shape[1] != 2 or 2 * subkeys.shape[3] != kd:
        raise ValueError(
            f"query {tuple(query.shape)} and subkeys {tuple(subkeys.shape)}: subkeys must be "
            f"(heads, 2, num_keys, k_dim // 2) = ({H}, 2, n, {kd // 2})"
        )
    n = subkeys.shape[2]
    _check_topk(topk, n)
    if n * n >= 2**31:
        raise ValueError(f"num_keys={n} is not allowed with backend='triton': num_keys**2 must be < 2**31")
    kernels, _ = _triton_module()
    return kernels.product_lookup(query, subkeys, topk, score, temperature)


def flat_topk(query, keys, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.flat_topk` (no kernel: flat keys are the paper's ablation)."""
    check_backend(backend)
    return reference.flat_topk(query, keys, topk)


def weighted_gather(values, indices, weights, sparse: bool = False, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.weighted_gather`."""
    if resolve_backend(backend, values, indices, weights) == "torch":
        return reference.weighted_gather(values, indices, weights, sparse)
    reference.check_indices_below(indices, values.shape[0], "values.shape[0]")
    kernels, _ = _triton_module()
    return kernels.weighted_gather(values, indices, weights, sparse)


def batch_norm(
    x,
    weight,
    bias,
    mask,
    eps: float,
    training: bool,
    running_mean=None,
    running_var=None,
    backend: str = "auto",
    momentum: float | None = None,
    shift=None,
):
    """See :func:`pkmem.ops.reference.batch_norm` (the kernels read x in its dtype, write the
    output and the gradient of x in x's dtype (float32 output for float32 x), and update the
    running statistics in their normalising pass)."""
    reference.check_batch_norm(x, weight, bias, mask, training, running_mean, running_var, momentum, shift)
    used = [t for t in (weight, bias, mask, shift) if t is not None]
    if not training or momentum is not None:
        used += [t for t in (running_mean, running_var) if t is not None]
    args = (x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)
    if resolve_backend(backend, x, *used) == "torch":
        return reference.batch_norm(*args)
    kernels, _ = _triton_module()
    return kernels.batch_norm(*args)
