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


def test_configs_follow_the_devices_properties():
    """Block sizes come from the device's properties: the H200's measured switches, per SM."""
    import dataclasses

    from pkmem.ops.triton import norm, search
    from pkmem.ops.triton._common import INTERPRETER_DEVICE, TARGETS, device_info

    h200 = TARGETS["H200"]
    small = dataclasses.replace(h200, sms=16)
    # the selection's 8-row programs from 16384 token-heads on an H200 (2048 programs, 15.5 per SM)
    assert search._fwd_config(4096, 4, 512, 256, 32, "ieee", h200)["BT"] == 8
    assert search._fwd_config(2048, 4, 512, 256, 32, "ieee", h200)["BT"] == 4
    assert search._fwd_config(2048, 4, 512, 256, 32, "ieee", small)["BT"] == 8  # fewer SMs: fewer tokens
    assert search._fwd_config(64, 4, 512, 256, 32, "tf32", h200)["PRECISION"] == "tf32"
    # the BatchNorm's 512-row chunks where they still give 1.9 programs per SM (256 on an H200)
    assert norm._config(8192, 2048, h200)["ROWS"] == 512
    assert norm._config(8192, 2048, TARGETS["L40S"])["ROWS"] == 256  # 142 SMs
    assert norm._config(100, 2048, h200)["ROWS"] == 128  # one chunk for a small batch
    assert device_info(torch.device("cpu")) is INTERPRETER_DEVICE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_properties_gpu():
    """The properties read from the GPU, and the table's entry for it (checked on an H200)."""
    from pkmem.ops.triton._common import TARGETS, device_info

    dev = device_info(torch.device("cuda"))
    p = torch.cuda.get_device_properties(0)
    assert dev.sms == p.multi_processor_count and dev.l2_bytes == p.L2_cache_size
    assert dev.arch == 10 * p.major + p.minor >= 80 and dev.smem_per_block >= 99 * 1024
    if "H200" in p.name:
        want = TARGETS["H200"]
        assert (dev.arch, dev.sms, dev.smem_per_block) == (want.arch, want.sms, want.smem_per_block), dev
        assert abs(dev.l2_bytes - want.l2_bytes) <= want.l2_bytes // 10, dev
