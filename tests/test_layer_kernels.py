"""ProductKeyMemory with backend="triton" against backend="torch": forward and every gradient.

On a CPU the kernels run under Triton's interpreter (set here before they are imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pkmem import ProductKeyMemory, ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    try:
        from pkmem.ops.triton import _common
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"triton kernels do not import: {e}")
    if DEVICE.type == "cpu" and not _common.INTERPRET:
        pytest.skip("no CUDA device and the kernels were imported without TRITON_INTERPRET=1")
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _pair(**kw):
    torch.manual_seed(0)
    fast = ProductKeyMemory(backend="triton", **kw).to(DEVICE)
    ref = ProductKeyMemory(backend="torch", **kw).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _run(layer, x, mask, grad):
    x = x.detach().clone().requires_grad_()
    out = layer(x, mask)
    (out * grad).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


SMALL = dict(dim=12, heads=2, num_keys=7, topk=3, k_dim=10)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score": "relu", "query_norm": "layernorm", "v_dim": 9},
        {"gate": "swilu", "normalize_query": True, "topk": 7},
        {"sparse_values": True, "query_hidden": (8,)},
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_triton_equals_torch(kw, masked):
    fast, ref = _pair(**{**SMALL, **kw})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, SMALL["dim"], generator=g).to(DEVICE)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]], device=DEVICE) if masked else None
    grad = torch.randn(2, 5, SMALL["dim"], generator=g).to(DEVICE)
    out1, gx1, g1 = _run(fast, x, mask, grad)
    out2, gx2, g2 = _run(ref, x, mask, grad)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and "values" in g1 and "subkeys" in g1
    for name in g1:
        a, b = g1[name], g2[name]
        if a.is_sparse:
            assert a._nnz() <= int((mask.sum() if masked else 10) * fast.heads * fast.topk)
            a, b = a.to_dense(), b.to_dense()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")
    if masked:  # masked tokens read no slot
        assert (out1[1, [2, 4]] == 0).all()


def test_layer_bf16_values_table():
    fast, ref = _pair(**SMALL)
    for layer in (fast, ref):
        layer.values.data = layer.values.data.bfloat16()
    x = torch.randn(3, SMALL["dim"], device=DEVICE)
    out1, _, g1 = _run(fast, x, None, torch.ones(3, SMALL["dim"], device=DEVICE))
    out2, _, g2 = _run(ref, x, None, torch.ones(3, SMALL["dim"], device=DEVICE))
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    assert g1["values"].dtype == torch.bfloat16
    torch.testing.assert_close(g1["values"], g2["values"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("query_norm", ["batchnorm", "none", "layernorm"])
def test_layer_under_autocast_16bit_queries(query_norm):
    """Under bf16 autocast the queries stay in the query network's dtype (bf16 from the linear
    layer and the BatchNorm) and both backends search with the same 16-bit operands: equal
    outputs and gradients."""
    fast, ref = _pair(**SMALL, query_norm=query_norm)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, SMALL["dim"], generator=g).to(DEVICE)
    grad = torch.randn(9, SMALL["dim"], generator=g).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        q = fast.query(x)
        out1, gx1, g1 = _run(fast, x, None, grad)
        out2, gx2, g2 = _run(ref, x, None, grad)
    if query_norm != "layernorm":  # (layer_norm's autocast dtype depends on the device type)
        assert q.dtype == torch.bfloat16
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-2, rtol=1e-2)  # bf16 gradients of bf16 queries
    assert g1.keys() == g2.keys()
    for name in g1:
        msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(g1[name], g2[name], atol=1e-2, rtol=1e-2, msg=msg)


def test_a_call_does_not_check_the_configuration_again(monkeypatch):
    """The kernels' path too: the layer's configuration is checked when it is built, not per call."""
    from pkmem.ops import dispatch, reference

    fast, ref = _pair(**SMALL)
    x = torch.randn(6, SMALL["dim"], device=DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("a call checked the layer's configuration again")

    checks = [(reference, "check_score"), (reference, "check_batch_norm"), (dispatch, "_check_topk")]
    for module, name in checks:
        monkeypatch.setattr(module, name, refuse)
    out, _, _ = _run(fast, x, None, torch.ones_like(x))
    torch.testing.assert_close(out, _run(ref, x, None, torch.ones_like(x))[0], atol=1e-5, rtol=1e-5)


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    from pkmem.ops import dispatch

    monkeypatch.delenv("PKMEM_BACKEND", raising=False)
    t = torch.zeros(2, 2)
    assert dispatch.resolve_backend("auto", t) == "torch"
    monkeypatch.setenv("PKMEM_BACKEND", "torch")
    assert dispatch.resolve_backend("auto", t.to(DEVICE)) == "torch"
    monkeypatch.setenv("PKMEM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PKMEM_BACKEND"):
        dispatch.resolve_backend("auto", t)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    from pkmem.ops import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        dispatch.resolve_backend("triton", torch.zeros(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_layer_paper_size_autocast_gpu(precision):
    """bf16 autocast, fp32 parameters, the paper's setting at 2048 tokens: kernels vs reference,
    under torch's float32 matmul precision ``precision`` (both backends follow it).

    Both search with the same 16-bit operands (float32 sums) and select the same slots; the
    kernels' backward takes 16-bit operands under autocast. With "high" the reference's float32
    products run in tf32: the tolerance allows for that and for near-ties among the ~k candidates
    around the k-th resolved differently, which moves the output by a few percent in norm."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        _paper_size_autocast(precision)
    finally:
        torch.set_float32_matmul_precision(before)


def _paper_size_autocast(precision):
    fast, ref = _pair(dim=1024, heads=4, num_keys=512, topk=32, k_dim=512)
    x = torch.randn(4, 512, 1024, device="cuda")
    grad = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out1, gx1, g1 = _run(fast, x, None, grad)
        out2, gx2, g2 = _run(ref, x, None, grad)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    # where the two differ: the selection on the same queries
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        q = fast.query(x).reshape(-1, 4, 512)
    s1, i1 = ops.product_topk(q, fast.subkeys, 32, backend="triton")
    s2, i2 = ops.product_topk(q, ref.subkeys, 32, backend="torch")
    differ = (i1.sort(-1).values != i2.sort(-1).values).any(-1).float().mean().item()
    info = f"rows selecting other slots {differ:.2e}, max score diff {(s1 - s2).abs().max().item():.2e}"
    tol = 1e-2 if precision == "highest" else 0.1
    assert rel(out1, out2) < tol, (rel(out1, out2), info)
    print(f"[{precision}] out rel {rel(out1, out2):.2e}; {info}")
    assert rel(gx1, gx2) < tol, rel(gx1, gx2)
    assert g1.keys() == g2.keys()
    for name in g1:
        if name.startswith("query_net.linears.") and name.endswith(".bias"):
            # BatchNorm follows: this gradient is ~0 up to rounding, so compare it to the weight's
            scale = g2[name.replace(".bias", ".weight")].float().norm()
            assert (g1[name] - g2[name]).float().norm() < tol * scale, name
            continue
        assert rel(g1[name], g2[name]) < tol, (name, rel(g1[name], g2[name]))
