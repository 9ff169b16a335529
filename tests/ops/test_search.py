"""The fused product-key search kernel against its reference twin (forward and gradients).

On a CPU these run under Triton's interpreter (tests/ops/conftest.py) at tiny sizes; the tests
marked ``gpu`` run the paper's sizes on a CUDA device.
"""

import contextlib

import pytest
import torch

from pkmem.ops import dispatch, reference

GRAD_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _inputs(T, H, n, D, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2 * D, generator=g).to(device, dtype)
    sk = torch.randn(H, 2, n, D, generator=g).to(device, dtype)
    return q, sk


def _check_selection(q, sk, topk, scores, idx, atol=1e-5, rtol=1e-5):
    """scores are the brute-force top-k scores (sorted), idx are distinct slots scoring `scores`."""
    n = sk.shape[2]
    assert not torch.isnan(scores).any()
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < n * n)).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "a slot is selected twice"
    best, _ = reference.brute_force_product_topk(q, sk, topk)
    torch.testing.assert_close(scores, best, atol=atol, rtol=rtol)
    half = reference.subkey_scores(q, sk)
    again = half[..., 0, :].gather(-1, idx // n) + half[..., 1, :].gather(-1, idx % n)
    torch.testing.assert_close(scores, again, atol=atol, rtol=rtol)


@contextlib.contextmanager
def _float32_matmul_precision(value: str):
    """torch.set_float32_matmul_precision(value) inside the block, the previous setting after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def test_float32_precision_follows_torch():
    from pkmem.ops.triton._common import float32_precision

    for value, want in [("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")]:
        with _float32_matmul_precision(value):
            assert float32_precision() == want
    assert float32_precision() == ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")


@pytest.mark.parametrize("fused", [False, True])
def test_precision_read_at_call_time(kernels, device, fused):
    """Float32 products follow torch.set_float32_matmul_precision at each call, forward and
    backward: "highest" gives the float64 reference's scores and gradients to float32 precision and
    the brute-force slots; "high" gives tf32 products (~1e-3 relative: under the interpreter the
    kernels round their operands as the tensor cores do), then "highest" again exact float32."""
    from pkmem.ops.triton.search import search_backward, search_forward

    T, H, n, D, k = 24, 2, 40, 16, 6
    q, sk = _inputs(T, H, n, D, device, seed=21)
    cfg = {"FUSED": True, "BT": 16, "BN": 16, "NG": 16, "BD": 16} if fused else None
    exact, _ = reference.product_topk(q.double(), sk.double(), k)
    gs = torch.randn(T, H, k, generator=torch.Generator().manual_seed(22)).to(device)
    errors = []
    for value in ("highest", "high", "highest"):
        with _float32_matmul_precision(value):
            scores, idx = search_forward(q, sk, k, config=cfg)
            gq, gk = search_backward(gs, q, sk, idx)
        qq, kk = q.double().requires_grad_(), sk.double().requires_grad_()
        half = reference.subkey_scores(qq, kk)
        (((half[..., 0, :].gather(-1, idx // n) + half[..., 1, :].gather(-1, idx % n)) * gs).sum()).backward()
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        errors.append((rel(scores, exact), rel(gq, qq.grad), rel(gk, kk.grad)))
        if value == "highest":
            _check_selection(q, sk, k, scores, idx, atol=1e-5, rtol=1e-5)
    for e in (errors[0], errors[2]):
        assert max(e) < 1e-6, errors
    assert all(1e-5 < e < 1e-2 for e in errors[1]), errors


def test_precision_under_torch_compile(kernels, device):
    """Compiled, the search reads the setting when it is traced, and torch.compile recompiles when
    the setting changes (the precision is a constant of the compiled graph, as of a CUDA graph)."""
    q, sk = _inputs(12, 2, 24, 8, device, seed=23)
    exact, _ = reference.product_topk(q.double(), sk.double(), 5)
    compiled = torch.compile(lambda a, b: kernels.product_topk(a, b, 5)[0], fullgraph=True, backend="eager")
    rel = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(compiled(q, sk)) < 1e-6
    with _float32_matmul_precision("high"):
        assert 1e-5 < rel(compiled(q, sk)) < 1e-2
    assert rel(compiled(q, sk)) < 1e-6


@pytest.mark.parametrize(
    "T,H,n,D,topk",
    [
        (7, 2, 37, 5, 5),
        (3, 1, 16, 8, 16),
        (19, 3, 50, 3, 8),
        (1, 1, 2, 1, 1),
        (33, 1, 20, 16, 3),
        (5, 2, 7, 3, 7),
    ],
)
def test_forward_matches_brute_force(kernels, device, T, H, n, D, topk):
    q, sk = _inputs(T, H, n, D, device)
    scores, idx = kernels.product_topk(q, sk, topk)
    _check_selection(q, sk, topk, scores, idx)
    rs, ri = reference.product_topk(q, sk, topk)
    torch.testing.assert_close(scores, rs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg,topk",
    [
        ({"BT": 16, "BN": 16, "NG": 16}, 4),  # several key chunks, threshold + compaction
        ({"BT": 16, "BN": 16, "NG": 8, "CAP": 4}, 3),  # every block overflows: streaming bitonic path
        ({"BT": 16, "BN": 16, "NG": 16, "BD": 16, "FUSED": True}, 3),  # scores by tl.dot in the kernel
        ({"BT": 16, "BN": 32, "NG": 16, "BD": 16, "FUSED": True, "CAP": 8}, 4),
        ({"BT": 16, "BN": 16, "NG": 16, "CAP": 8, "TOPK": 0}, 4),  # tl.topk's bitonic network
        ({"BT": 16, "BN": 32, "NG": 16, "EXACT": False}, 3),  # final top-k on truncated int32 keys
    ],
)
def test_kernel_paths(kernels, device, cfg, topk):
    """Every path of the search kernel: chunks, compaction, overflow fallback, fused scores."""
    from pkmem.ops.triton.search import search_forward

    q, sk = _inputs(19, 1, 45, 4, device, seed=1)
    scores, idx = search_forward(q, sk, topk, config=cfg)
    _check_selection(q, sk, topk, scores, idx)


def test_ties_select_equal_scores(kernels, device):
    """Duplicated sub-keys and integer inputs tie exactly: any choice among ties is right, so the
    selected SCORES must equal the brute-force ones."""
    g = torch.Generator().manual_seed(2)
    T, H, n, D, topk = 9, 2, 12, 3, 8
    sk = torch.randint(-2, 3, (H, 2, n // 3, D), generator=g).float().repeat(1, 1, 3, 1)
    q = torch.randint(-2, 3, (T, H, 2 * D), generator=g).float()
    q, sk = q.to(device), sk.to(device)
    scores, idx = kernels.product_topk(q, sk, topk)
    _check_selection(q, sk, topk, scores, idx, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(kernels, device, dtype):
    q, sk = _inputs(6, 2, 24, 6, device, dtype=dtype, seed=3)
    scores, idx = kernels.product_topk(q, sk, 6)
    rs, _ = reference.product_topk(q, sk, 6)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, rs, atol=1e-5, rtol=1e-5)
    _check_selection(q.float(), sk.float(), 6, scores, idx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_query_rounds_the_subkeys(kernels, device, dtype):
    """A 16-bit query (the query network's output under autocast) with float32 sub-keys: both
    backends take the sub-keys rounded to the query's dtype (16-bit operands, float32 sums)."""
    q, sk = _inputs(9, 2, 24, 6, device, seed=13)
    q = q.to(dtype)
    scores, idx = kernels.product_topk(q, sk, 6)
    rs, ri = reference.product_topk(q, sk, 6)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(scores, rs, atol=1e-5, rtol=1e-5)
    _check_selection(q.float(), sk.to(dtype).float(), 6, scores, idx, atol=1e-5, rtol=1e-5)
    # not the float32 sub-keys' scores: the rounding is applied (it moves the scores by ~1e-3)
    exact, _ = reference.product_topk(q.float(), sk, 6)
    assert (scores - exact).abs().max().item() > 1e-5


def _grads(fn, q, sk, topk, g):
    q = q.detach().clone().requires_grad_()
    sk = sk.detach().clone().requires_grad_()
    scores, idx = fn(q, sk, topk)
    (scores * g).sum().backward()
    return scores.detach(), idx, q.grad, sk.grad


@pytest.mark.parametrize("T,H,n,D,topk", [(7, 2, 37, 5, 5), (20, 1, 16, 4, 16)])
def test_gradients_match_reference(kernels, device, T, H, n, D, topk):
    q, sk = _inputs(T, H, n, D, device, seed=4)
    g = torch.randn(T, H, topk, generator=torch.Generator().manual_seed(5)).to(device)
    s1, i1, gq1, gk1 = _grads(kernels.product_topk, q, sk, topk, g)
    s2, i2, gq2, gk2 = _grads(reference.product_topk, q, sk, topk, g)
    assert torch.equal(i1, i2)  # random inputs: no ties
    torch.testing.assert_close(gq1, gq2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk1, gk2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("score", ["none", "softmax"])
@pytest.mark.parametrize("q16", [False, True])
def test_16bit_backward_products(kernels, device, grad_dtype, score, q16):
    """grad_dtype (what autocast picks): 16-bit half-score gradient and product operands, float32
    sums: the float32 backward's gradients to 16-bit precision, in the inputs' dtypes. ``q16``: the
    query already in grad_dtype (under autocast), used as the product's operand without a copy."""
    from pkmem.ops.triton.search import search_backward, search_forward

    T, H, n, D, topk = 21, 2, 37, 9, 6
    q, sk = _inputs(T, H, n, D, device, seed=8)
    if score == "softmax":  # a strided query (tokens and heads swapped): the kernel's bf16 copy
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    if q16:
        q = q.to(GRAD_DTYPES[grad_dtype])
    w, idx = search_forward(q, sk, topk, score=score)
    gw = torch.randn(T, H, topk, generator=torch.Generator().manual_seed(9)).to(device)
    ref = search_backward(gw, q.float(), sk, idx, weights=w, score=score, precision="ieee")
    out = search_backward(gw, q, sk, idx, weights=w, score=score, grad_dtype=grad_dtype)
    for a, b, t in zip(out, ref, (q, sk)):
        assert a.dtype == t.dtype
        assert ((a.float() - b).norm() / b.norm()).item() < 1e-2
    gq, gk = search_backward(gw, q, sk, idx, weights=w, score=score, grad_dtype=grad_dtype, need_query=False)
    assert gq is None and torch.equal(gk, out[1])


def test_16bit_backward_choice_and_errors(kernels, device):
    from pkmem.ops.triton.search import autocast_grad_dtype, search_backward

    # no CUDA autocast: float32 products; under CUDA autocast 16-bit ones, whatever the float32
    # matmul precision (as torch's own matmuls under autocast)
    assert autocast_grad_dtype(torch.device("cpu")) == "float32"
    assert autocast_grad_dtype(device) == "float32"
    if device.type == "cuda":
        with _float32_matmul_precision("highest"), torch.autocast("cuda", dtype=torch.bfloat16):
            assert autocast_grad_dtype(device) == "bfloat16"
    q, sk = _inputs(3, 1, 8, 2, device)
    idx = torch.zeros(3, 1, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="grad_dtype='float64' is not allowed"):
        search_backward(torch.ones(3, 1, 2, device=device), q, sk, idx, grad_dtype="float64")
    with pytest.raises(ValueError, match="precision='fp32' is not allowed"):
        search_backward(torch.ones(3, 1, 2, device=device), q, sk, idx, precision="fp32")


def test_half_scores_float32_under_autocast_and_settings_restored(kernels, device):
    """The half scores are float32 products under autocast; autocast and the float32 matmul
    setting are as before afterwards (also for "ieee", which changes the setting inside)."""
    from pkmem.ops.triton.search import half_scores

    q, sk = _inputs(5, 2, 9, 4, device, seed=3)
    mm = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"
    before = getattr(mm, name)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for precision in ("ieee", "tf32"):
            s = half_scores(q, sk, precision)
            assert s.dtype == torch.float32
            assert torch.is_autocast_enabled(device.type) and getattr(mm, name) == before
    torch.testing.assert_close(s, reference.subkey_scores(q, sk).permute(1, 2, 0, 3), atol=1e-2, rtol=1e-2)


def test_gradient_only_to_subkeys(kernels, device):
    q, sk = _inputs(4, 2, 10, 3, device, seed=6)
    sk = sk.requires_grad_()
    scores, _ = kernels.product_topk(q, sk, 3)
    scores.sum().backward()
    ref = sk.detach().clone().requires_grad_()
    reference.product_topk(q, ref, 3)[0].sum().backward()
    torch.testing.assert_close(sk.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_custom_op_registration(kernels, device):
    """Schema and fake (meta) implementations of the custom ops that torch.compile sees, and the
    autograd Function's compiled branch (forward and backward ops) run eagerly."""
    from pkmem.ops.triton import search

    q, sk = _inputs(5, 2, 12, 4, device, seed=7)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(search._product_lookup_op, (q, sk, 4, "ieee", "softmax", 0.5), test_utils=utils)
    g = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(8)).to(device)
    q.requires_grad_()
    sk.requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "_compiling", lambda: True)
        w, idx = kernels.product_lookup(q, sk, 4, "softmax", 0.5)
        (w * g).sum().backward()
    ref_q, ref_k = q.detach().clone().requires_grad_(), sk.detach().clone().requires_grad_()
    (reference.product_lookup(ref_q, ref_k, 4, "softmax", 0.5)[0] * g).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sk.grad, ref_k.grad, atol=1e-5, rtol=1e-5)


def test_backward_op_fake_strides_of_a_strided_query(kernels, device):
    """A strided query (tokens and heads swapped): the fake (meta) gradients have the strides of
    the real (contiguous) ones, else torch.compile's stride assertions fail; a gradient not asked
    for is an empty tensor."""
    from pkmem.ops.triton import search

    q, sk = _inputs(3, 4, 5, 3, device, seed=9)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q.is_contiguous()
    w, idx = search.search_forward(q, sk, 3)
    cases = (("ieee", "float32", (True, True)), ("tf32", "bfloat16", (False, True)))
    for precision, grad_dtype, need in cases:
        args = (torch.randn_like(w), w, q, sk, idx, *need, precision, "none", 1.0, grad_dtype)
        torch.library.opcheck(
            search._product_lookup_backward_op, args, test_utils=("test_schema", "test_faketensor")
        )
    gq, gk = search._product_lookup_backward_op(*args)
    assert gq.numel() == 0 and gk.shape == sk.shape


@pytest.mark.parametrize("score", ["softmax", "relu", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("T,H,n,D,topk", [(7, 2, 37, 5, 5), (11, 1, 9, 3, 9)])
def test_score_function_in_kernel_matches_reference(kernels, device, score, temperature, T, H, n, D, topk):
    """product_lookup: the score function applied in the kernel (forward) and in the scatter kernel
    (backward) equals the reference's score_weights after the reference search."""
    q, sk = _inputs(T, H, n, D, device, seed=9)
    if score == "relu":  # every score of even tokens < 0, of odd tokens > 0: both sides of relu
        sk = -sk.abs()
        q = q.abs() * torch.where(torch.arange(T, device=device) % 2 == 0, 1.0, -1.0)[:, None, None]
    g = torch.randn(T, H, topk, generator=torch.Generator().manual_seed(10)).to(device)
    out = []
    for fn in (kernels.product_lookup, reference.product_lookup):
        qq, kk = q.clone().requires_grad_(), sk.clone().requires_grad_()
        w, idx = fn(qq, kk, topk, score, temperature)
        (w * g).sum().backward()
        out.append((w.detach(), idx, qq.grad, kk.grad))
    (w1, i1, gq1, gk1), (w2, i2, gq2, gk2) = out
    assert torch.equal(i1, i2)
    for a, b in [(w1, w2), (gq1, gq2), (gk1, gk2)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if score == "relu":
        assert (w1[0::2] == 0).all() and (w1[1::2] > 0).all() and (gq1[0::2] == 0).all()
    # without autograd the forward alone runs (no graph), with the same result
    with torch.no_grad():
        w3, i3 = kernels.product_lookup(q, sk, topk, score, temperature)
    assert torch.equal(w3, w1) and torch.equal(i3, i1) and not w3.requires_grad


def test_lookup_dispatch_rejects_unknown_score(device):
    q, sk = _inputs(2, 1, 8, 2, device)
    with pytest.raises(ValueError, match="score='sigmoid'"):
        dispatch.product_lookup(q, sk, 2, "sigmoid")


def test_dispatch_errors(device):
    q, sk = _inputs(2, 1, 8, 2, device)
    with pytest.raises(ValueError, match="backend"):
        dispatch.product_topk(q, sk, 2, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        dispatch.product_topk(q.double(), sk.double(), 2, backend="triton")
    # auto picks the reference for float64 (and for CPU tensors)
    s, _ = dispatch.product_topk(q.double(), sk.double(), 2, backend="auto")
    assert s.dtype == torch.float64


def test_dispatch_bad_topk(kernels, device):
    q, sk = _inputs(2, 1, 8, 2, device)
    with pytest.raises(ValueError, match="topk"):
        dispatch.product_topk(q, sk, 9, backend="triton")


# ---- real sizes, on the GPU ------------------------------------------------------------------------


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("n", [512, 1024])
@pytest.mark.parametrize("precision,fused", [("tf32", False), ("ieee", False), ("tf32", True)])
@pytest.mark.parametrize("topk", [32, 20])
def test_paper_size_gpu(kernels, n, precision, fused, topk):
    from pkmem.ops.triton import search
    from pkmem.ops.triton.search import search_backward, search_forward

    T, H, D = 8192, 4, 256
    g = torch.Generator(device="cuda").manual_seed(n + topk)
    q = torch.randn(T, H, 2 * D, device="cuda", generator=g)
    sk = torch.randn(H, 2, n, D, device="cuda", generator=g) / D**0.5
    scores, idx = search_forward(q, sk, topk, precision, config={"FUSED": fused})
    rs, _ = reference.product_topk(q, sk, topk)  # float32 (no tf32) in torch's default settings
    atol = 1e-4 if precision == "ieee" else 2e-2  # half scores ~N(0, 1); tf32 rounds inputs to 11 bits
    torch.testing.assert_close(scores, rs, atol=atol, rtol=0)
    _check_selection(q[:64], sk, topk, scores[:64], idx[:64], atol=atol, rtol=0)
    # backward, against the reference's gradient through the same selection
    gs = torch.randn(T, H, topk, device="cuda", generator=g)
    gq, gk = search_backward(gs, q, sk, idx, precision=precision)
    gq2, gk2 = search_backward(gs, q, sk, idx, precision=precision)
    assert torch.equal(gq, gq2) and torch.equal(gk, gk2), "backward is not deterministic"
    qq, kk = q.clone().requires_grad_(), sk.clone().requires_grad_()
    half = reference.subkey_scores(qq, kk)
    sel = half[..., 0, :].gather(-1, idx // n) + half[..., 1, :].gather(-1, idx % n)
    (sel * gs).sum().backward()
    tol = 1e-5 if precision == "ieee" else 3e-3
    assert _rel(gq, qq.grad) < tol and _rel(gk, kk.grad) < tol, (_rel(gq, qq.grad), _rel(gk, kk.grad))
    if precision == "tf32" and not fused:  # the products under bf16 autocast: 16-bit operands
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gq, gk = search_backward(gs, q, sk, idx, grad_dtype=search.autocast_grad_dtype(q.device))
        assert _rel(gq, qq.grad) < 1e-2 and _rel(gk, kk.grad) < 1e-2, (_rel(gq, qq.grad), _rel(gk, kk.grad))


for _mark in GPU:
    test_paper_size_gpu = _mark(test_paper_size_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_and_cuda_graph_gpu(kernels):
    """The search inside torch.compile, and captured in a CUDA graph, equals eager."""
    q = torch.randn(512, 4, 512, device="cuda")
    sk = torch.randn(4, 2, 512, 256, device="cuda") / 16
    eager = dispatch.product_topk(q, sk, 32, backend="triton")
    compiled = torch.compile(lambda a, b: dispatch.product_topk(a, b, 32, backend="triton"), fullgraph=True)
    out = compiled(q, sk)
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    static_q = q.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dispatch.product_topk(static_q, sk, 32, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gs, gi = dispatch.product_topk(static_q, sk, 32, backend="triton")
    q2 = torch.randn_like(q)
    static_q.copy_(q2)
    graph.replay()
    e2 = dispatch.product_topk(q2, sk, 32, backend="triton")
    assert torch.equal(gs, e2[0]) and torch.equal(gi, e2[1])


def _distinct_in_range(idx, n):
    assert ((idx >= 0) & (idx < n * n)).all(), "a slot index out of range"
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "a slot is selected twice"


@pytest.mark.parametrize(
    "cfg",
    [None, {"TOPK": 0, "BT": 4}, {"BT": 16, "BN": 16, "NG": 16, "CAP": 4}, {"EXACT": False}],
)
def test_minus_inf_scores_give_real_distinct_slots(kernels, device, cfg):
    """Fewer finite slots than topk: the rest are real -inf slots, never padding (columns past n,
    unused scratch or candidate places), never twice; their scores are the brute-force ones."""
    from pkmem.ops.triton.search import search_forward

    g = torch.Generator().manual_seed(12)
    n, topk = 20, 4
    q = torch.ones(3, 1, 2).to(device)
    sk = torch.randn(1, 2, n, 1, generator=g).to(device)
    sk[0, 0, 1:] = float("-inf")  # one finite sub-key in the first half
    sk[0, 1, 2:] = float("-inf")  # two in the second: two finite slots < topk
    scores, idx = search_forward(q, sk, topk, config=cfg)
    _distinct_in_range(idx, n)
    best, _ = reference.brute_force_product_topk(q, sk, topk)
    torch.testing.assert_close(scores, best)
    if cfg is None:  # a whole half at -inf
        sk[0, 0] = float("-inf")
        scores, idx = search_forward(q, sk, 8)
        _distinct_in_range(idx, n)
        assert (scores == float("-inf")).all()


def test_nan_scores_rank_first_on_real_distinct_slots(kernels, device):
    """NaN half scores rank first (as in torch.topk), reported as +inf; slots stay real and distinct."""
    q, sk = _inputs(5, 2, 11, 3, device, seed=13)
    sk[0, 0, 4] = float("nan")
    q[1, 1, 0] = float("nan")
    scores, idx = kernels.product_topk(q, sk, 5)
    _distinct_in_range(idx, 11)
    assert (idx[:, 0, 0] // 11 == 4).all() and (scores[:, 0, 0] == float("inf")).all()
    w, _ = kernels.product_lookup(q, sk, 5, "softmax")
    assert torch.isnan(w[:, 0]).all()  # the NaN is not hidden: it reaches the weights


def test_config_and_temperature_errors(kernels, device):
    from pkmem.ops.triton.search import search_forward

    q, sk = _inputs(4, 1, 70, 2, device, seed=14)
    with pytest.raises(ValueError, match="NG=2"):
        search_forward(q, sk, 3, config={"NG": 2})
    with pytest.raises(ValueError, match="NG=64"):
        search_forward(q, sk, 3, config={"BN": 16})
    with pytest.raises(ValueError, match="BT=3"):
        search_forward(q, sk, 3, config={"BT": 3})
    with pytest.raises(ValueError, match="BT=8.*FUSED"):
        search_forward(q, sk, 3, config={"BT": 8, "FUSED": True})
    for t in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="temperature"):
            dispatch.product_lookup(q, sk, 3, "softmax", t, backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        kernels.product_lookup(q, sk, 3, "softmax", 0.0)
