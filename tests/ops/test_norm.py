"""The BatchNorm kernels against their reference twin: forward (output, mean, variance) and the
gradients of x, weight and bias, in training (masked or not) and eval.

On a CPU these run under Triton's interpreter (tests/ops/conftest.py) at small sizes; the tests
marked ``gpu`` run the paper's size (8192 tokens, 2048 query features) on a CUDA device.
"""

import pytest
import torch
from torch import nn

from pkmem.layer import masked_batch_norm
from pkmem.ops import dispatch, reference

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
EPS = 1e-5
# gradient of x: written in x's dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(T, C, device, dtype=torch.float32, masked=True, affine="both", seed=0, mean=2.0, std=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, C, generator=g) * std + mean).to(dtype)
    w = torch.randn(C, generator=g) if affine in ("both", "weight") else None
    b = torch.randn(C, generator=g) if affine in ("both", "bias") else None
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    dy = torch.randn(T, C, generator=g)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(w), to(b), to(mask), to(rm), to(rv), to(dy)


def _run(fn, x, w, b, mask, training, rm, rv, dy, shift=None):
    """Outputs and gradients: ``(y, mean, var, dx, dweight, dbias)`` (and ``dshift`` with a shift)."""
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    s = None if shift is None else shift.detach().clone().requires_grad_()
    y, mean, var = fn(x, w, b, mask, EPS, training, rm, rv, **({} if s is None else {"shift": s}))
    (y * dy).sum().backward()
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return (y.detach(), mean, var, x.grad, grad(w), grad(b)) + (() if s is None else (s.grad,))


def _close(a, b, tol, name="", scale=None):
    """Equal within ``tol`` relative to each element and to ``scale`` (default: the largest
    magnitude of ``b``)."""
    if b is None:
        assert a is None, name
        return
    assert a.shape == b.shape, name
    if scale is None:
        scale = b.double().abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(scale, 1e-30), msg=name)


def _check(got, want, x_dtype, dy, w, tol=1e-5):
    """``dx`` is compared at the scale of its direct term ``w * rstd * dy``: the mean-removal terms
    cancel it almost entirely at small T (two rows: dx is rounding noise). ``y`` and ``dx`` come in
    x's dtype (``y`` float32 for float32 x): for 16-bit x both are compared to that dtype's
    precision (the same float32 result, rounded)."""
    names = ("y", "mean", "var", "dx", "dweight", "dbias")
    assert got[0].dtype == want[0].dtype == x_dtype and got[1].dtype == got[2].dtype == torch.float32
    assert got[3].dtype == x_dtype
    rstd = torch.rsqrt(want[2].double() + EPS)
    direct = dy.double().abs().amax(0) * rstd * (1.0 if w is None else w.double().abs())
    dx_scale = direct.max().item() if direct.numel() else 0.0
    for a, b, name in zip(got, want, names):
        if name == "dx":
            _close(a, b, TOL[x_dtype], name, max(dx_scale, b.double().abs().max().item() if b.numel() else 0))
        elif name == "y":
            _close(a, b, max(tol, TOL[x_dtype]), name)
        else:
            _close(a, b, tol, name)


@pytest.mark.parametrize("T", [1, 2, 7, 37, 300])
@pytest.mark.parametrize("C", [3, 17, 64, 130])
@pytest.mark.parametrize("masked", [False, True])
def test_training_matches_reference(kernels, device, T, C, masked):
    args = _inputs(T, C, device, masked=masked, seed=T * C)
    x, w, b, mask, rm, rv, dy = args
    got = _run(kernels.batch_norm, x, w, b, mask, True, rm, rv, dy)
    want = _run(reference.batch_norm, x, w, b, mask, True, rm, rv, dy)
    _check(got, want, torch.float32, dy, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", ["both", "none", "weight", "bias"])
@pytest.mark.parametrize("masked", [False, True])
def test_dtypes_and_modes(kernels, device, dtype, training, affine, masked):
    """16-bit x is read as is (the reference upcasts it exactly: same float32 forward); its gradient
    is written in x's dtype, so it agrees to that dtype's precision."""
    x, w, b, mask, rm, rv, dy = _inputs(37, 130, device, dtype, masked, affine, seed=3)
    got = _run(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy)
    want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
    _check(got, want, dtype, dy, w)
    if not training:  # eval returns (copies of) the running statistics
        assert torch.equal(got[1], rm) and torch.equal(got[2], rv) and got[1].data_ptr() != rm.data_ptr()


@pytest.mark.parametrize("masked", [False, True, "none real"])
@pytest.mark.parametrize("strided", [False, True])
def test_running_statistics_update(kernels, device, masked, strided):
    """With a momentum the op updates the running statistics in place (the kernel in its
    normalising pass; a copy-free fallback for strided buffers), as torch's BatchNorm does."""
    x, w, b, mask, rm, rv, _ = _inputs(37, 9, device, masked=bool(masked), seed=12)
    if masked == "none real":
        mask = torch.zeros_like(mask)
    m = 0.3
    real = x if mask is None else x[mask]
    if real.shape[0]:
        want_m = (1 - m) * rm + m * real.double().mean(0).float()
        want_v = (1 - m) * rv + m * real.double().var(0, correction=1).float()
    else:
        want_m, want_v = rm.clone(), rv.clone()
    for backend in ("torch", "triton"):
        if strided:
            bm, bv = torch.zeros(9, 2, device=device), torch.zeros(9, 2, device=device)
            bm[:, 0], bv[:, 0] = rm, rv
            r_m, r_v = bm[:, 0], bv[:, 0]
        else:
            r_m, r_v = rm.clone(), rv.clone()
        y, mean, var = dispatch.batch_norm(x, w, b, mask, EPS, True, r_m, r_v, backend=backend, momentum=m)
        torch.testing.assert_close(r_m, want_m, rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(r_v, want_v, rtol=1e-5, atol=1e-5, msg=backend)
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="momentum"):
            dispatch.batch_norm(x, w, b, mask, EPS, True, rm, rv, backend="triton", momentum=bad)
    with pytest.raises(ValueError, match="running_mean"):
        dispatch.batch_norm(x, w, b, mask, EPS, True, backend="triton", momentum=0.1)


def test_bad_block_configs(kernels, device):
    from pkmem.ops.triton.norm import batch_norm_forward

    x, w, b, mask, rm, rv, _ = _inputs(20, 6, device, seed=4)
    for cfg, match in [({"ROWS": 24}, "ROWS=24"), ({"ROWS": 8, "BR": 16}, "ROWS=8"), ({"BC": 0}, "BC=0")]:
        with pytest.raises(ValueError, match=match):
            batch_norm_forward(x, w, b, mask, EPS, True, rm, rv, config=cfg)


@pytest.mark.parametrize(
    "config",
    [
        {"ROWS": 16, "BR": 8, "BC": 16, "NCB": 4},  # 10 chunks merged 4 at a time, 5 column blocks
        {"ROWS": 64, "BR": 16, "BC": 128, "NCB": 1, "num_warps": 2},  # one chunk per merge step
        {"ROWS": 512, "BR": 64, "BC": 32, "NCB": 64},  # one chunk, larger than T: one launch each way
        {"ROWS": 512, "BR": 64, "BC": 32, "NCB": 64, "ONE_CHUNK": False},  # one chunk, two launches
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_block_configs(kernels, device, config, dtype, training):
    from pkmem.ops.triton.norm import batch_norm_backward, batch_norm_forward

    x, w, b, mask, rm, rv, dy = _inputs(150, 70, device, dtype, seed=4)
    y, mean, var = batch_norm_forward(x, w, b, mask, EPS, training, rm, rv, config=config)
    # the gradient of y arrives in y's dtype (x's, if 16-bit), as autograd gives it to the reference
    dx, dw, db, _ = batch_norm_backward(dy.to(y.dtype), x, w, mask, mean, var, EPS, training, config=config)
    want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
    _check((y, mean, var, dx, dw, db), want, dtype, dy, w)


class _Refused:
    def __getitem__(self, grid):
        raise AssertionError("this kernel must not be launched")


@pytest.mark.parametrize("masked", [False, True])
def test_small_batches_take_one_launch_each_way(kernels, device, monkeypatch, masked):
    """All rows in one chunk (small batches, the default configuration): the normalising kernel
    computes the statistics itself and the dx kernel the column sums: one launch each way."""
    from pkmem.ops.triton import norm

    x, w, b, mask, rm, rv, dy = _inputs(150, 70, device, masked=masked, seed=23)
    want = _run(reference.batch_norm, x, w, b, mask, True, rm, rv, dy, shift=w)
    monkeypatch.setattr(norm, "_bn_stats_kernel", _Refused())
    monkeypatch.setattr(norm, "_bn_bwd_sums_kernel", _Refused())
    got = _run(kernels.batch_norm, x, w, b, mask, True, rm, rv, dy, shift=w)
    _check(got[:6], want[:6], torch.float32, dy, w)
    _close(got[6], want[6], 1e-5, "dshift", scale=want[4].abs().max().item())


@pytest.mark.parametrize("training", [True, False])
def test_all_rows_masked(kernels, device, training):
    """No real row: mean 0 and variance 0 (the reference divides by max(n, 1)); every row keeps
    only the direct term of the gradient."""
    x, w, b, _, rm, rv, dy = _inputs(9, 20, device, seed=5)
    mask = torch.zeros(9, dtype=torch.bool, device=device)
    got = _run(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy)
    want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
    _check(got, want, torch.float32, dy, w)
    if training:
        assert (got[1] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_in_masked_rows_stay_out_of_the_statistics(kernels, device, bad, dtype):
    x, w, b, mask, rm, rv, dy = _inputs(70, 33, device, dtype, seed=6)
    clean = torch.where(mask[:, None], x, 0.0)
    dirty = torch.where(mask[:, None], x, bad)
    y, mean, var = kernels.batch_norm(dirty, w, b, mask, EPS, True)
    y2, mean2, var2 = reference.batch_norm(clean, w, b, mask, EPS, True)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    _close(mean, mean2, 1e-5, "mean")
    _close(var, var2, 1e-5, "var")
    _close(y[mask], y2[mask], max(1e-5, TOL[dtype]), "y of real rows")  # y in x's dtype
    assert not torch.isfinite(y[~mask]).any()  # the bad rows themselves are normalised as they are


def test_large_mean_statistics_are_robust(kernels, device):
    """|mean| = 1e4 >> std = 1: a one-pass sum / sum-of-squares loses the variance entirely in
    float32 (errors ~ 1e8 * 2**-24 ~ 10); sums of values shifted by a first tile's mean, merged
    with Chan's formula, keep it to ~1e-4, the resolution at which float32 holds the means
    (1e4 * 2**-24 ~ 6e-4 of std)."""
    x, w, b, mask, rm, rv, dy = _inputs(300, 17, device, mean=1e4, std=1.0, seed=7)
    y, mean, var = kernels.batch_norm(x, w, b, mask, EPS, True)
    y64, mean64, var64 = reference.batch_norm(x.double(), w.double(), b.double(), mask, EPS, True)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)
    # x - mean is exact to float32's resolution at 1e4 (1e-3), scaled by rstd ~ 1 and |w| ~ 1
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=5e-3 * w.abs().max().item())
    _, dmean, dvar, dx, dw, db = _run(kernels.batch_norm, x, w, b, mask, True, rm, rv, dy)
    want = _run(reference.batch_norm, x.double(), w.double(), b.double(), mask, True, rm, rv, dy.double())
    for a, r, name in zip((dx, dw, db), want[3:], ("dx", "dweight", "dbias")):
        _close(a, r, 5e-3, name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", ["none", "some", "all"])
def test_shift_folds_a_linear_bias(kernels, device, training, masked):
    """``shift`` (a linear layer's bias, folded in) equals normalising ``x + shift``; its gradient
    is 0 in training with real rows (the batch mean absorbs it), sum(dy) * weight * rstd otherwise."""
    x, w, b, mask, rm, rv, dy = _inputs(45, 19, device, seed=21)
    mask = {"none": None, "some": mask, "all": torch.zeros_like(mask)}[masked]
    sh = torch.randn(19, generator=torch.Generator().manual_seed(22)).to(device) * 3
    got = _run(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy, shift=sh)
    want = _run(reference.batch_norm, x.double(), w.double(), b.double(), mask, training, rm.double(),
                rv.double(), dy.double(), shift=sh.double())  # fmt: skip
    plain = _run(reference.batch_norm, x.double() + sh.double(), w.double(), b.double(), mask, training,
                 rm.double(), rv.double(), dy.double())  # fmt: skip
    for a, r, p, name in zip(got, want, plain, ("y", "mean", "var", "dx", "dweight", "dbias")):
        _close(a, r, 1e-5, name)
        _close(r, p, 1e-9, name + " (reference: shift vs x + shift)")
    dshift, want_dshift = got[6], want[6]
    if training and masked != "all":
        assert (dshift == 0).all() and want_dshift.abs().max() < 1e-9 * want[4].abs().max()
    else:
        _close(dshift, want_dshift, 1e-5, "dshift")
    # torch.compile's path: the autograd Function calling the custom ops
    got_op = _compiled_path(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy, shift=sh)
    for a, r in zip(got_op, got):
        _close(a, r, 1e-6)


def _compiled_path(fn, *args, **kwargs):
    """``_run`` with the autograd Function's torch.compile branch taken eagerly: the forward and
    backward custom ops (opaque to the compiler) instead of the launchers."""
    from pkmem.ops.triton import norm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(norm, "_compiling", lambda: True)
        return _run(fn, *args, **kwargs)


@pytest.mark.parametrize("lead", [32, 100, 299])
def test_large_mean_with_leading_padding(kernels, device, lead):
    """Leading rows masked (left padding): the chunk's statistics pivot on its first tile with real
    rows, so a mean of 1e4 still keeps the variance (a pivot of 0 would lose it entirely)."""
    x = (torch.randn(300, 5, generator=torch.Generator().manual_seed(31)) + 1e4).to(device)
    mask = torch.ones(300, dtype=torch.bool, device=device)
    mask[:lead] = False
    from pkmem.ops.triton.norm import batch_norm_forward

    real = x[mask].double()
    for config in (None, {"ROWS": 512, "BR": 32}):  # 256-row chunks (the default here), or one chunk
        _, mean, var = batch_norm_forward(x, None, None, mask, EPS, True, config=config)
        torch.testing.assert_close(mean.double(), real.mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), real.var(0, unbiased=False), rtol=1e-3, atol=1e-6)


def test_gradients_of_some_inputs_only(kernels, device):
    x, w, b, mask, _, _, dy = _inputs(37, 17, device, seed=8)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
        y, _, _ = kernels.batch_norm(*leaves, mask, EPS, True)
        (y * dy).sum().backward()
        ref = [t.detach().clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
        y2, _, _ = reference.batch_norm(*ref, mask, EPS, True)
        (y2 * dy).sum().backward()
        for a, r in zip(leaves, ref):
            assert (a.grad is None) == (r.grad is None)
            if a.grad is not None:
                _close(a.grad, r.grad, 1e-5)
    with torch.no_grad():  # no autograd node
        y, mean, var = kernels.batch_norm(x, w, b, mask, EPS, True)
    assert y.grad_fn is None and not mean.requires_grad
    _close(y, reference.batch_norm(x, w, b, mask, EPS, True)[0], 1e-5)


def test_custom_op_registration(kernels, device):
    """Schema and fake (meta) implementations of the custom ops that torch.compile sees, and the
    autograd Function's compiled branch (the ops, then the running statistics' update) run eagerly."""
    from pkmem.ops.triton import norm

    x, w, b, mask, rm, rv, dy = _inputs(37, 17, device, seed=9)
    utils = ("test_schema", "test_faketensor")
    sh = torch.randn(17, device=device)
    torch.library.opcheck(norm._bn_op, (x, w, b, mask, EPS, True, None, None, None), test_utils=utils)
    torch.library.opcheck(norm._bn_op, (x, None, None, None, EPS, False, rm, rv, None), test_utils=utils)
    torch.library.opcheck(norm._bn_op, (x, w, b, mask, EPS, True, None, None, sh), test_utils=utils)
    mean, var = x.mean(0), x.var(0)
    for shift in (None, sh):
        args = (dy, x, w, mask, mean, var, EPS, True, True, False, True, shift, True)
        torch.library.opcheck(norm._bn_backward_op, args, test_utils=utils)
    for training in (True, False):
        got = _compiled_path(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy)
        want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
        _check(got, want, torch.float32, dy, w)
    # the running statistics are updated after the functional op, as in the eager kernel
    stats = [(rm.clone(), rv.clone()) for _ in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(norm, "_compiling", lambda: True)
        kernels.batch_norm(x, w, b, mask, EPS, True, *stats[0], momentum=0.1)
    reference.batch_norm(x, w, b, mask, EPS, True, *stats[1], momentum=0.1)
    for a, r in zip(stats[0], stats[1]):
        _close(a, r, 1e-6)


@pytest.mark.parametrize("affine", ["none", "both"])
def test_backward_op_without_parameter_gradients(kernels, device, affine):
    """Only dx (no weight and bias, or frozen ones), as torch.compile's backward asks for it: the
    op's two empty parameter gradients must be distinct tensors (outputs may not alias)."""
    from pkmem.ops.triton import norm

    x, w, _, mask, _, _, dy = _inputs(37, 17, device, affine=affine, seed=14)
    mean, var = x.mean(0), x.var(0, correction=0)
    args = (dy, x, w, mask, mean, var, EPS, True, True, False, False, None, False)
    dx, dw, db, ds = norm._bn_backward_op(*args)
    assert dw.numel() == db.numel() == ds.numel() == 0
    _close(dx, norm.batch_norm_backward(*args)[0], 1e-6, "dx")
    torch.library.opcheck(norm._bn_backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_custom_op_fake_strides_of_a_strided_x(kernels, device):
    """x with column stride != 1 (a transposed view): the fake (meta) outputs have the strides of
    the kernels' (contiguous) outputs, else torch.compile's stride assertions fail."""
    from pkmem.ops.triton import norm

    x, w, b, mask, _, _, dy = _inputs(37, 17, device, seed=13)
    xt = x.t().contiguous().t()
    assert xt.stride(-1) != 1
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(norm._bn_op, (xt, w, b, mask, EPS, True, None, None, None), test_utils=utils)
    args = (dy, xt, w, mask, x.mean(0), x.var(0), EPS, True, True, True, True, None, False)
    torch.library.opcheck(norm._bn_backward_op, args, test_utils=utils)


@pytest.mark.parametrize("training", [True, False])
def test_strided_parameters_and_running_statistics(kernels, device, training):
    """weight, bias and the running statistics as strided (C,) views (the kernels read them with
    unit stride): the same outputs and gradients as contiguous ones."""
    x, w, b, mask, rm, rv, dy = _inputs(21, 9, device, seed=12)
    want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
    pairs = [torch.stack([t, torch.full_like(t, 7.0)], 1) for t in (w, b, rm, rv)]
    wb = [p.requires_grad_() for p in pairs[:2]]
    xx = x.clone().requires_grad_()
    y, mean, var = kernels.batch_norm(
        xx, wb[0][:, 0], wb[1][:, 0], mask, EPS, training, *(p[:, 0] for p in pairs[2:])
    )
    (y * dy).sum().backward()
    got = (y.detach(), mean, var, xx.grad, wb[0].grad[:, 0], wb[1].grad[:, 0])
    _check(got, want, torch.float32, dy, w)


def test_bad_inputs(kernels, device):
    x, w, b, mask, rm, rv, _ = _inputs(6, 5, device)
    for args, match in [
        ((x[None], w, b, mask, EPS, True), "T, C"),
        ((x, w[:3], b, mask, EPS, True), "weight"),
        ((x, w, b, mask.float(), EPS, True), "mask"),
        ((x, w, b, mask[:4], EPS, True), "mask"),
        ((x, w, b, mask, EPS, False), "running_mean"),
        ((x, w, b, mask, EPS, False, rm, rv[:2]), "running_var"),
        ((x, 1.0, b, mask, EPS, True), "weight=1.0"),
        ((x, w, b, [True] * 6, EPS, True), "mask="),
        ((x.tolist(), w, b, mask, EPS, True), "T, C"),
    ]:
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=match):
                dispatch.batch_norm(*args, backend=backend)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_batch_norm_triton_equals_torch(kernels, device, masked, momentum, dtype):
    """The layer's BatchNorm through both backends: outputs, gradients and running statistics over
    training steps (one of them on one row, one without real rows), then eval."""
    bns = [nn.BatchNorm1d(13, momentum=momentum).to(device) for _ in range(2)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.linspace(0.5, 2, 13))
            bn.bias.copy_(torch.linspace(-1, 1, 13))
    steps = [(40, seed) for seed in range(3)] + [(1, 3), (5, 4)]
    for step, (T, seed) in enumerate(steps):
        x, _, _, mask, _, _, dy = _inputs(T, 13, device, dtype, masked, seed=seed)
        if step == len(steps) - 1 and masked:
            mask = torch.zeros_like(mask)  # no real row: running statistics stay
        outs = []
        for bn, backend in zip(bns, ("triton", "torch")):
            bn.zero_grad()
            xx = x.detach().clone().requires_grad_()
            y = masked_batch_norm(bn, xx, mask, backend)
            (y * dy).sum().backward()
            outs.append((y.detach(), xx.grad, bn.weight.grad, bn.bias.grad))
        for a, r in zip(*outs):
            _close(a, r, TOL[dtype] if a.dtype != torch.float32 else 1e-5)
        for a, r in zip(bns[0].buffers(), bns[1].buffers()):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    for bn in bns:
        bn.eval()
    x = _inputs(7, 13, device, dtype, seed=9)[0]
    y1, y2 = masked_batch_norm(bns[0], x, None, "triton"), masked_batch_norm(bns[1], x, None, "torch")
    assert y1.dtype == y2.dtype == dtype  # x's dtype
    _close(y1, y2, TOL[dtype] if dtype != torch.float32 else 1e-5)


# ---- real sizes, on the GPU ------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paper_size_gpu(kernels, masked, training, dtype):
    """8192 tokens, 2048 features (heads 4 x k_dim 512), bf16 as under autocast: against the
    reference in float32 (float64 for the statistics); deterministic run to run."""
    from pkmem.ops.triton.norm import batch_norm_backward, batch_norm_forward

    x, w, b, mask, rm, rv, dy = _inputs(8192, 2048, "cuda", dtype, masked, seed=10, mean=0.5, std=2.0)
    got = _run(kernels.batch_norm, x, w, b, mask, training, rm, rv, dy)
    # the reference upcasts x exactly: the same float32 computation, y and dx rounded to x's dtype
    # (compared to that precision), the statistics and parameter gradients at float32 precision
    want = _run(reference.batch_norm, x, w, b, mask, training, rm, rv, dy)
    _check(got, want, dtype, dy, w, tol=1e-4)
    stats64 = reference.batch_norm(x.double(), w.double(), b.double(), mask, EPS, training, rm, rv)
    _close(got[1], stats64[1], 1e-6, "mean vs float64")
    _close(got[2], stats64[2], 1e-5, "var vs float64")
    y1, m1, v1 = batch_norm_forward(x, w, b, mask, EPS, training, rm, rv)
    y2, m2, v2 = batch_norm_forward(x, w, b, mask, EPS, training, rm, rv)
    assert torch.equal(y1, y2) and torch.equal(m1, m2) and torch.equal(v1, v2), "forward is not deterministic"
    g1 = batch_norm_backward(dy, x, w, mask, m1, v1, EPS, training, shift=b, need_shift=True)
    g2 = batch_norm_backward(dy, x, w, mask, m1, v1, EPS, training, shift=b, need_shift=True)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2)), "backward is not deterministic"


for _mark in GPU:
    test_paper_size_gpu = _mark(test_paper_size_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_and_cuda_graph_gpu(kernels):
    """Forward and backward inside torch.compile (the custom op) and in a captured CUDA graph."""
    x, w, b, mask, _, _, dy = _inputs(1024, 512, "cuda", torch.bfloat16, seed=11)
    x, w, b = (t.requires_grad_() for t in (x, w, b))

    def f(x_, w_, b_):
        y, _, _ = dispatch.batch_norm(x_, w_, b_, mask, EPS, True, backend="triton")
        return (y * dy).sum()

    f(x, w, b).backward()
    expected = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.compile(f, fullgraph=True)(x, w, b).backward()
    for t, e in zip((x, w, b), expected):
        torch.testing.assert_close(t.grad, e, atol=1e-5, rtol=1e-5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for t in (x, w, b):
                t.grad = None
            f(x, w, b).backward()
    torch.cuda.current_stream().wait_stream(s)
    for t in (x, w, b):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f(x, w, b).backward()
    graph.replay()
    for t, e in zip((x, w, b), expected):
        torch.testing.assert_close(t.grad, e, atol=1e-5, rtol=1e-5)
