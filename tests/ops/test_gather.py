"""The weighted-gather kernels against their reference twin (forward, dense and sparse gradients).

On a CPU these run under Triton's interpreter (tests/ops/conftest.py) at tiny sizes; the tests
marked ``gpu`` run the paper's sizes on a CUDA device.
"""

import pytest
import torch

from pkmem.ops import dispatch, reference

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(N, v, T, J, device, dtype=torch.float32, seed=0, skip=True):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, v, generator=g).to(device, dtype)
    idx = torch.randint(0, N, (T, J), generator=g)
    idx[0, : min(J, 3)] = 1  # a row repeated inside one token
    if T > 2:
        idx[2, 0] = idx[1, -1]  # and across tokens
    if skip:
        idx[-1, ::2] = -1  # skipped entries
    w = torch.randn(T, J, generator=g)
    return values, idx.to(device), w.to(device)


def _check_weight_grad(gw, ref, table_dtype):
    """fp32 tables: float32 agreement. 16-bit tables: the kernel reads grad_out rounded to the
    table's dtype (config G16), so the weight gradient agrees to that dtype's precision in norm."""
    if table_dtype == torch.float32:
        torch.testing.assert_close(gw.double(), ref.double(), atol=1e-5, rtol=1e-5)
    else:
        err = ((gw.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[table_dtype], err


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(fn, values, idx, w, grad_out, sparse=False):
    values = values.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(values, idx, w, sparse)
    (out * grad_out).sum().backward()
    return out.detach(), values.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (7, 100, 3, 20) and (100, 130, 9, 40): rows re-read, so the forward runs in 64-column slices
# (masked last slice, a masked last step of 32 rows); the others in one column block
@pytest.mark.parametrize(
    "N,v,T,J", [(50, 13, 6, 9), (7, 100, 3, 20), (70, 1, 5, 2), (40, 33, 9, 1), (100, 130, 9, 40)]
)
def test_forward_and_dense_gradients(kernels, device, dtype, N, v, T, J):
    values, idx, w = _inputs(N, v, T, J, device, dtype)
    go = torch.randn(T, v, generator=torch.Generator().manual_seed(1)).to(device)
    out1, gv1, gw1 = _grads(kernels.weighted_gather, values, idx, w, go)
    out2, gv2, gw2 = _grads(reference.weighted_gather, values, idx, w, go)
    assert out1.dtype == torch.float32 and gv1.dtype == dtype and gw1.dtype == w.dtype
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)  # same rows, float32 sums
    _check_weight_grad(gw1, gw2, dtype)
    # the value gradient against float64 (for a bf16 / fp16 table the reference accumulates
    # repeated rows in the table's dtype, the kernel in float32 with one rounding at the end)
    # (the rounding error scales with the largest gradient entry)
    _, gv3, _ = _grads(reference.weighted_gather, values.double(), idx, w.double(), go.double())
    scale = max(1.0, gv3.abs().max().item())
    torch.testing.assert_close(gv1.double(), gv3, atol=TOL[dtype] * scale, rtol=TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(gv1, gv2, atol=1e-5, rtol=1e-5)
    assert (gw1[idx < 0] == 0).all()


def test_forward_config_slices_only_where_rows_are_re_read():
    pytest.importorskip("triton")
    from pkmem.ops.triton.gather import _fwd_config

    l2 = 50 * 2**20
    assert _fwd_config(8192, 128, 1024, 512**2, 2, l2)["BLOCK_V"] == 64  # paper setting: 4 reads per row
    assert _fwd_config(8192, 128, 1024, 1024**2, 2, l2)["BLOCK_V"] == 1024  # 1M slots: ~1 read per row
    assert _fwd_config(8192, 128, 1024, 512**2, 4, l2)["BLOCK_V"] == 1024  # fp32 slice 67 MB > L2
    assert _fwd_config(8192, 128, 1024, 512**2, 4, 60 * 2**20)["BLOCK_V"] == 64  # H200: 60 MB
    assert _fwd_config(64, 128, 1024, 512**2, 2, l2)["BLOCK_V"] == 128  # decode: few tokens
    assert _fwd_config(8192, 128, 64, 512**2, 2, l2)["BLOCK_J"] == 8  # 64 columns: one block, no slices


@pytest.mark.parametrize(
    "cfg",
    [
        {"BLOCK_V": 16, "E": 2, "G16": False},  # several column blocks: partial sums
        {"BLOCK_V": 64, "E": 1, "num_warps": 1, "G16": False, "PREFETCH": False},
        {"BLOCK_V": 16, "E": 8, "G16": True},  # grad_out read in the table's dtype
        {"BLOCK_V": 32, "E": 4, "PREFETCH": False, "G16": True},
        {"BLOCK_V": 8, "VPP": 2, "G16": False},  # 3 column blocks, 2 per program: one padding block
        {"BLOCK_V": 16, "VPP": 4, "G16": True},  # VPP above the number of blocks
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_configs(kernels, device, cfg, dtype):
    from pkmem.ops.triton.gather import gather_backward

    values, idx, w = _inputs(16, 20, 5, 7, device, dtype, seed=6)
    go = torch.randn(5, 20, generator=torch.Generator().manual_seed(7)).to(device)
    gv, gw = gather_backward(go, values, idx, w, config=cfg)
    _, gv2, gw2 = _grads(reference.weighted_gather, values.double(), idx, w.double(), go.double())
    tol = TOL[dtype]
    torch.testing.assert_close(gv.double(), gv2, atol=tol, rtol=tol)
    if cfg.get("G16"):
        _check_weight_grad(gw, gw2, dtype)
    else:
        torch.testing.assert_close(gw.double(), gw2, atol=1e-5, rtol=1e-5)
    gvs, gws = gather_backward(go, values, idx, w, sparse=True, config=cfg)
    assert torch.equal(gvs.to_dense(), gv) and torch.equal(gws, gw)


def test_backward_bad_vpp(kernels, device):
    from pkmem.ops.triton.gather import gather_backward

    values, idx, w = _inputs(16, 20, 5, 7, device, seed=6)
    for bad in (0, True):
        with pytest.raises(ValueError, match=f"VPP={bad!r} is not allowed"):
            gather_backward(torch.ones(5, 20, device=device), values, idx, w, config={"VPP": bad})


def test_bf16_weights(kernels, device):
    values, idx, w = _inputs(30, 17, 4, 6, device)
    w = w.bfloat16()
    go = torch.randn(4, 17).to(device)
    out1, gv1, gw1 = _grads(kernels.weighted_gather, values, idx, w, go)
    out2, gv2, gw2 = _grads(reference.weighted_gather, values, idx, w, go)
    assert gw1.dtype == torch.bfloat16
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv1, gv2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw1, gw2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gradient(kernels, device, dtype):
    values, idx, w = _inputs(40, 11, 7, 5, device, dtype, seed=2)
    go = torch.randn(7, 11).to(device)
    _, gv1, gw1 = _grads(kernels.weighted_gather, values, idx, w, go, sparse=True)
    _, gv2, gw2 = _grads(reference.weighted_gather, values, idx, w, go, sparse=True)
    from pkmem.ops.triton.gather import gather_backward

    direct, _ = gather_backward(go, values, idx, w, need_weights=False, sparse=True)
    assert direct.is_sparse and direct.is_coalesced()
    touched = torch.unique(idx[idx >= 0])
    assert torch.equal(direct.indices()[0], touched), "the sparse gradient must hold the touched rows only"
    assert gv1.is_sparse and gv1._nnz() == touched.numel()
    _, gv3, _ = _grads(reference.weighted_gather, values.double(), idx, w.double(), go.double())
    torch.testing.assert_close(gv1.to_dense().double(), gv3, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(gv1.to_dense(), gv2.to_dense(), atol=5 * TOL[dtype], rtol=5 * TOL[dtype])
    _check_weight_grad(gw1, gw2, dtype)


def test_all_entries_skipped(kernels, device):
    values = torch.randn(10, 4, device=device)
    idx = torch.full((3, 5), -1, device=device)
    w = torch.randn(3, 5, device=device)
    go = torch.randn(3, 4, device=device)
    out, gv, gw = _grads(kernels.weighted_gather, values, idx, w, go)
    assert (out == 0).all() and (gv == 0).all() and (gw == 0).all()
    _, gvs, _ = _grads(kernels.weighted_gather, values, idx, w, go, sparse=True)
    assert gvs.is_sparse and gvs._nnz() == 0


def test_many_hits_on_one_row(kernels, device):
    """A hot row (every entry) exercises long segments; untouched rows get exact zeros."""
    values, _, w = _inputs(9, 6, 8, 16, device, seed=3, skip=False)
    idx = torch.full((8, 16), 4, device=device)
    go = torch.randn(8, 6).to(device)
    out1, gv1, gw1 = _grads(kernels.weighted_gather, values, idx, w, go)
    out2, gv2, gw2 = _grads(reference.weighted_gather, values, idx, w, go)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv1, gv2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw1, gw2, atol=1e-5, rtol=1e-5)
    assert (gv1[torch.arange(9, device=device) != 4] == 0).all()


def test_only_weights_need_grad(kernels, device):
    values, idx, w = _inputs(20, 7, 4, 3, device, seed=4)
    w = w.requires_grad_()
    kernels.weighted_gather(values, idx, w).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    reference.weighted_gather(values, idx, w2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_custom_op_registration(kernels, device):
    from pkmem.ops.triton import gather

    values, idx, w = _inputs(20, 7, 4, 3, device, seed=5)
    values.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(
        gather._gather_op,
        (values, idx, w),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    out = gather._gather_op(values, idx, w)
    out.square().sum().backward()
    v2, w2 = values.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.weighted_gather(v2, idx, w2).square().sum().backward()
    torch.testing.assert_close(values.grad, v2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_backward_op_fake_strides_of_strided_inputs(kernels, device):
    """Transposed views of the values and weights: the fake (meta) gradients have the strides of
    the real (contiguous) ones, else torch.compile's stride assertions fail."""
    from pkmem.ops.triton import gather

    values, idx, w = _inputs(20, 7, 4, 3, device, seed=5)
    values_t, w_t = values.t().contiguous().t(), w.t().contiguous().t()
    assert not values_t.is_contiguous() and not w_t.is_contiguous()
    g = torch.randn(idx.shape[0], values.shape[1], device=device)
    args = (g, values_t, idx, w_t, True, True)
    torch.library.opcheck(gather._gather_backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_shapes(kernels, device):
    values, idx, w = _inputs(20, 7, 4, 3, device)
    with pytest.raises(ValueError, match="weights"):
        dispatch.weighted_gather(values, idx, w[:, :2], backend="triton")


# ---- real sizes, on the GPU ------------------------------------------------------------------------


@pytest.mark.parametrize("N", [512**2, 1024**2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [1024, 1000])
def test_paper_size_gpu(kernels, N, dtype, v):
    T, J = 8192, 128
    g = torch.Generator(device="cuda").manual_seed(v)
    values = (torch.randn(N, v, device="cuda", generator=g) / v**0.5).to(dtype)
    idx = torch.randint(0, N, (T, J), device="cuda", generator=g)
    idx[:64] = idx[0, 0]  # a hot row
    idx[-3:, ::3] = -1
    w = torch.softmax(torch.randn(T, J, device="cuda", generator=g), -1)
    go = torch.randn(T, v, device="cuda", generator=g)
    out = kernels.weighted_gather(values, idx, w)
    ref = reference.weighted_gather(values, idx, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    from pkmem.ops.triton.gather import gather_backward

    gv, gw = gather_backward(go, values, idx, w)
    gv2, gw2 = gather_backward(go, values, idx, w)
    assert torch.equal(gv, gv2) and torch.equal(gw, gw2), "backward is not deterministic"
    # oracle in float32 (for a bf16 table the reference would accumulate repeated rows in bf16)
    vv, ww = values.float().requires_grad_(), w.clone().requires_grad_()
    (reference.weighted_gather(vv, idx, ww) * go).sum().backward()
    if dtype == torch.bfloat16:  # grad_out read in bf16 (G16): compare in norm, and the hot row alone
        hot = idx[0, 0]
        assert _rel(gv, vv.grad) < 1e-2 and _rel(gv[hot], vv.grad[hot]) < 1e-2
    else:  # sums of up to 8192 float32 terms in another order
        torch.testing.assert_close(gv, vv.grad, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(gw, ww.grad, atol=1e-4, rtol=1e-4)
    else:
        _check_weight_grad(gw, ww.grad, dtype)
    gvs, _ = gather_backward(go, values, idx, w, need_weights=False, sparse=True)
    torch.testing.assert_close(gvs.to_dense(), gv, atol=0, rtol=0)


for _mark in GPU:
    test_paper_size_gpu = _mark(test_paper_size_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_and_cuda_graph_gpu(kernels):
    """Forward and dense backward inside torch.compile and in a captured CUDA graph."""
    values = torch.randn(4096, 256, device="cuda", requires_grad=True)
    idx = torch.randint(0, 4096, (512, 64), device="cuda")
    w = torch.rand(512, 64, device="cuda", requires_grad=True)

    def f(v, i, ww):
        return dispatch.weighted_gather(v, i, ww, backend="triton").square().sum()

    f(values, idx, w).backward()
    ev, ew = values.grad.clone(), w.grad.clone()
    values.grad = w.grad = None
    torch.compile(f, fullgraph=True)(values, idx, w).backward()
    torch.testing.assert_close(values.grad, ev, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, ew, atol=1e-5, rtol=1e-5)
    # CUDA graph of forward + backward (no host synchronisation inside)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            values.grad = w.grad = None
            f(values, idx, w).backward()
    torch.cuda.current_stream().wait_stream(s)
    values.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f(values, idx, w).backward()
    graph.replay()
    torch.testing.assert_close(values.grad, ev, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, ew, atol=1e-5, rtol=1e-5)


def test_out_of_range_index_is_an_error_and_skipped_entries_may_hold_anything(kernels, device):
    values, idx, w = _inputs(10, 5, 3, 4, device, seed=15)
    bad = idx.clone()
    bad[0, 0] = 10
    with pytest.raises(ValueError, match="values.shape"):
        dispatch.weighted_gather(values, bad, w, backend="triton")
    w = w.clone()
    w[idx < 0] = float("nan")  # a skipped entry's weight is ignored, even NaN
    out = kernels.weighted_gather(values, idx, w)
    ref = reference.weighted_gather(values, idx, w)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    empty = reference.weighted_gather(values, idx[:, :0], w[:, :0])
    assert empty.shape == (3, 5) and (empty == 0).all()


# ---- row-sparse gradients (a row optimizer's RowGrad) ---------------------------------------------


def _oracle_rows(values, idx_list, w, gos):
    """The float64 value gradient summed over several backward passes, and the rows read."""
    total = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    for idx, go in zip(idx_list, gos):
        _, gv, _ = _grads(reference.weighted_gather, values.double(), idx, w.double(), go.double())
        total += gv
    read = torch.unique(torch.cat([i[i >= 0] for i in idx_list]))
    return total, read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (50, 13, 6, 9): more entries than rows (one program per table row); (200, 33, 5, 7): fewer (one
# program per sorted entry); (40, 70, 9, 6) with 32-column blocks: three blocks in one program
@pytest.mark.parametrize("N,v,T,J,cfg", [(50, 13, 6, 9, None), (200, 33, 5, 7, None), (40, 70, 9, 6, 32)])
def test_row_grad_matches_twin(kernels, device, dtype, N, v, T, J, cfg):
    from pkmem.ops.rows import RowGrad
    from pkmem.ops.triton.gather import gather_backward

    values, idx, w = _inputs(N, v, T, J, device, dtype)
    idx_list = [idx, torch.where(idx >= 0, (idx * 7 + 3) % N, -1).flip(0)]  # overlapping row sets
    gos = [torch.randn(T, v, generator=torch.Generator().manual_seed(s)).to(device) for s in (1, 2)]
    kern, twin = RowGrad(values), RowGrad(values)
    config = {"BLOCK_V": cfg} if cfg else None
    for i, go in zip(idx_list, gos):  # two backward passes before a step: they add up
        gv, gw = gather_backward(go, values, i, w, config=config, row_grad=kern)
        gw_twin = reference.gather_backward_rows(go, values, i, w, twin)
        assert gv is None
        _, _, gw_ref = _grads(reference.weighted_gather, values.double(), i, w.double(), go.double())
        _check_weight_grad(gw, gw_ref, dtype)
        _check_weight_grad(gw_twin, gw_ref, dtype)
    total, read = _oracle_rows(values, idx_list, w, gos)
    for rg in (kern, twin):
        assert rg.backwards == 2 and rg.bound == min(N, 2 * T * J)
        rows, count = rg.compact()
        assert int(count) == read.numel()
        assert torch.equal(rows[: int(count)].long(), read)  # the rows read, each once, ascending
        assert torch.equal(rg.touched.nonzero().flatten(), read)
        scale = max(1.0, total.abs().max().item())
        tol = 2 * TOL[dtype]  # bf16: two roundings (one per pass) and grad_out read in bf16
        torch.testing.assert_close(rg.grad[read].double(), total[read], atol=tol * scale, rtol=tol)
        torch.testing.assert_close(
            rg.sumsq[read], rg.grad[read].float().square().sum(1), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(rg.sq_norm().double(), total.square().sum(), atol=1e-6, rtol=3 * tol)


def test_row_grad_through_autograd(kernels, device):
    """A table with a live RowGrad gets no ``.grad``; once its owner is gone, dense gradients again."""
    from pkmem.ops.rows import ROW_GRAD_ATTR, RowGrad

    class Owner:
        pass

    values, idx, w = _inputs(30, 9, 4, 5, device, seed=11)
    go = torch.randn(4, 9, generator=torch.Generator().manual_seed(12)).to(device)
    table = torch.nn.Parameter(values.clone())
    owner = Owner()
    for fn in (kernels.weighted_gather, reference.weighted_gather):
        rg = RowGrad(table, owner=owner)
        setattr(table, ROW_GRAD_ATTR, rg)
        ww = w.clone().requires_grad_()
        (fn(table, idx, ww) * go).sum().backward()
        assert (
            table.grad is None and rg.pending and int(rg.touched.sum()) == torch.unique(idx[idx >= 0]).numel()
        )
        _, gv_ref, gw_ref = _grads(reference.weighted_gather, values, idx, w, go)
        read = torch.unique(idx[idx >= 0])
        torch.testing.assert_close(rg.grad[read], gv_ref[read], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ww.grad, gw_ref, atol=1e-5, rtol=1e-5)
    del owner  # the optimizer is gone: the gather gives dense gradients again
    for fn in (kernels.weighted_gather, reference.weighted_gather):
        table.grad = None
        (fn(table, idx, w) * go).sum().backward()
        torch.testing.assert_close(table.grad, gv_ref, atol=1e-5, rtol=1e-5)
