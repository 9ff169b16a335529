"""ProductKeyMemory: exactness through the inspection API, gradients, the mask, every option, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from pkmem import ProductKeyMemory
from pkmem.ops import reference as ref

SMALL = dict(heads=2, num_keys=9, topk=4, k_dim=6)


def _mem(dim=10, seed=0, **kw):
    torch.manual_seed(seed)
    return ProductKeyMemory(dim, **{**SMALL, **kw})


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- exactness through the inspection API ------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_keys,topk,k_dim,heads", [(16, 4, 8, 1), (23, 7, 10, 3), (32, 32, 4, 2)])
def test_lookup_equals_brute_force_over_all_slots(seed, num_keys, topk, k_dim, heads):
    mem = ProductKeyMemory(12, heads=heads, num_keys=num_keys, topk=topk, k_dim=k_dim).eval()
    x = _x(3, 5, 12, seed=seed)
    q = mem.query(x)  # (3, 5, H, k_dim)
    assert q.shape == (3, 5, heads, k_dim)
    assert mem.subkeys.shape == (heads, 2, num_keys, k_dim // 2)
    weights, indices = mem.lookup(x)
    assert weights.shape == indices.shape == (3, 5, heads, topk)
    # brute force: the score of slot i is q1 . c1[i // n] + q2 . c2[i % n]
    half = k_dim // 2
    q1, q2 = q[..., :half].double(), q[..., half:].double()
    c1, c2 = mem.subkeys[:, 0].double(), mem.subkeys[:, 1].double()  # (H, n, half)
    s1 = torch.einsum("bthd,hnd->bthn", q1, c1)
    s2 = torch.einsum("bthd,hnd->bthn", q2, c2)
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (3, 5, H, n*n)
    best = full.topk(topk, dim=-1).values
    chosen = full.gather(-1, indices)
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.double(), best.softmax(-1), rtol=1e-5, atol=1e-6)


def test_forward_is_the_weighted_sum_of_values():
    mem = _mem(heads=3, topk=5).eval()
    x = _x(7, 10)
    weights, indices = mem.lookup(x)
    expected = (weights[..., None] * mem.values[indices]).sum((-2, -3))  # heads summed
    torch.testing.assert_close(mem(x), expected, rtol=1e-5, atol=1e-6)


def test_flat_keys_search_all_slots():
    mem = _mem(product_keys=False).eval()
    assert not hasattr(mem, "subkeys") and mem.keys.shape == (2, 81, 6)
    x = _x(8, 10)
    weights, indices = mem.lookup(x)
    full = torch.einsum("thd,hnd->thn", mem.query(x), mem.keys)
    torch.testing.assert_close(full.gather(-1, indices), full.topk(4, dim=-1).values)
    torch.testing.assert_close(weights, full.topk(4, dim=-1).values.softmax(-1))


# ---- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(query_norm, sparse):
    mem = _mem(dim=5, num_keys=6, topk=3, k_dim=4, query_norm=query_norm, sparse_values=sparse).double()
    x = _x(2, 3, 5, dtype=torch.float64).requires_grad_(True)
    names = ["query_net.linears.0.weight", "subkeys", "values"]
    params = dict(mem.named_parameters())

    def f(x, w, keys, values):
        p = {**params, names[0]: w, "subkeys": keys, "values": values}
        return torch.func.functional_call(mem, p, (x,))

    inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
    if not sparse:
        assert torch.autograd.gradcheck(f, inputs)
    else:  # gradcheck with sparse gradients: compare the densified sparse gradient with the dense one
        out = f(*inputs)
        g = torch.randn_like(out)
        out.backward(g)
        dense = ProductKeyMemory(
            5, **{**SMALL, "num_keys": 6, "topk": 3, "k_dim": 4, "query_norm": query_norm}
        )
        dense = dense.double()
        dense.load_state_dict(mem.state_dict())
        inputs2 = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
        torch.func.functional_call(
            dense,
            {
                **dict(dense.named_parameters()),
                names[0]: inputs2[1],
                "subkeys": inputs2[2],
                "values": inputs2[3],
            },
            (inputs2[0],),
        ).backward(g)
        assert inputs[3].grad.is_sparse
        torch.testing.assert_close(inputs[3].grad.to_dense(), inputs2[3].grad)
        for a, b in zip(inputs[:3], inputs2[:3]):
            torch.testing.assert_close(a.grad, b.grad)


def test_gradients_reach_every_parameter():
    mem = _mem(query_hidden=(7,), gate="swilu", v_dim=6, query_norm="layernorm")
    mem(_x(4, 5, 10)).square().sum().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sparse_values_work_with_sparse_adam():
    mem = _mem(sparse_values=True)
    opt = torch.optim.SparseAdam([mem.values], lr=0.1)
    before = mem.values.detach().clone()
    x = _x(6, 10)
    _, idx = mem.lookup(x)
    mem(x).sum().backward()
    assert mem.values.grad.is_sparse
    opt.step()
    changed = (mem.values.detach() != before).any(-1)
    touched = torch.zeros(mem.num_slots, dtype=torch.bool)
    touched[idx.flatten()] = True
    assert torch.equal(changed, touched)


# ---- the mask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("sparse", [False, True])
def test_mask_zeroes_outputs_and_drops_padding_everywhere(query_norm, sparse):
    x = _x(2, 6, 10)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    x_pad = x.clone()
    x_pad[~mask] = 1e3  # padding content must not matter
    a, b = (
        _mem(query_norm=query_norm, sparse_values=sparse),
        _mem(query_norm=query_norm, sparse_values=sparse),
    )
    out = a(x_pad, mask)
    assert (out[~mask] == 0).all()
    # real positions: same result as running on the real tokens alone (BatchNorm statistics too)
    out_real = b(x[mask])
    torch.testing.assert_close(out[mask], out_real, rtol=1e-5, atol=1e-6)
    if query_norm == "batchnorm":
        bn_a, bn_b = a.query_net.norms[0], b.query_net.norms[0]
        torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)
        torch.testing.assert_close(bn_a.running_var, bn_b.running_var)
    # the values' gradient is untouched by padding
    g = torch.randn_like(out)
    out.backward(g)
    out_real.backward(g[mask])
    ga, gb = a.values.grad, b.values.grad
    if sparse:
        assert set(ga.coalesce().indices()[0].tolist()) == set(gb.coalesce().indices()[0].tolist())
        ga, gb = ga.to_dense(), gb.to_dense()
    torch.testing.assert_close(ga, gb)
    # lookup: masked positions have weight 0 and index -1
    w, idx = a.eval().lookup(x_pad, mask)
    assert (w[~mask] == 0).all() and (idx[~mask] == -1).all() and (idx[mask] >= 0).all()


def test_all_masked_and_empty_inputs():
    mem = _mem()
    mem(_x(8, 10))
    bn = mem.query_net.norms[0]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = _x(3, 10)
    out = mem(x, torch.zeros(3, dtype=torch.bool))
    assert out.shape == (3, 10) and (out == 0).all()
    # a batch of padding only does not move the BatchNorm running statistics
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert mem(torch.zeros(0, 10)).shape == (0, 10)
    assert mem(torch.zeros(2, 0, 10)).shape == (2, 0, 10)


# ---- options ----------------------------------------------------------------------------------------
def test_default_is_the_paper_setting():
    mem = ProductKeyMemory(1024)
    assert (mem.heads, mem.num_keys, mem.topk, mem.k_dim, mem.v_dim) == (4, 512, 32, 512, 1024)
    assert mem.num_slots == 512**2 and mem.query_norm == "batchnorm" and mem.score == "softmax"
    assert mem.out_proj is None and mem.gate_proj is None and mem.product_keys


def test_initialisation_follows_the_paper_code():
    torch.manual_seed(0)
    mem = ProductKeyMemory(64, heads=2, num_keys=64, topk=4, k_dim=32, v_dim=256)
    bound = 1 / math.sqrt(16)
    assert mem.subkeys.abs().max() <= bound and mem.subkeys.abs().max() > 0.95 * bound
    assert abs(mem.values.std().item() - 256**-0.5) < 0.02 * 256**-0.5
    assert abs(mem.values.mean().item()) < 1e-3
    flat = ProductKeyMemory(64, heads=2, num_keys=8, topk=4, k_dim=32, product_keys=False)
    assert flat.keys.abs().max() <= 1 / math.sqrt(32)
    assert (ProductKeyMemory(16, **SMALL, zero_init_values=True).values == 0).all()


def test_seeds_are_respected():
    a, b, c = _mem(seed=3), _mem(seed=3), _mem(seed=4)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), name
        if p.is_floating_point() and p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, r), name


@pytest.mark.parametrize("score", ["softmax", "relu", "none"])
def test_score_functions_and_temperature(score):
    mem = _mem(score=score, temperature=0.5).eval()
    x = _x(5, 10)
    w, idx = mem.lookup(x)
    q = mem.query(x)
    s = ref.product_topk(q, mem.subkeys, 4)[0] / 0.5
    expected = {"softmax": s.softmax(-1), "relu": s.relu(), "none": s}[score]
    torch.testing.assert_close(w, expected)


def test_layernorm_and_normalize_query():
    mem = _mem(query_norm="layernorm", normalize_query=True).eval()
    q = mem.query(_x(4, 10)).view(4, 2, 2, 3)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4, 2, 2))
    ln = _mem(query_norm="layernorm").eval()
    q = ln.query(_x(4, 10)).view(4, 2, 2, 3)
    torch.testing.assert_close(q.mean(-1), torch.zeros(4, 2, 2), atol=1e-6, rtol=0)
    assert ln.query_net.norms is None


def test_batchnorm_train_and_eval():
    mem = _mem()
    x = _x(64, 10) * 3 + 1
    q = mem.query(x)  # training: batch statistics -> zero mean, unit variance per feature
    torch.testing.assert_close(q.mean(0), torch.zeros(2, 6), atol=1e-5, rtol=0)
    bn = mem.query_net.norms[0]
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros(12))
    mem.eval()
    out1, out2 = mem(x[:3]), mem(x[:3])
    torch.testing.assert_close(out1, out2)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_matches_torch_batchnorm(momentum):
    """Without a mask: outputs, gradients and running statistics as torch's BatchNorm1d, over steps."""
    from pkmem.layer import masked_batch_norm

    bn, ref = nn.BatchNorm1d(6, momentum=momentum), nn.BatchNorm1d(6, momentum=momentum)
    for step in range(4):
        x = (torch.randn(9, 6, generator=torch.Generator().manual_seed(step)) * 3 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = masked_batch_norm(bn, x, None, "torch"), ref(x2)
        torch.testing.assert_close(y, y2)
        (y * y.detach()).sum().backward()
        (y2 * y2.detach()).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        for a, b in zip(bn.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("hidden", [(), (7,)])
def test_query_network_folds_the_linear_bias_into_the_batchnorm(hidden):
    """The query network adds each linear layer's bias inside its BatchNorm: the same outputs,
    running statistics and gradients as ``linear(x)`` then the BatchNorm, in training and eval
    (the bias gradient is 0 in training: the batch mean absorbs the bias)."""
    from pkmem.layer import QueryNetwork, masked_batch_norm

    net = QueryNetwork(10, 12, hidden, batchnorm=True)
    plain = copy.deepcopy(net)
    for lin in plain.linears:
        nn.init.normal_(lin.bias)
    for lin, lin2 in zip(net.linears, plain.linears):
        lin.bias.data.copy_(lin2.bias)

    def unfolded(x):
        for i, lin in enumerate(plain.linears):
            x = masked_batch_norm(plain.norms[i], lin(x), None, "torch")
            x = torch.relu(x) if i < len(plain.linears) - 1 else x
        return x

    for step, training in enumerate([True, True, False]):
        net.train(training)
        plain.train(training)
        x = _x(9, 10) + step
        y, y2 = net(x, None, "torch"), unfolded(x)
        torch.testing.assert_close(y, y2)
        (y * y2.detach()).sum().backward()
        (y2 * y2.detach()).sum().backward()
        for (name, a), b in zip(net.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
        for a, b in zip(net.buffers(), plain.buffers()):
            torch.testing.assert_close(a, b)
        net.zero_grad()
        plain.zero_grad()


def test_query_network_keeps_hooked_or_wrapped_linears():
    """A pruned linear layer (a forward pre-hook) or a subclass keeps its own forward: its bias is
    then not folded into the BatchNorm, and training steps work as with the plain layer."""
    from torch.nn.utils import prune

    from pkmem.layer import QueryNetwork

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    for variant in ("pruned", "subclass"):
        net = QueryNetwork(10, 12, (7,), batchnorm=True)
        plain = copy.deepcopy(net)
        if variant == "pruned":
            prune.l1_unstructured(net.linears[0], "weight", amount=0.5)
            with torch.no_grad():
                plain.linears[0].weight.copy_(net.linears[0].weight)
        else:
            lin = net.linears[1]
            net.linears[1] = Scaled(7, 12)
            net.linears[1].load_state_dict(lin.state_dict())
            plain.linears[1].weight.data.mul_(2)
            plain.linears[1].bias.data.mul_(2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(2):
            x = _x(9, 10) + step
            y = net(x, None, "torch")
            if step == 0:
                torch.testing.assert_close(y, plain(x, None, "torch"))
            y.square().sum().backward()
            opt.step()
            opt.zero_grad()


def test_query_mlp():
    mem = _mem(query_hidden=(16, 8))
    assert [tuple(lin.weight.shape) for lin in mem.query_net.linears] == [(16, 10), (8, 16), (12, 8)]
    assert len(mem.query_net.norms) == 3
    nobias = _mem(query_bias=False, query_hidden=(7,))
    assert all(lin.bias is None for lin in nobias.query_net.linears)
    assert nobias(_x(3, 10)).shape == (3, 10)


def test_value_dim_projection_and_swilu_gate():
    mem = _mem(v_dim=7).eval()
    assert mem.values.shape == (81, 7) and mem.out_proj.weight.shape == (10, 7)
    x = _x(5, 10)
    w, idx = mem.lookup(x)
    read = (w[..., None] * mem.values[idx]).sum((-2, -3))
    torch.testing.assert_close(mem(x), mem.out_proj(read))
    gated = _mem(gate="swilu").eval()
    assert gated.out_proj.weight.shape == (10, 10) and gated.gate_proj.weight.shape == (10, 10)
    w, idx = gated.lookup(x)
    read = (w[..., None] * gated.values[idx]).sum((-2, -3))
    expected = gated.out_proj(read * torch.nn.functional.silu(gated.gate_proj(x)))
    torch.testing.assert_close(gated(x), expected)


def test_dropouts_act_in_training_only():
    for name in ["input_dropout", "query_dropout", "value_dropout", "score_dropout"]:
        mem = _mem(query_norm="layernorm", **{name: 0.5})
        x = _x(6, 10)
        torch.manual_seed(0)
        a = mem(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, mem(x)), name
        mem.eval()
        torch.testing.assert_close(mem(x), mem(x))


def test_shared_values_between_layers():
    a = _mem()
    b = ProductKeyMemory(10, **SMALL, values=a.values)
    assert b.values is a.values
    model = torch.nn.Sequential(a, b)
    assert sum(p is a.values for p in model.parameters()) == 1
    x = _x(4, 10)
    model(x).sum().backward()
    ga = a.values.grad.clone()
    a.values.grad = None
    a(x).sum().backward()
    assert not torch.equal(ga, a.values.grad)  # both layers contributed
    # state_dict round trip keeps the sharing
    c = torch.nn.Sequential(_mem(seed=5), None)
    c[1] = ProductKeyMemory(10, **SMALL, values=c[0].values)
    c.load_state_dict(model.state_dict())
    assert c[1].values is c[0].values and torch.equal(c[0].values, a.values)


def test_any_leading_shape_and_dtypes():
    mem = _mem().eval()
    assert mem(_x(10)).shape == (10,)
    assert mem(_x(2, 3, 4, 10)).shape == (2, 3, 4, 10)
    for dtype in (torch.bfloat16, torch.float16):
        x = _x(5, 10, dtype=dtype)
        out = mem(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), mem(x.float()), rtol=0.02, atol=0.02)
    low = _mem().eval().to(torch.bfloat16)
    out = low(_x(5, 10, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 queries may select other slots:
        out = mem(_x(5, 10))  # check against the slots and weights chosen under autocast
        w, idx = mem.lookup(_x(5, 10))
    assert out.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(out, (w[..., None] * mem.values[idx]).sum((-2, -3)))


def test_state_dict_round_trip():
    a = _mem(gate="swilu", v_dim=6, query_hidden=(5,))
    a(_x(8, 10))  # move BatchNorm running statistics
    b = _mem(seed=9, gate="swilu", v_dim=6, query_hidden=(5,))
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    torch.testing.assert_close(a(_x(4, 10)), b(_x(4, 10)), rtol=0, atol=0)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm"])
def test_a_call_does_not_check_the_configuration_again(monkeypatch, query_norm):
    """The layer's configuration (score, temperature, top-k, its parameters' shapes) is checked
    when it is built; a call checks only its input (the host's time per call)."""
    from pkmem.ops import dispatch, reference

    mem = _mem(query_norm=query_norm)
    x = _x(6, 10)
    want = mem(x)

    def refuse(*args, **kwargs):
        raise AssertionError("a call checked the layer's configuration again")

    checks = [(reference, "check_score"), (reference, "check_batch_norm"), (dispatch, "_check_topk")]
    for module, name in checks:
        monkeypatch.setattr(module, name, refuse)
    torch.testing.assert_close(mem(x), want)
    mem(x, torch.ones(6, dtype=torch.bool)).sum().backward()
    mem.eval()
    mem(x)
    with pytest.raises(ValueError, match="last dimension"):  # the input still is checked
        mem(_x(6, 9))


def test_torch_compile_smoke():
    mem = _mem().eval()
    compiled = torch.compile(mem, backend="aot_eager", fullgraph=False)
    x = _x(6, 10)
    torch.testing.assert_close(compiled(x), mem(x))


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(topk=10, num_keys=9), "topk"),
        (dict(k_dim=7), "k_dim"),
        (dict(heads=0), "heads"),
        (dict(num_keys=-1), "num_keys"),
        (dict(topk=0), "topk"),
        (dict(k_dim=0), "k_dim"),
        (dict(v_dim=0), "v_dim"),
        (dict(heads=2.0), "heads"),
        (dict(query_norm="group"), "query_norm"),
        (dict(score="sigmoid"), "score"),
        (dict(gate="glu"), "gate"),
        (dict(temperature=0), "temperature"),
        (dict(input_dropout=1.0), "input_dropout"),
        (dict(score_dropout=-0.1), "score_dropout"),
        (dict(query_hidden=(0,)), "query_hidden"),
        (dict(query_hidden=16), "query_hidden"),
        (dict(query_hidden=None), "query_hidden"),
        (dict(query_hidden=(True,)), "query_hidden"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(product_keys="no"), "product_keys"),
        (dict(sparse_values="yes"), "sparse_values"),
        (dict(normalize_query=None), "normalize_query"),
        (dict(query_bias="x"), "query_bias"),
        (dict(zero_init_values=1), "zero_init_values"),
        (dict(backend="cuda"), "backend"),
        (dict(values=torch.nn.Parameter(torch.zeros(80, 10))), "values"),
        (dict(values=torch.zeros(81, 10)), "values"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ProductKeyMemory(10, **{**SMALL, **kwargs})
    with pytest.raises(ValueError, match="dim"):
        ProductKeyMemory(0)


def test_topk_bound_for_flat_keys():
    ProductKeyMemory(10, **{**SMALL, "topk": 20, "product_keys": False})  # <= num_keys**2 is fine
    with pytest.raises(ValueError, match="topk"):
        ProductKeyMemory(10, **{**SMALL, "topk": 82, "product_keys": False})


@pytest.mark.parametrize(
    "x,mask,match",
    [
        (torch.randn(3, 9), None, "last dimension"),
        (torch.randint(0, 5, (3, 10)), None, "floating-point"),
        (torch.tensor(1.0), None, "last dimension"),
        (torch.randn(3, 10), torch.ones(4, dtype=torch.bool), "mask"),
        (torch.randn(3, 10), torch.ones(3), "mask"),
        (torch.randn(3, 10), [True, True, True], "mask"),
        ([1.0] * 10, None, "x must be"),
    ],
)
def test_invalid_inputs(x, mask, match):
    mem = _mem()
    with pytest.raises(ValueError, match=match):
        mem(x, mask)
    with pytest.raises(ValueError, match=match):
        mem.lookup(x, mask)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_nan_in_padded_rows_stays_there(query_norm):
    """Padding may hold anything (NaN from a fully masked attention row): real tokens, the
    BatchNorm statistics and the gradients stay finite and equal those without the padding."""
    mem = _mem(query_norm=query_norm)
    x = _x(2, 4, 10)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[:, -1] = False
    xn = x.clone()
    xn[:, -1] = float("nan")
    ref = _mem(query_norm=query_norm)
    y_ref = ref(x[mask])  # the real tokens alone
    xn.requires_grad_()
    y = mem(xn, mask)
    torch.testing.assert_close(y[mask], y_ref)
    assert (y[~mask] == 0).all()
    y.sum().backward()
    assert torch.isfinite(xn.grad).all() and all(torch.isfinite(p.grad).all() for p in mem.parameters())
    for a, b in zip(mem.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


def test_one_token_in_training():
    """torch's BatchNorm refuses to train on one row; the layer treats it as the masked path does."""
    a, b = _mem(), _mem()
    x = _x(1, 10)
    torch.testing.assert_close(a(x), b(x, torch.ones(1, dtype=torch.bool)))
    assert a(_x(10)).shape == (10,)
    assert a(_x(0, 10)).shape == (0, 10)
    b(_x(10)[None], torch.ones(1, dtype=torch.bool))
    b(_x(0, 10), torch.ones(0, dtype=torch.bool))
    for p, q in zip(a.buffers(), b.buffers()):  # the same running statistics both ways
        torch.testing.assert_close(p, q)


@pytest.mark.slow
def test_torch_compile_inductor_forward_backward():
    mem = _mem()
    ref_mem = _mem()
    compiled = torch.compile(mem)
    x = _x(6, 10)
    out = compiled(x)
    expected = ref_mem(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(mem.named_parameters(), ref_mem.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
