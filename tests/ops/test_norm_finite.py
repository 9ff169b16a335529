"""A NaN or infinite token in a training batch never reaches the BatchNorm running statistics:
the reference, the kernel (under Triton's interpreter on a CPU) and the layer leave them as they
were (on the device, no host sync), and eval stays finite afterwards."""

import pytest
import torch
from torch import nn

from pkmem import ProductKeyMemory
from pkmem.layer import masked_batch_norm
from pkmem.ops import dispatch

EPS = 1e-5


def _batch(device, bad, masked, T=37, C=9):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, C, generator=g) * 3 + 2
    x[5, 3] = bad  # one token with one non-finite feature
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[5] = True  # a real token
    return x.to(device), None if mask is None else mask.to(device)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_running_statistics_keep_finite_values(kernels, device, bad, masked, backend):
    x, mask = _batch(device, bad, masked)
    rm, rv = torch.randn(9, device=device), torch.rand(9, device=device) + 0.5
    r_m, r_v = rm.clone(), rv.clone()
    y, mean, var = dispatch.batch_norm(
        x, None, None, mask, EPS, True, r_m, r_v, backend=backend, momentum=0.1
    )
    assert not torch.isfinite(mean[3]) or not torch.isfinite(var[3])  # the statistics of column 3
    assert torch.equal(r_m[3], rm[3]) and torch.equal(r_v[3], rv[3])  # ... do not reach the running ones
    assert torch.isfinite(r_m).all() and torch.isfinite(r_v).all()
    # a finite batch updates them as before
    x[5, 3] = 0.0
    r_m, r_v = rm.clone(), rv.clone()
    dispatch.batch_norm(x, None, None, mask, EPS, True, r_m, r_v, backend=backend, momentum=0.1)
    real = x if mask is None else x[mask]
    torch.testing.assert_close(r_m, 0.9 * rm + 0.1 * real.double().mean(0).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_layers_batch_norm_skips_a_non_finite_batch(kernels, device, momentum, backend):
    bn = nn.BatchNorm1d(9, momentum=momentum).to(device)
    x, mask = _batch(device, 0.0, True)
    masked_batch_norm(bn, x, mask, backend)
    before = [t.clone() for t in bn.buffers()]
    x[5] = float("nan")  # a whole NaN token: every column's statistics
    masked_batch_norm(bn, x, mask, backend)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))  # num_batches_tracked too


def test_eval_stays_finite_after_a_nan_token_in_training():
    """The issue's case: one NaN token with query_norm="batchnorm" poisoned every later call."""
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, heads=2, num_keys=8, topk=4, k_dim=16)
    x = torch.randn(2, 20, 32)
    mem(x)
    stats = [t.clone() for t in mem.buffers()]
    x[0, 3] = float("nan")
    assert not torch.isfinite(mem(x)).all()  # this batch's output is lost (the loop skips its step)
    assert all(torch.equal(a, b) for a, b in zip(stats, mem.buffers()))
    mem.eval()
    assert torch.isfinite(mem(torch.randn(2, 20, 32))).all()
