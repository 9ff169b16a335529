"""Kernel tests run on the GPU when there is one, else on CPU tensors under Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before pkmem.ops.triton is imported: triton reads it when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def kernels(monkeypatch):
    """The kernel package with output poisoning on (NaN / sentinel before every launch)."""
    try:
        import pkmem.ops.triton as kernels
        from pkmem.ops.triton import _common
    except ImportError as e:  # pragma: no cover - triton is a dev dependency
        pytest.skip(f"triton kernels do not import: {e}")
    if not torch.cuda.is_available() and not _common.INTERPRET:
        pytest.skip("no CUDA device and the kernels were imported without TRITON_INTERPRET=1")
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    return kernels


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
