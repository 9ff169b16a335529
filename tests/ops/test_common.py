"""Helpers shared by the kernels (``pkmem.ops.triton._common``)."""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
_common = pytest.importorskip("pkmem.ops.triton._common")
to_output = _common.to_output


@triton.jit
def _store(X, Y, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, to_output(tl.load(X + i, mask=i < N), Y), mask=i < N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_output_rounds_as_torch(kernels, device, dtype):
    """16-bit kernel outputs are rounded to nearest, ties to even, as torch's ``.to`` (and the
    GPU's conversion) do, also under the interpreter, whose float32 -> bfloat16 cast truncates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    one = torch.tensor(1.0).view(torch.int32)
    # exact ties between two bfloat16 values (both parities of the last kept bit), inf, -inf, NaN
    ties = torch.stack([one + 0x8000, one + 0x18000, -(one + 0x8000)]).view(torch.float32)
    x = torch.cat([x, ties, torch.tensor([float("inf"), -float("inf"), float("nan")])]).to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _store[(1,)](x, y, x.numel(), BLOCK=2048)
    want = x.to(dtype)
    assert torch.equal(y.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(y[ok], want[ok])
