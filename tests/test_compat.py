"""pkmem.compat.PKM against lucidrains' product-key-memory 0.3.0 (the oracle) and, where 0.3.0 is
broken, against hand-written references of the intended behaviour."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pkmem
from pkmem.compat import PKM, ProductKeyMemory, fetch_optimizer_parameters, fetch_pkm_value_parameters
from pkmem.compat.lucidrains import coordinate_descent_topk_mask


def _oracle_version() -> str | None:
    if importlib.util.find_spec("product_key_memory") is None:
        return None
    try:
        return importlib.metadata.version("product-key-memory")
    except importlib.metadata.PackageNotFoundError:
        return None


ORACLE_VERSION = _oracle_version()
needs_oracle = pytest.mark.skipif(
    ORACLE_VERSION != "0.3.0",
    reason=f"product-key-memory 0.3.0 is the oracle and is not installed (found {ORACLE_VERSION}); "
    "install it with pip install -e '.[compat]'",
)
needs_colt5 = pytest.mark.skipif(
    importlib.util.find_spec("colt5_attention") is None,
    reason="colt5-attention (installed with product-key-memory 0.3.0) is not installed",
)


def oracle_cls():
    from product_key_memory import PKM as OraclePKM

    return OraclePKM


ODD = dict(heads=3, num_keys=20, topk=7, dim_head=16)  # with dim=48


# ---- helpers ---------------------------------------------------------------------------------------
def pair(kw: dict, dim: int, seed: int):
    """A 0.3.0 instance and a compat one loaded from its state_dict (strict)."""
    torch.manual_seed(seed)
    ref = oracle_cls()(dim, **kw)
    ours = PKM(dim, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def run(module, x, seed=123, params=None, **fw):
    """Output, input gradient and every parameter gradient (of ``params``, default ``module``) for a
    random output cotangent; the global RNG is seeded just before the forward (dropout, noise)."""
    owner = module if params is None else params
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = module(x, **fw)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    (y * cot).sum().backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in owner.named_parameters()
    }
    owner.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def close(a, b, what, rtol=1e-5):
    atol = rtol * max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same(ra, rb, tag=""):
    (ya, gxa, gpa), (yb, gxb, gpb) = ra, rb
    close(ya, yb, f"{tag} output")
    close(gxa, gxb, f"{tag} input grad")
    assert gpa.keys() == gpb.keys()
    for n in gpa:
        close(gpa[n], gpb[n], f"{tag} grad of {n}")


def naive_forward(m: PKM, x, mask=None, frozen=None):
    """The intended 0.3.0 computation, written out with a brute-force top-k over all num_keys**2
    slots (eval mode, no dropout): LayerNorm or masked BatchNorm (training statistics over real
    tokens), score-weighted values, per-head concat for ``concat_values_and_combine``, and slots with
    ``frozen`` True read as constants."""
    T, H, D, n, k = x[..., 0].numel(), m.heads, m.dim_head, m.num_keys, m.topk
    x2 = m.pre_layernorm(x).reshape(T, -1)
    q = (x2 @ m.to_queries.weight.T).view(T, 2, H, D)
    if m.use_layernorm:
        q = F.layer_norm(q, (D,), m.norm.weight, m.norm.bias, m.norm.eps)
    else:
        bn = m.norm.fn
        rows = q.reshape(-1, D)
        real = torch.ones(T, dtype=torch.bool) if mask is None else mask.reshape(T)
        sel = rows[real[:, None].expand(T, 2 * H).reshape(-1)]
        mean, var = sel.mean(0), sel.var(0, unbiased=False)
        q = ((rows - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).view(T, 2, H, D)
    half = torch.einsum("tphd,hnpd->thpn", q, m.keys)  # (T, H, 2, n)
    full = (half[:, :, 0, :, None] + half[:, :, 1, None, :]).reshape(T, H, n * n)
    scores, idx = full.topk(k, dim=-1)
    w = F.relu(scores) if isinstance(m.gate_activation, nn.ReLU) else scores.softmax(-1)
    contrib = w[..., None] * m.values.weight[idx]  # (T, H, k, v)
    if frozen is not None:
        contrib = torch.where(frozen[idx][..., None], contrib.detach(), contrib)
    if m.concat_values_and_combine:
        out = contrib.sum(2).reshape(T, H * D) @ m.maybe_concat_combine[2].weight.T
    else:
        out = contrib.sum((1, 2))
    return m.output_norm(out).reshape(*x.shape[:-1], -1)


# ---- 0.3.0 equivalence -----------------------------------------------------------------------------
EQUIV_CONFIGS = {
    "default": (32, {}),
    "odd": (48, ODD),
    "heads1_topk_eq_num_keys": (24, dict(heads=1, num_keys=5, topk=5, dim_head=8)),
    "relu": (48, {**ODD, "non_competitive_gates": True}),
    "pre_layernorm": (48, {**ODD, "pre_layernorm": True}),
    "norm_output": (48, {**ODD, "norm_output": True}),
    "dropouts_eval": (
        48,
        {**ODD, "input_dropout": 0.2, "query_dropout": 0.3, "value_dropout": 0.1, "attn_dropout": 0.4},
    ),
    "differentiable_topk": (48, {**ODD, "differentiable_topk": True}),
    "all_working": (
        40,
        dict(
            heads=2,
            num_keys=11,
            topk=3,
            dim_head=6,
            pre_layernorm=True,
            norm_output=True,
            non_competitive_gates=True,
            differentiable_topk=True,
        ),
    ),
}


@needs_oracle
@pytest.mark.parametrize("name", list(EQUIV_CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_0_3_0(name, seed):
    dim, kw = EQUIV_CONFIGS[name]
    ref, ours = pair(kw, dim, seed)
    ref.eval(), ours.eval()
    shape = [(2, 5), (1, 1), (3, 7)][seed]
    x = torch.randn(*shape, dim, generator=torch.Generator().manual_seed(seed))
    assert_same(run(ours, x), run(ref, x), name)


@needs_oracle
@pytest.mark.parametrize("kw", [ODD, {**ODD, "differentiable_topk": True, "non_competitive_gates": True}])
@pytest.mark.parametrize("seed", [0, 1])
def test_gumbel_noise_same_rng_stream(kw, seed):
    ref, ours = pair(kw, 48, seed)
    x = torch.randn(2, 6, 48)
    a, b = run(ours, x, seed=seed, gumbel_noise_scale=0.7), run(ref, x, seed=seed, gumbel_noise_scale=0.7)
    assert_same(a, b, "gumbel")
    # the noise is really there: another seed or no noise gives other outputs
    assert not torch.allclose(a[0], run(ours, x, seed=seed + 7, gumbel_noise_scale=0.7)[0])
    assert not torch.allclose(a[0], run(ours, x)[0])


@needs_oracle
@pytest.mark.parametrize("seed", [0, 1])
def test_training_dropouts_same_rng_stream(seed):
    kw = {**ODD, "input_dropout": 0.2, "query_dropout": 0.3, "value_dropout": 0.1, "attn_dropout": 0.4}
    ref, ours = pair(kw, 48, seed)
    ref.train(), ours.train()
    x = torch.randn(3, 5, 48)
    a = run(ours, x, seed=seed)
    assert_same(a, run(ref, x, seed=seed), "train dropouts")
    ours.eval()
    assert not torch.allclose(a[0], run(ours, x, seed=seed)[0])  # the dropouts did act


@needs_oracle
def test_input_mask_ignored_by_layernorm_path_as_0_3_0():
    ref, ours = pair(ODD, 48, 0)
    x = torch.randn(2, 5, 48)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    a = run(ours, x, input_mask=mask)
    assert_same(a, run(ref, x, input_mask=mask), "masked")
    assert_same(a, run(ours, x), "mask vs none")  # outputs at padded positions are not zeroed


@needs_oracle
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_layernorm": False},
        {"pre_layernorm": True},
        {"norm_output": True},
        {"concat_values_and_combine": True},
    ],
)
def test_same_names_order_and_init(kw):
    kw = {**ODD, **kw}
    torch.manual_seed(3)
    ref = oracle_cls()(48, **kw)
    torch.manual_seed(3)
    ours = PKM(48, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    sa, sb = ours.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    for n in sa:  # one seed, the same initial parameters
        assert torch.equal(sa[n], sb[n]), n
    # round trip: a compat state_dict (after a change) loads back into 0.3.0
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for n, t in ref.state_dict().items():
        assert torch.equal(t, ours.state_dict()[n]), n


@needs_oracle
def test_optimizer_groups_match_0_3_0():
    from product_key_memory import fetch_optimizer_parameters as ref_groups

    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(48, 48), oracle_cls()(48, **ODD), oracle_cls()(48, **ODD))
    ours = nn.Sequential(nn.Linear(48, 48), PKM(48, **ODD), PKM(48, **ODD))
    ours.load_state_dict(ref_model.state_dict(), strict=True)
    names = {id(p): n for n, p in ours.named_parameters()}
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    ga, gb = fetch_optimizer_parameters(ours, 3e-3), ref_groups(ref_model, 3e-3)
    assert [[names[id(p)] for p in g["params"]] for g in ga] == [
        [ref_names[id(p)] for p in g["params"]] for g in gb
    ]
    assert ga[1]["lr"] == gb[1]["lr"] == 3e-3


# ---- pieces on their own terms -----------------------------------------------------------------------
def test_naive_reference_agrees_on_working_path():
    """The hand-written reference used below agrees with the module where 0.3.0 also does."""
    torch.manual_seed(0)
    m = PKM(48, **ODD, pre_layernorm=True, norm_output=True).eval()
    x = torch.randn(2, 5, 48)
    close(m(x), naive_forward(m, x), "naive")


@needs_colt5
def test_coordinate_descent_matches_colt5():
    from colt5_attention.coor_descent import coor_descent

    s = torch.randn(3, 4, 2, 20, dtype=torch.float64, requires_grad=True)
    for k in (7.875, 20.0, 1.0):
        a, b = coordinate_descent_topk_mask(s, k), coor_descent(s, n_iters=20, k=k, eps=0.1)
        close(a, b, "cd forward", rtol=1e-10)
        g = torch.randn_like(a)
        close(
            torch.autograd.grad((a * g).sum(), s)[0],
            torch.autograd.grad((b * g).sum(), s)[0],
            "cd grad",
            1e-10,
        )


def test_coordinate_descent_properties():
    s = torch.randn(5, 30, dtype=torch.float64)
    x = coordinate_descent_topk_mask(s, 6.5, n_iters=1000)
    assert (x > 0).all() and (x <= 1).all()
    close(x.sum(-1), torch.full((5,), 6.5, dtype=torch.float64), "sum = k", rtol=1e-8)
    # well separated scores (gaps 1 >> eps): close to the hard top-k mask
    s = torch.randperm(30, generator=torch.Generator().manual_seed(0)).double().view(1, 30)
    x = coordinate_descent_topk_mask(s, 4, n_iters=3000, eps=0.1)
    hard = torch.zeros_like(s).scatter(-1, s.topk(4).indices, 1.0)
    assert (x - hard).abs().max() < 0.01


def test_differentiable_topk_same_forward_other_gradients():
    torch.manual_seed(0)
    plain = PKM(48, **ODD).eval()
    diff = PKM(48, **ODD, differentiable_topk=True).eval()
    with torch.no_grad():  # scores of the order of eps = 0.1: the soft top-k mask is not saturated
        plain.keys.mul_(0.1)
    diff.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 48)
    (ya, _, ga), (yb, _, gb) = run(plain, x), run(diff, x)
    close(yb, ya, "forward")
    assert (ga["keys"] - gb["keys"]).abs().max() > 1e-2 * ga["keys"].abs().max()
    assert torch.equal(ga["values.weight"].ne(0), gb["values.weight"].ne(0))  # same slots read


def test_batchnorm_path_statistics_over_real_tokens():
    torch.manual_seed(0)
    m = PKM(48, **ODD, use_layernorm=False).train()
    x = torch.randn(3, 6, 48)
    mask = torch.rand(3, 6) > 0.4
    mask[0, 0] = True
    seen = {}
    m.norm.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    bn = nn.BatchNorm1d(16)
    bn.load_state_dict(m.norm.fn.state_dict())
    m(x, input_mask=mask)
    # the normalised queries of real tokens are BatchNorm1d over the real tokens' vectors alone
    rows = (x.reshape(-1, 48) @ m.to_queries.weight.T).reshape(-1, 16)  # (T * 2 * H, d)
    real = mask.reshape(-1)[:, None].expand(-1, 2 * 3).reshape(-1)
    close(seen["out"][real], bn(rows[real]), "normalised real rows")
    close(m.norm.fn.running_mean, bn.running_mean, "running mean")
    close(m.norm.fn.running_var, bn.running_var, "running var")
    assert m.norm.fn.num_batches_tracked.item() == 1


def test_batchnorm_path_outputs_and_gradients():
    torch.manual_seed(1)
    m = PKM(48, **ODD, use_layernorm=False).train()
    x = torch.randn(2, 7, 48)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    a = run(m, x, input_mask=mask)
    assert_same(a, run(lambda x_: naive_forward(m, x_, mask=mask), x, params=m), "bn")
    assert a[2]["norm.fn.weight"].abs().sum() > 0
    # real tokens' outputs do not depend on what the padded positions hold
    x2 = x.clone()
    x2[1, 4:] = 100 * torch.randn(3, 48)
    close(m(x2, input_mask=mask)[mask], a[0][mask], "padding-independent")
    # no mask: every token counts; eval: running statistics
    close(m(x), naive_forward(m, x), "bn unmasked")
    m.eval()
    bn = m.norm.fn
    q = (x.reshape(-1, 48) @ m.to_queries.weight.T).reshape(-1, 16)
    expected = (q - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    seen = {}
    m.norm.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    m(x, input_mask=mask)
    close(seen["out"], expected, "bn eval")


@needs_oracle
def test_batchnorm_state_dict_from_0_3_0_loads():
    ref, ours = pair({**ODD, "use_layernorm": False}, 48, 0)
    with torch.no_grad():
        ref.norm.fn.running_mean.uniform_(), ref.norm.fn.running_var.uniform_(1, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 5, 48)
    # same parameters read through the intended BatchNorm (eval: running statistics)
    q = (x.reshape(-1, 48) @ ref.to_queries.weight.T).reshape(-1, 16)
    bn = ref.norm.fn
    seen = {}
    ours.norm.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    ours(x)
    close(
        seen["out"], (q - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias, "bn"
    )


@pytest.mark.parametrize("relu", [False, True])
def test_concat_values_weighted_by_scores(relu):
    torch.manual_seed(0)
    m = PKM(48, **ODD, concat_values_and_combine=True, non_competitive_gates=relu, norm_output=True).eval()
    x = torch.randn(2, 5, 48)
    assert_same(run(m, x), run(lambda x_: naive_forward(m, x_), x, params=m), "concat")
    g = run(m, x)[2]
    assert g["keys"].abs().sum() > 0 and g["to_queries.weight"].abs().sum() > 0  # scores get gradients


@needs_oracle
def test_concat_state_dict_from_0_3_0_differs_only_by_the_weights():
    ref, ours = pair({**ODD, "concat_values_and_combine": True}, 48, 0)
    ours.eval(), ref.eval()
    x = torch.randn(2, 5, 48)
    close(ours(x), naive_forward(ours, x), "weighted")
    # with every weight equal to 1 (relu gates of scores shifted to exactly 1) the two agree:
    # 0.3.0 is the unweighted sum, ours the weighted one
    ours.gate_activation = ref.gate_activation = _Ones()
    close(ours(x), ref(x), "unit weights")


class _Ones(nn.Module):
    def forward(self, s):
        return torch.ones_like(s)


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_mem_trainable_mask(concat, seed):
    torch.manual_seed(seed)
    m = PKM(48, **ODD, concat_values_and_combine=concat).eval()
    x = torch.randn(2, 6, 48)
    trainable = torch.rand(20 * 20) > 0.5
    full = run(m, x)
    part = run(m, x, mem_trainable_mask=trainable)
    close(part[0], full[0], "forward unchanged")
    gv, gv_full = part[2]["values.weight"], full[2]["values.weight"]
    assert torch.equal(gv[~trainable], torch.zeros_like(gv[~trainable]))  # exactly zero on frozen rows
    close(gv[trainable], gv_full[trainable], "trainable rows as usual")
    touched = gv_full.abs().sum(1) > 0
    assert (touched & ~trainable).any() and (touched & trainable).any()  # the test reads both kinds
    # gradients of queries and keys: frozen slots' contributions are constants
    ref = run(lambda x_: naive_forward(m, x_, frozen=~trainable), x, params=m)
    assert_same(part, ref, "frozen contributions")
    assert not torch.allclose(part[2]["keys"], full[2]["keys"])
    # all trainable: the usual gradients
    assert_same(run(m, x, mem_trainable_mask=torch.ones(400, dtype=torch.bool)), full, "all trainable")


def test_usage_stats_protocol():
    class Recorder:
        def __init__(self):
            self.calls = []

        def update(self, indices, weights):
            self.calls.append((indices.clone(), weights.clone()))

    torch.manual_seed(0)
    m = PKM(48, **ODD).eval()
    assert m.num_slots == 400 and m.usage_stats is None
    m.usage_stats = Recorder()
    x = torch.randn(2, 5, 48)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y = m(x, input_mask=mask)
    ((idx, w),) = m.usage_stats.calls
    assert idx.shape == w.shape == (10, 3, 7)
    real = mask.reshape(-1)
    assert (idx[~real] == -1).all() and (w[~real] == 0).all()
    close(w[real].sum(-1), torch.ones(int(real.sum()), 3), "softmax weights")
    # the slots are the exact top-7 over all 400 slots, and reading them gives the output
    ref_idx = _brute_idx(m, x.reshape(-1, 48))
    assert torch.equal(idx[real].sort(-1).values, ref_idx[real].sort(-1).values)
    out = (w[..., None] * m.values.weight[idx.clamp(min=0)]).sum((1, 2))
    close(y.reshape(-1, 48)[real], out[real].detach(), "usage weights are the ones read")


def _brute_idx(m, x2):
    T = x2.shape[0]
    q = F.layer_norm(
        (x2 @ m.to_queries.weight.T).view(T, 2, m.heads, m.dim_head),
        (m.dim_head,),
        m.norm.weight,
        m.norm.bias,
    )
    half = torch.einsum("tphd,hnpd->thpn", q, m.keys)
    full = (half[:, :, 0, :, None] + half[:, :, 1, None, :]).flatten(-2)
    return full.topk(m.topk, dim=-1).indices


def test_leading_shapes_and_dtypes():
    torch.manual_seed(0)
    m = PKM(48, **ODD).eval()
    x = torch.randn(2, 3, 4, 48)
    y = m(x)
    assert y.shape == x.shape
    close(y.reshape(6, 4, 48), m(x.reshape(6, 4, 48)), "4-d input")
    close(m(x[0, 0, 0]), y[0, 0, 0], "1-d input")
    assert m(torch.randn(0, 5, 48)).shape == (0, 5, 48)
    mb = PKM(48, **ODD, concat_values_and_combine=True).to(torch.bfloat16).eval()
    yb = mb(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()


def test_input_cast_to_the_modules_dtype():
    """0.3.0 fails when x and the module differ in dtype; the drop-in casts (as ProductKeyMemory)."""
    torch.manual_seed(0)
    m = PKM(48, **ODD).eval()
    x = torch.randn(3, 48)
    y = m(x)
    yb = m(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    close(yb.float(), m(x.to(torch.bfloat16).float()), "bf16 input", rtol=1e-2)
    md = PKM(48, **ODD, concat_values_and_combine=True).double().eval()
    assert md(x).dtype == torch.float32 and torch.isfinite(md(x)).all()
    assert torch.isfinite(y).all()


def test_nan_in_masked_rows_does_not_reach_batchnorm_statistics():
    torch.manual_seed(0)
    m = PKM(48, **ODD, use_layernorm=False)
    x = torch.randn(2, 5, 48)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    x[:, -1] = float("nan")
    y = m(x, input_mask=mask)
    assert torch.isfinite(y[mask]).all()
    assert all(torch.isfinite(b.float()).all() for b in m.buffers())


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = PKM(12, heads=2, num_keys=6, topk=3, dim_head=4, concat_values_and_combine=True).double().eval()
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    names = ["keys", "values.weight", "to_queries.weight"]
    params = tuple(dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def f(x_, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x_,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


# ---- helpers and alias ---------------------------------------------------------------------------
def test_fetch_value_parameters_dedup_and_layers():
    torch.manual_seed(0)
    a = pkmem.ProductKeyMemory(48, heads=2, num_keys=8, topk=3, k_dim=8)
    b = pkmem.ProductKeyMemory(48, heads=2, num_keys=8, topk=3, k_dim=8, values=a.values)  # shared
    c, d = PKM(48, **ODD), PKM(48, **ODD, concat_values_and_combine=True)
    model = nn.ModuleDict(dict(a=a, b=b, c=c, d=d, lin=nn.Linear(48, 48)))
    values, rest = fetch_pkm_value_parameters(model)
    assert [id(p) for p in values] == [id(a.values), id(c.values.weight), id(d.values.weight)]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - {id(p) for p in values}
    assert len(rest) + len(values) == len(list(model.parameters()))
    groups = fetch_optimizer_parameters(model)
    assert groups[1]["lr"] == 1e-2 and "lr" not in groups[0]
    opt = torch.optim.Adam(groups, lr=1e-3)  # usable as is
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]


def test_alias_and_repr():
    assert ProductKeyMemory is PKM
    assert "num_keys=20 (400 slots)" in repr(PKM(48, **ODD))


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(dim=0), "dim"),
        (dict(dim=4.0), "dim"),
        (dict(heads=0), "heads"),
        (dict(num_keys=-1), "num_keys"),
        (dict(topk=0), "topk"),
        (dict(topk=21), "topk"),
        (dict(dim_head=True), "dim_head"),
        (dict(input_dropout=1.0), "input_dropout"),
        (dict(query_dropout=-0.1), "query_dropout"),
        (dict(value_dropout="0.1"), "value_dropout"),
        (dict(attn_dropout=1.5), "attn_dropout"),
        (dict(use_layernorm="yes"), "use_layernorm"),
        (dict(concat_values_and_combine=2), "concat_values_and_combine"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_constructor_errors(kw, name):
    args = {"dim": 48, **ODD, **kw}
    with pytest.raises(ValueError, match=name):
        PKM(**args)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: m(torch.randn(2, 5, 47)), "dim=48"),
        (lambda m: m(torch.ones(2, 5, 48, dtype=torch.long)), "floating"),
        (lambda m: m(torch.tensor(1.0)), "dim=48"),
        (lambda m: m([[0.0] * 48]), "floating"),
        (lambda m: m(torch.randn(2, 5, 48), input_mask=torch.ones(2, 5)), "input_mask"),
        (lambda m: m(torch.randn(2, 5, 48), input_mask=torch.ones(2, 4, dtype=torch.bool)), "input_mask"),
        (lambda m: m(torch.randn(2, 5, 48), input_mask=[[True] * 5] * 2), "input_mask"),
        (lambda m: m(torch.randn(2, 5, 48), mem_trainable_mask=torch.ones(400)), "mem_trainable_mask"),
        (
            lambda m: m(torch.randn(2, 5, 48), mem_trainable_mask=torch.ones(399, dtype=torch.bool)),
            "mem_trainable_mask",
        ),
        (lambda m: m(torch.randn(2, 5, 48), gumbel_noise_scale=-1.0), "gumbel_noise_scale"),
        (lambda m: m(torch.randn(2, 5, 48), gumbel_noise_scale=float("nan")), "gumbel_noise_scale"),
        (lambda m: fetch_optimizer_parameters(m, pkm_learning_rate=-1), "pkm_learning_rate"),
        (lambda m: fetch_pkm_value_parameters([m]), "module"),
    ],
)
def test_input_errors(call, name):
    m = PKM(48, **ODD)
    with pytest.raises(ValueError, match=name):
        call(m)
