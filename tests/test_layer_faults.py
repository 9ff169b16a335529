"""Clear errors and warnings of the layer instead of internal errors or silent NaN."""

import warnings

import pytest
import torch

from pkmem import ProductKeyMemory


def _mem(**kw) -> ProductKeyMemory:
    torch.manual_seed(0)
    return ProductKeyMemory(32, heads=2, num_keys=8, topk=4, k_dim=16, **kw)


@pytest.mark.parametrize("sparse", [False, True])
def test_double_backward_is_a_clear_error(sparse):
    mem = _mem(sparse_values=sparse)
    x = torch.randn(5, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph=True"):
        torch.autograd.grad(mem(x).sum(), x, create_graph=True)  # as a gradient penalty starts
    # first order, as before
    x.grad = None
    mem(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_float16_overflow_is_said():
    x = (torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 6e4).clamp(-65000, 65000).half()
    with pytest.warns(RuntimeWarning, match=r"float16 output holds NaN or infinity \(\|x\| up to 6\.4"):
        y = _mem().half()(x)
    assert not torch.isfinite(y).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _mem().half()(x / 1000)  # in range: no warning
        _mem()(x.float())  # float32: no check


def test_meta_and_device_mismatch_are_clear_errors():
    with torch.device("meta"):
        mem = _mem()
    for x in (torch.randn(3, 32), torch.randn(3, 32, device="meta")):
        with pytest.raises(ValueError, match="cannot run on the meta device.*to_empty"):
            mem(x)
    mem = mem.to_empty(device="cpu")
    assert mem(torch.randn(3, 32)).shape == (3, 32)  # materialised: runs (initialise it to train)
