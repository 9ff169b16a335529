"""The row-wise Adam(W) kernel against its PyTorch twin (``pkmem.ops.rows.row_adam_reference``).

On a CPU these run under Triton's interpreter (tests/ops/conftest.py) at small sizes; the tests
marked ``gpu`` run the enwik8-small table (262,144 x 512) on a CUDA device.
"""

import pytest
import torch

from pkmem.ops.rows import RowGrad, row_adam_update

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BETAS = (0.9, 0.98)


def row_grad(table, rows, grads, scale=None, bound=None):
    """A RowGrad holding ``grads`` for ``rows`` (as a backward would leave it)."""
    rg = RowGrad(table)
    rg.prepare(table)
    rows = torch.as_tensor(rows, dtype=torch.long, device=table.device)
    g = grads.to(table.dtype)
    rg.grad[rows] = g
    rg.sumsq[rows] = g.float().square().sum(1)
    rg.touched[rows] = 1
    rg.added(rows.numel())
    if bound is not None:
        rg.bound = bound  # a larger grid: the programs past count must do nothing
    if scale is not None:
        rg.scale = torch.tensor(scale, device=table.device)
    return rg


class State:
    """A table with its moments (and the exact mode's counters), copied for the two sides."""

    def __init__(self, N, v, dtype, device, exact, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live (GPU: 134M values)
        self.p = torch.randn(N, v, generator=g, device=device).to(dtype)
        self.m = torch.randn(N, v, generator=g, device=device) * 0.01
        self.s = torch.rand(N, v, generator=g, device=device) * 1e-4
        self.last = torch.zeros(N, dtype=torch.int32, device=device) if exact else None
        self.hist = torch.zeros(32, 3, dtype=torch.float32, device=device) if exact else None
        self.exact = exact

    def clone(self):
        c = object.__new__(State)
        c.__dict__ = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return c

    def update(self, rg, step, backend, rows="grad", **kw):
        """One call of row_adam_update (``step`` an int or a device tensor; ``kw`` overrides)."""
        args = dict(lr=1e-2, beta1=BETAS[0], beta2=BETAS[1], eps=1e-8, weight_decay=0.1, seed=5)
        args.update(kw)
        row_adam_update(
            self.p, self.m, self.s, rg, step=step, exact=self.exact, last=self.last, hist=self.hist,
            rows=rows, backend=backend, **args,
        )  # fmt: skip


def check_close(a: State, b: State, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(a.p, b.p, atol=1e-6, rtol=1e-5)
    else:  # one rounding of nearly equal float32 values: at most one bf16 step apart
        torch.testing.assert_close(a.p.float(), b.p.float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(a.m, b.m, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(a.s, b.s, atol=1e-9, rtol=1e-5)
    if a.exact:
        assert torch.equal(a.last, b.last)
        torch.testing.assert_close(a.hist, b.hist, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("N,v,config", [(13, 37, None), (40, 130, {"BLOCK_V": 64, "num_warps": 1})])
def test_steps_match_twin(kernels, device, dtype, exact, N, v, config):
    """Several steps over random row subsets (rows 0 and 1 never touched), changing lr and a
    clipping scale; the exact mode also catches up flagged rows and all rows in between."""
    from pkmem.ops.triton import row_adam

    kern = State(N, v, dtype, device, exact)
    twin = kern.clone()
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        rows = torch.randperm(N - 2, generator=g)[: max(1, N // 3)] + 2
        grads = torch.randn(rows.numel(), v, generator=g).to(device)
        lr = 1e-2 / step
        scale = 0.5 if step % 2 else None
        for side, backend in ((kern, "triton"), (twin, "torch")):
            rg = row_grad(side.p, rows, grads, scale=scale, bound=N if step == 3 else None)
            if backend == "triton" and config:
                row_adam.row_adam_update(
                    side.p, side.m, side.s, rg, step=step, lr=lr, beta1=BETAS[0], beta2=BETAS[1],
                    eps=1e-8, weight_decay=0.1, exact=exact, last=side.last, hist=side.hist,
                    stochastic_rounding=False, seed=5, config=config,
                )  # fmt: skip
                rg.consumed()
            else:
                side.update(rg, step, backend, lr=lr, stochastic_rounding=False)
            assert not rg.pending and (rg.touched == 0).all(), "the update clears the touched flags"
        check_close(kern, twin, dtype)
        if exact and step == 2:  # the rows a gather is about to read, then every row
            flags = torch.zeros(N, dtype=torch.int8, device=device)
            flags[[0, 3, N - 1]] = 1
            for side, backend in ((kern, "triton"), (twin, "torch")):
                side.update(None, step, backend, rows=flags.clone(), stochastic_rounding=False)
            assert (kern.last[[0, 3, N - 1]] == 2).all() and kern.last[1] == 0
            check_close(kern, twin, dtype)
    if exact:
        for side, backend in ((kern, "triton"), (twin, "torch")):
            side.update(None, 5, backend, rows="all", stochastic_rounding=False)
        assert (kern.last == 5).all()
        check_close(kern, twin, dtype)


def test_exact_catch_up_equals_dense_zero_gradient_steps(kernels, device):
    """A row missed for several steps (caught up in registers) ends where dense steps with a zero
    gradient put it."""
    N, v = 6, 20
    lazy = State(N, v, torch.float32, device, exact=True)
    dense = lazy.clone()
    grads = torch.randn(N, v, generator=torch.Generator().manual_seed(3)).to(device)
    for step in range(1, 5):
        lr = 1e-2 * step
        touched = [2, 4] if step in (1, 4) else [4]
        lazy.update(row_grad(lazy.p, touched, grads[touched]), step, "triton", lr=lr)
        full = torch.zeros(N, v, device=device)
        full[touched] = grads[touched]
        dense.update(row_grad(dense.p, range(N), full), step, "triton", lr=lr)
    lazy.update(None, 4, "triton", rows="all")
    torch.testing.assert_close(lazy.p, dense.p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lazy.m, dense.m, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(lazy.s, dense.s, atol=1e-9, rtol=1e-5)


def test_stochastic_rounding(kernels, device):
    """bf16 tables: each new value is one of the two bf16 neighbours of the float32 result, the
    rounding is unbiased, and the same seed gives the same bits."""
    N, v = 64, 96
    base = State(N, v, torch.float32, device, exact=False)
    base.p = base.p.bfloat16().float()  # the same start on both sides
    grads = torch.randn(N, v, generator=torch.Generator().manual_seed(4)).bfloat16().float().to(device)
    ref = base.clone()
    ref.update(row_grad(ref.p, range(N), grads), 1, "triton")  # float32: the same arithmetic, unrounded
    outs = []
    for seed in (7, 7, 8):
        b = base.clone()
        b.p = b.p.bfloat16()
        b.update(row_grad(b.p, range(N), grads), 1, "triton", seed=seed)
        outs.append(b.p)
    assert torch.equal(outs[0], outs[1]), "the same seed must give the same bits"
    assert not torch.equal(outs[0], outs[2])
    bits = ref.p.contiguous().view(torch.int32)  # the float32 result; its bf16 neighbours by magnitude:
    lo = (bits & -65536).view(torch.float32)  # truncated
    hi = ((bits & -65536) + 65536).view(torch.float32)  # one bf16 step further from 0
    frac = (bits & 0xFFFF).float() / 65536  # the probability of rounding away from 0
    y = outs[0].float()
    assert ((y == lo) | (y == hi)).all()
    assert abs(((y == hi) & (hi != lo)).float().mean() - frac.mean()).item() < 0.03
    # moments stay float32, computed from the unrounded value
    torch.testing.assert_close(b.m, ref.m, atol=1e-7, rtol=1e-5)


def test_deterministic_and_untouched_rows_unchanged(kernels, device):
    N, v = 30, 50
    a = State(N, v, torch.bfloat16, device, exact=False)
    b = a.clone()
    before = a.clone()
    rows = [3, 7, 29]
    grads = torch.randn(3, v, generator=torch.Generator().manual_seed(9)).to(device)
    for side in (a, b):
        side.update(row_grad(side.p, rows, grads, bound=N), 1, "triton")
    assert torch.equal(a.p, b.p) and torch.equal(a.m, b.m) and torch.equal(a.s, b.s)
    others = torch.ones(N, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(a.p[others], before.p[others]) and torch.equal(a.m[others], before.m[others])
    assert not torch.equal(a.p[rows], before.p[rows])


def test_argument_errors(kernels, device):
    st = State(5, 4, torch.float32, device, exact=True)
    with pytest.raises(ValueError, match="pending"):
        st.update(RowGrad(st.p), 1, "torch")
    with pytest.raises(ValueError, match="hist"):
        row_adam_update(
            st.p, st.m, st.s, row_grad(st.p, [1], torch.ones(1, 4, device=device)), step=40, lr=1.0,
            beta1=0.9, beta2=0.9, eps=1e-8, exact=True, last=st.last, hist=st.hist,
        )  # fmt: skip
    with pytest.raises(ValueError, match="float32"):
        row_adam_update(st.p, st.m.double(), st.s, None, step=1, lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="exact=True"):
        row_adam_update(st.p, st.m, st.s, None, step=1, lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8, rows="all")


@pytest.mark.parametrize("mode", ["lazy", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_adam_with_kernels_matches_twins(kernels, device, mode, dtype):
    """RowAdam end to end on the kernels (the gather's row backward, the update, the exact mode's
    catch-up before reads) against the same on the PyTorch twins: a table read twice per step (a
    shared table, or gradient accumulation), clipping, rows 0 and 1 never read."""
    from torch import nn

    from pkmem.ops import dispatch
    from pkmem.optim import RowAdam, clip_grad_norm

    N, v, T, J = 40, 24, 6, 5
    sides = []
    for backend in ("triton", "torch"):
        table = nn.Parameter(torch.randn(N, v, generator=torch.Generator().manual_seed(0)).to(device, dtype))
        opt = RowAdam(
            [table],
            lr=1e-2,
            betas=BETAS,
            weight_decay=0.1,
            mode=mode,
            stochastic_rounding=False,
            backend=backend,
        )
        sides.append((backend, table, opt))
    g = torch.Generator().manual_seed(1)
    outs = {}
    for _ in range(4):
        idx = torch.randint(2, N, (T, J), generator=g)
        idx[-1, ::2] = -1
        w, go = torch.randn(T, J, generator=g).to(device), torch.randn(T, v, generator=g).to(device)
        for backend, table, opt in sides:
            for part in (idx, idx.flip(0)):
                out = dispatch.weighted_gather(table, part.to(device), w, backend=backend)
                outs.setdefault(backend, []).append(out.detach())
                (out * go).sum().backward()
            assert table.grad is None
            clip_grad_norm([table], 0.5)
            opt.step()
            opt.zero_grad()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(outs["triton"], outs["torch"]):  # the forward reads caught-up rows on both sides
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    (_, t1, o1), (_, t2, o2) = sides
    o1.flush()
    o2.flush()
    torch.testing.assert_close(t1.float(), t2.float(), atol=tol, rtol=tol)
    s1, s2 = o1.state[t1], o2.state[t2]
    torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"], atol=tol * 1e-2, rtol=tol)
    assert s1["step"] == s2["step"] == 4
    assert (s1["exp_avg"][:2] == 0).all() and torch.equal(t1[:2], t2[:2])
    if mode == "exact":
        assert torch.equal(s1["last"], s2["last"]) and (s1["last"] == 4).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_a_flagged_step_changes_nothing(kernels, device, backend, dtype, exact):
    """A step count on the device and ``found_inf`` set: the rows' gradient is consumed and nothing
    else changes, bit for bit (table, moments, last, hist); the next step equals the same step in a
    run where the flagged one never happened."""
    N, v = 12, 20
    run = State(N, v, dtype, device, exact)
    clean = run.clone()
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(N, v, generator=g).to(device) for _ in range(3)]
    rows = [[2, 5, 7], [1, 5, 11], [0, 5, 9]]
    one, zero = (torch.tensor(x, device=device) for x in (1.0, 0.0))

    def step(side, i, count, bound, flag):
        rg = row_grad(side.p, rows[i], grads[i][rows[i]])
        step_t = torch.tensor(float(count), device=device)
        side.update(rg, step_t, backend, found_inf=flag, step_bound=bound)
        assert not rg.pending and (rg.touched == 0).all(), "the rows are consumed, taken or not"

    for side in (run, clean):
        step(side, 0, 1, 1, zero)  # a taken step with the flag read on the device
    before = run.clone()
    step(run, 1, 1, 2, one)  # flagged: the count stays 1 (the optimizer adds 1 - found_inf)
    for name in ("p", "m", "s", "last", "hist"):
        a, b = getattr(run, name), getattr(before, name)
        assert a is None or torch.equal(a, b), f"{name} changed in a flagged step"
    step(run, 2, 2, 3, zero)
    step(clean, 2, 2, 2, None)
    for name in ("p", "m", "s", "last", "hist"):
        a, b = getattr(run, name), getattr(clean, name)
        assert a is None or torch.equal(a, b), f"{name} differs from the run without the flagged step"


def test_step_count_and_found_inf_errors(kernels, device):
    st = State(5, 4, torch.float32, device, exact=False)
    kw = dict(lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8)
    rg = row_grad(st.p, [1], torch.ones(1, 4, device=device))
    with pytest.raises(ValueError, match="step_bound=None is not allowed"):
        row_adam_update(st.p, st.m, st.s, rg, step=torch.tensor(1.0, device=device), **kw)
    with pytest.raises(ValueError, match="0-dim"):
        row_adam_update(st.p, st.m, st.s, rg, step=torch.ones(2, device=device), step_bound=1, **kw)
    with pytest.raises(ValueError, match="step=-1 is not allowed"):
        row_adam_update(st.p, st.m, st.s, rg, step=-1, **kw)
    with pytest.raises(ValueError, match="found_inf=.* one-element tensor"):
        row_adam_update(st.p, st.m, st.s, rg, step=1, found_inf=torch.zeros(3, device=device), **kw)
    assert rg.pending, "a refused call consumes nothing"


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_a_guarded_row_adam_step_reads_nothing_on_the_host(kernels, device, monkeypatch, mode):
    """StepGuard (skipping on the device) with RowAdam on the kernels: neither a taken nor a skipped
    step reads a device value on the host (it did: the guard read the finite flag for RowAdam)."""
    from torch import nn

    from pkmem.optim import RowAdam
    from pkmem.train.guard import StepGuard

    N, v = 16, 8
    table = nn.Parameter(torch.randn(N, v, generator=torch.Generator().manual_seed(0)).to(device))
    opt = RowAdam([table], lr=1e-2, mode=mode, backend="triton")
    guard = StepGuard(opt, on_device=True)

    def fill(rows):
        rg = opt.row_grad(table)
        rg.prepare(table)
        rows = torch.tensor(rows, device=device)
        rg.grad[rows] = 1.0
        rg.sumsq[rows] = float(v)
        rg.touched[rows] = 1
        rg.added(rows.numel())

    fill([1, 2])
    guard.step(torch.tensor(1.0, device=device))  # the first step creates the state
    snap = table.detach().clone()

    def host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, host_read)
        fill([3, 4])
        ok = guard.step(torch.tensor(float("nan"), device=device))
        fill([5])
        ok2 = guard.step(torch.tensor(2.0, device=device))
    assert not bool(ok) and bool(ok2)
    state = opt.state[table]
    assert state["step"].item() == 2.0 and state["step"].device == table.device
    opt.flush()
    changed = (table.detach() != snap).any(1)
    assert changed[5] and not changed[3] and not changed[4], "the skipped step's rows did not move"
    assert guard.read() == (1, 1)
    assert not hasattr(opt, "found_inf"), "the guard's flag lives only around the step"
    opt.found_inf = torch.tensor(2.0, device=device)  # a sum of per-device flags: still "skip"
    fill([6])
    opt.step()
    del opt.found_inf
    assert state["step"].item() == 2.0 and not opt.row_grad(table).pending


def test_grad_scaler_is_refused_with_a_clear_error(kernels, device):
    """torch.amp.GradScaler unscales and checks ``.grad`` only, which RowAdam's rows bypass: a step
    it drives raises (it would apply loss-scaled rows unchecked), and the optimizer steps normally
    afterwards (no flag left behind)."""
    from torch import nn

    from pkmem.optim import RowAdam

    table = nn.Parameter(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).to(device))
    opt = RowAdam([table], lr=1e-2)

    def fill():
        rg = opt.row_grad(table)
        rg.prepare(table)
        rg.grad[2:6] = 1.0
        rg.sumsq[2:6] = 6.0
        rg.touched[2:6] = 1
        rg.added(4)

    fill()
    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(torch.ones((), device=device))  # the scale exists from the first scale() on
    with pytest.raises(RuntimeError, match="RowAdam does not support GradScaler"):
        scaler.step(opt)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    # after scaler.unscale_() (which skipped the rows: nothing in .grad), the same error
    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(torch.ones((), device=device))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="RowAdam does not support GradScaler"):
        scaler.step(opt)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    before = table.detach().clone()
    opt.step()  # the rows are still pending: a plain step takes them
    assert not torch.equal(table.detach(), before)


# ---- real sizes, on the GPU ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_enwik8_table_gpu(kernels, dtype, exact):
    N, v = 512**2, 512
    kern = State(N, v, dtype, "cuda", exact)
    twin = kern.clone()
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        rows = torch.randperm(N, generator=g)[: N // 2]
        grads = torch.randn(rows.numel(), v, generator=g).cuda()
        for side, backend in ((kern, "triton"), (twin, "torch")):
            side.update(row_grad(side.p, rows, grads, scale=0.3), step, backend, stochastic_rounding=False)
        check_close(kern, twin, dtype)
        # each step from the same state: in bf16 a one-step rounding difference of one side would
        # otherwise grow over the steps (two roundings of 67M values)
        twin = kern.clone()
    again = State(N, v, dtype, "cuda", exact)
    for step in range(1, 4):
        rows = torch.randperm(N, generator=torch.Generator().manual_seed(step))[: N // 2]
        grads = torch.randn(rows.numel(), v, generator=torch.Generator().manual_seed(step)).cuda()
        again.update(row_grad(again.p, rows, grads), step, "triton")
    first = again.p.clone()
    again2 = State(N, v, dtype, "cuda", exact)
    for step in range(1, 4):
        rows = torch.randperm(N, generator=torch.Generator().manual_seed(step))[: N // 2]
        grads = torch.randn(rows.numel(), v, generator=torch.Generator().manual_seed(step)).cuda()
        again2.update(row_grad(again2.p, rows, grads), step, "triton")
    assert torch.equal(first, again2.p), "the update is not deterministic"


for _mark in GPU:
    test_enwik8_table_gpu = _mark(test_enwik8_table_gpu)
