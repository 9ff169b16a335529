import copy
import math

import pytest
import torch
from torch import nn

from pkmem import ProductKeyMemory
from pkmem.optim import (
    MultiOptimizer,
    RowAdam,
    clip_grad_norm,
    make_optimizer,
    param_groups,
    value_parameters,
)


def memory(**kw) -> ProductKeyMemory:
    kw = {"heads": 2, "num_keys": 8, "topk": 3, "k_dim": 8, **kw}
    return ProductKeyMemory(16, **kw)


class Model(nn.Module):
    """Two memories sharing one value table, a third with its own, and ordinary layers."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.mem1 = memory(sparse_values=sparse)
        self.mem2 = memory(values=self.mem1.values, sparse_values=sparse)
        self.mem3 = memory(num_keys=5, query_norm="layernorm")
        self.out = nn.Linear(16, 4, bias=False)

    def forward(self, x, mask=None):
        h = self.norm(self.inp(x))
        h = h + self.mem1(h, mask)
        h = h + self.mem2(h, mask)
        return self.out(h + self.mem3(h, mask))


class EmbeddingBagMemory(nn.Module):
    """Shaped as pkmem.compat.PKM: num_slots, usage_stats and a values EmbeddingBag."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.num_slots, self.usage_stats = 9, None
        self.proj = nn.Linear(4, 4)
        self.values = nn.EmbeddingBag(9, 4, mode="sum", sparse=sparse)

    def forward(self, idx):
        return self.proj(self.values(idx))


def ids(params) -> list[int]:
    return [id(p) for p in params]


# ---- value_parameters / param_groups ---------------------------------------------------------------
def test_value_parameters_dedups_shared_tables():
    model = Model()
    assert ids(value_parameters(model)) == ids([model.mem1.values, model.mem3.values])
    assert ids(value_parameters(model.mem2)) == ids([model.mem1.values])
    bag = EmbeddingBagMemory()
    assert ids(value_parameters(nn.Sequential(bag, model.mem3))) == ids(
        [bag.values.weight, model.mem3.values]
    )
    assert value_parameters(nn.Linear(2, 2)) == []
    with pytest.raises(ValueError, match="model"):
        value_parameters([model.mem1.values])


def test_param_groups_split():
    model = Model()
    model.inp.bias.requires_grad_(False)
    groups = param_groups(model, lr=3e-4, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "values"]
    by_name = {g["name"]: g for g in groups}
    assert ids(by_name["values"]["params"]) == ids([model.mem1.values, model.mem3.values])
    assert (by_name["values"]["lr"], by_name["values"]["weight_decay"]) == (1e-3, 0.0)
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (3e-4, 0.1)
    assert (by_name["no_decay"]["lr"], by_name["no_decay"]["weight_decay"]) == (3e-4, 0.0)
    assert all(p.ndim >= 2 for p in by_name["decay"]["params"])
    assert all(p.ndim < 2 for p in by_name["no_decay"]["params"])
    assert id(model.mem3.subkeys) in ids(by_name["decay"]["params"])
    assert id(model.norm.weight) in ids(by_name["no_decay"]["params"])
    # every trainable parameter exactly once, the frozen bias nowhere
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert id(model.inp.bias) not in listed


def test_param_groups_omits_empty_groups_and_checks_numbers():
    mem = memory(query_bias=False, query_norm="none")  # no parameter with ndim < 2
    groups = param_groups(mem, lr=1e-2, value_lr=5e-3, value_weight_decay=0.01)
    assert [g["name"] for g in groups] == ["decay", "values"]
    assert groups[1]["lr"] == 5e-3 and groups[1]["weight_decay"] == 0.01
    mem.values.requires_grad_(False)
    assert [g["name"] for g in param_groups(mem, lr=1e-2)] == ["decay"]
    for kw in [{"lr": -1.0}, {"lr": 1e-3, "value_lr": "big"}, {"lr": 1e-3, "weight_decay": math.nan}]:
        name = [k for k in kw if not isinstance(kw[k], float) or not kw[k] >= 0][0]
        with pytest.raises(ValueError, match=name):
            param_groups(mem, **kw)


# ---- make_optimizer ------------------------------------------------------------------------------
def test_make_optimizer_dense():
    model = Model()
    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "values"]
    assert opt.param_groups[2]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    model(torch.randn(6, 16)).square().mean().backward()
    before = model.mem1.values.detach().clone()
    opt.step()
    assert not torch.equal(before, model.mem1.values)


def test_sparse_values_step_touches_only_read_rows():
    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-2, value_lr=1e-2)
    assert isinstance(opt, MultiOptimizer)
    dense, sparse = opt.optimizers
    assert isinstance(dense, torch.optim.AdamW) and isinstance(sparse, torch.optim.SparseAdam)
    assert ids(sparse.param_groups[0]["params"]) == ids([model.mem1.values])
    assert sparse.param_groups[0]["name"] == "values" and sparse.param_groups[0]["sparse"]
    assert ids(dense.param_groups[-1]["params"]) == ids([model.mem3.values])  # mem3 is dense
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "values", "values"]

    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    model(x, mask).square().mean().backward()
    grad = model.mem1.values.grad
    assert grad.is_sparse
    # the rows read by the real tokens of both memories that share the table
    with torch.no_grad():
        h = model.norm(model.inp(x))
        _, i1 = model.mem1.lookup(h, mask)
        _, i2 = model.mem2.lookup(h + model.mem1(h, mask), mask)
    read = torch.cat([i1[i1 >= 0], i2[i2 >= 0]]).unique()
    assert 0 < read.numel() < model.mem1.num_slots
    assert torch.equal(grad.coalesce().indices()[0].unique(), read)
    before = model.mem1.values.detach().clone()
    opt.step()
    changed = (model.mem1.values != before).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, read)


def test_make_optimizer_sparse_errors():
    model = Model(sparse=True)
    with pytest.raises(ValueError, match="value_weight_decay"):
        make_optimizer(model, lr=1e-3, value_weight_decay=0.01)
    mixed = nn.ModuleList([memory(sparse_values=True)])
    mixed.append(memory(values=mixed[0].values, sparse_values=False))
    with pytest.raises(ValueError, match="sparse_values"):
        make_optimizer(mixed, lr=1e-3)
    for kw, name in [
        ({"lr": 0.0}, "lr"),
        ({"lr": 1e-3, "value_lr": -1.0}, "value_lr"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"),
        ({"lr": 1e-3, "betas": 0.9}, "betas"),
        ({"lr": 1e-3, "eps": 0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=name):
            make_optimizer(model, **kw)
    frozen = memory()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        make_optimizer(frozen, lr=1e-3)


def test_embedding_bag_memory_with_sparse_values():
    model = EmbeddingBagMemory(sparse=True)
    opt = make_optimizer(model, lr=1e-2)
    assert isinstance(opt, MultiOptimizer)
    assert ids(opt.optimizers[1].param_groups[0]["params"]) == ids([model.values.weight])
    model(torch.tensor([[1, 4]])).sum().backward()
    before = model.values.weight.detach().clone()
    opt.step()
    changed = (model.values.weight != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == [1, 4]


def test_lr_marker_reaches_wrapped_optimizers():
    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-2)
    for g in opt.param_groups:
        if g["name"] == "values":
            g["lr"] = 0.0  # freeze the values through the marker
    assert opt.optimizers[1].param_groups[0]["lr"] == 0.0
    model(torch.randn(4, 16)).sum().backward()
    v1, v3, w = (t.detach().clone() for t in (model.mem1.values, model.mem3.values, model.inp.weight))
    opt.step()
    assert torch.equal(v1, model.mem1.values) and torch.equal(v3, model.mem3.values)
    assert not torch.equal(w, model.inp.weight)


def test_multi_optimizer_works_with_lr_schedulers_and_hooks():
    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-2, value_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    sched.step()
    assert calls == [1]
    assert opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


def test_multi_optimizer_state_dict_round_trip():
    x = torch.randn(2, 6, 16)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-2)
    train(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 2)

    restored = Model(sparse=True)
    restored.load_state_dict(saved_model)
    opt2 = make_optimizer(restored, lr=5.0)  # lr comes back from the state dict
    opt2.load_state_dict(saved_opt)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert all(
        a is b for a, b in zip(opt2.param_groups, [g for o in opt2.optimizers for g in o.param_groups])
    )
    assert len(opt2.state) == len(opt.state) > 0
    train(restored, opt2, 2)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    with pytest.raises(ValueError, match="state_dict"):
        opt2.load_state_dict({"optimizers": [saved_opt["optimizers"][0]]})
    with pytest.raises(ValueError, match="optimizers"):
        MultiOptimizer()
    with pytest.raises(ValueError, match="optimizers"):
        MultiOptimizer([nn.Linear(1, 1)])
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt2.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


# ---- clip_grad_norm ------------------------------------------------------------------------------
def set_grads(model: Model, scale: float = 1.0):
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale


def test_clip_dense_by_hand():
    model = Model()
    set_grads(model)
    values = [model.mem1.values, model.mem3.values]
    rest = [p for p in model.parameters() if all(p is not v for v in values)]
    rest_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in rest))
    value_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in values))
    old = {id(p): p.grad.clone() for p in model.parameters()}

    r, v = clip_grad_norm(model, max_norm=1.0, value_max_norm=2.0)
    assert isinstance(r, torch.Tensor) and r.dim() == 0
    assert r.item() == pytest.approx(rest_norm, rel=1e-5) and v.item() == pytest.approx(value_norm, rel=1e-5)
    for p in rest:
        torch.testing.assert_close(p.grad, old[id(p)] * (1.0 / (rest_norm + 1e-6)))
    for p in values:
        torch.testing.assert_close(p.grad, old[id(p)] * (2.0 / (value_norm + 1e-6)))
    r, v = clip_grad_norm(model, max_norm=1.0, value_max_norm=2.0)  # now within the limits
    assert r.item() == pytest.approx(1.0, rel=1e-5) and v.item() == pytest.approx(2.0, rel=1e-5)


def test_clip_below_limit_and_inf_only_measure():
    model = Model()
    set_grads(model, scale=1e-4)
    old = [p.grad.clone() for p in model.parameters()]
    r, v = clip_grad_norm(model, max_norm=10.0)  # value_max_norm defaults to max_norm
    assert 0 < r.item() < 10 and 0 < v.item() < 10
    assert all(torch.equal(a, p.grad) for a, p in zip(old, model.parameters()))
    set_grads(model, scale=100.0)
    old = [p.grad.clone() for p in model.parameters()]
    r, v = clip_grad_norm(model, max_norm=math.inf)
    assert r.item() > 100 and v.item() > 100
    assert all(torch.equal(a, p.grad) for a, p in zip(old, model.parameters()))
    r, v = clip_grad_norm(model, max_norm=1.0, value_max_norm=math.inf)  # values only measured
    assert torch.equal(
        old[[id(p) for p in model.parameters()].index(id(model.mem3.values))], model.mem3.values.grad
    )
    assert not torch.equal(old[0], next(model.parameters()).grad)


def test_clip_uncoalesced_sparse_by_hand():
    table = nn.Parameter(torch.zeros(6, 2))
    # rows 1 (twice: must be summed before the norm), 4; an uncoalesced COO tensor
    idx = torch.tensor([[1, 4, 1]])
    vals = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    table.grad = torch.sparse_coo_tensor(idx, vals, (6, 2), check_invariants=True)
    assert not table.grad.is_coalesced()
    dense = table.grad.to_dense()
    norm = math.sqrt(4.0**2 + 2.0**2)  # row 1 = (4, 0), row 4 = (0, 2); not sqrt(9 + 4 + 1)
    other = nn.Parameter(torch.zeros(3))
    other.grad = torch.tensor([3.0, 4.0, 0.0])

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_slots, self.values, self.other = 6, table, other

    r, v = clip_grad_norm(Holder(), max_norm=1.0, value_max_norm=0.5)
    assert r.item() == pytest.approx(5.0, rel=1e-6) and v.item() == pytest.approx(norm, rel=1e-6)
    assert table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), dense * (0.5 / (norm + 1e-6)))
    torch.testing.assert_close(other.grad, torch.tensor([3.0, 4.0, 0.0]) * (1.0 / (5.0 + 1e-6)))


def test_clip_real_sparse_gradient_then_step():
    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-2)
    model(torch.randn(3, 16)).sum().backward()
    dense_norm = model.mem1.values.grad.to_dense().norm().item()
    want = math.sqrt(dense_norm**2 + model.mem3.values.grad.norm().item() ** 2)
    r, v = clip_grad_norm(model, max_norm=1e-3)
    assert v.item() == pytest.approx(want, rel=1e-5)
    assert model.mem1.values.grad.to_dense().norm().item() == pytest.approx(
        dense_norm * 1e-3 / want, rel=1e-4
    )
    opt.step()


def test_clip_plain_params_and_no_host_sync():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    r, v = clip_grad_norm([a, b], max_norm=2.5)  # a list: everything is "rest"
    assert r.item() == pytest.approx(5.0) and v.item() == 0.0
    torch.testing.assert_close(a.grad, torch.tensor([1.5, 0.0]), rtol=1e-5, atol=0)
    r, _ = clip_grad_norm(a, max_norm=10.0)  # a single tensor
    assert r.item() == pytest.approx(1.5, rel=1e-5)
    r, v = clip_grad_norm([nn.Parameter(torch.zeros(2))], max_norm=1.0)  # no grads at all
    assert r.item() == 0.0 and v.item() == 0.0
    # meta tensors hold no data: any host read would raise
    m = nn.Parameter(torch.zeros(3, 4, device="meta"))
    m.grad = torch.zeros(3, 4, device="meta")
    r, v = clip_grad_norm([m], max_norm=1.0)
    assert r.device.type == "meta"


def test_clip_mixed_dtypes_float32_norm_and_launches_do_not_grow_with_parameters():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def params(n):
        g = torch.Generator().manual_seed(n)
        out = []
        for i in range(n):
            dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
            p = nn.Parameter(torch.zeros(5 + i, dtype=dtype))
            p.grad = (torch.randn(5 + i, generator=g) * 300).to(dtype)  # squares overflow no float32
            out.append(p)
        return out

    launches = []
    for n in (4, 40):
        ps = params(n)
        want = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps))
        old = [p.grad.double() for p in ps]
        with Count() as c:
            r, _ = clip_grad_norm(ps, max_norm=1.0)
        launches.append(c.n)
        assert r.dtype == torch.float32 and r.item() == pytest.approx(want, rel=1e-5)
        for p, g in zip(ps, old):  # every gradient scaled by the same factor, in its own dtype
            assert p.grad.dtype == p.dtype
            tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(p.grad.double(), g / want, rtol=tol, atol=1e-6)
    # one foreach norm and one foreach multiply per dtype: ten times the parameters, the same ops
    assert launches[0] == launches[1], launches


def test_clip_skips_empty_gradients():
    ps = [nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(0, 4))]
    for p in ps:
        p.grad = torch.full_like(p, 2.0)
    r, _ = clip_grad_norm(ps, max_norm=1.0)
    assert r.item() == pytest.approx(math.sqrt(12.0))
    assert ps[0].grad.shape == (0,) and ps[2].grad.shape == (0, 4)
    torch.testing.assert_close(ps[1].grad, torch.full((3,), 2.0 / math.sqrt(12.0)))


def test_clip_errors():
    model = Model()
    for kw, name in [
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": math.nan}, "max_norm"),
        ({"max_norm": 1.0, "value_max_norm": 0}, "value_max_norm"),
    ]:
        with pytest.raises(ValueError, match=name):
            clip_grad_norm(model, **kw)
    with pytest.raises(ValueError, match="model_or_params"):
        clip_grad_norm(3, 1.0)
    with pytest.raises(ValueError, match="model_or_params"):
        clip_grad_norm([torch.zeros(1), "x"], 1.0)


def test_value_parameters_recognises_product_key_memory_0_3_0():
    product_key_memory = pytest.importorskip("product_key_memory")
    model = nn.Sequential(nn.Linear(8, 8), product_key_memory.PKM(8, heads=2, num_keys=4, topk=2, dim_head=4))
    assert value_parameters(model) == [model[1].values.weight]


# ---- row optimizers: RowAdam (value_optimizer="lazy_adam" | "exact_adam") --------------------------
class Recorder:
    """A memory's usage_stats stand-in that keeps the slots each forward read."""

    def __init__(self):
        self.indices = []

    def update(self, idx, w):
        self.indices.append(idx.detach().clone())


def batches(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 5, 16, generator=g)
        mask = torch.rand(2, 5, generator=g) > 0.3
        mask[0, 0] = True
        out.append((x, mask))
    return out


def train(model, opt, data, value_lr, clip=None, accumulate=(), lr=1e-2):
    """Steps with a changing learning rate (a schedule), optional clipping and accumulation; returns
    the outputs of every forward."""
    outs = []
    for step, (x, mask) in enumerate(data, 1):
        for g in opt.param_groups:
            g["lr"] = (value_lr if g["name"] == "values" else lr) * (1.0 + 0.3 * step)
        for part in [(x, mask)] + ([(x.flip(1), mask.flip(1))] if step in accumulate else []):
            y = model(*part)
            outs.append(y.detach())
            y.square().mean().backward()
        if clip is not None:
            clip_grad_norm(model, clip, value_max_norm=clip / 2)
        opt.step()
        opt.zero_grad()
    return outs


@pytest.mark.parametrize("clip", [None, 0.02])
def test_exact_adam_equals_adamw(clip):
    """Weight decay, a schedule, masked tokens (rows untouched for steps), shared tables, gradient
    accumulation and clipping: the same outputs every step and the same final tables."""
    dense, rows = Model(), Model()
    rows.load_state_dict(dense.state_dict())
    kw = {"lr": 1e-2, "value_lr": 3e-2, "weight_decay": 0.1, "value_weight_decay": 0.05}
    opt_d = make_optimizer(dense, **kw)
    opt_r = make_optimizer(rows, **kw, value_optimizer="exact_adam")
    assert isinstance(opt_r.optimizers[1], RowAdam) and opt_r.optimizers[1].mode == "exact"
    data = batches(5)
    outs_d = train(dense, opt_d, data, 3e-2, clip, accumulate=(3,))
    outs_r = train(rows, opt_r, data, 3e-2, clip, accumulate=(3,))
    for a, b in zip(outs_d, outs_r):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
    assert rows.mem1.values.grad is None
    # some rows were never read: their lag is caught up by state_dict() (a flush)
    state = opt_r.optimizers[1].state[rows.mem1.values]
    assert (state["last"] < state["step"]).any()
    sd_d, sd_r = dense.state_dict(), rows.state_dict()
    assert (state["last"] == state["step"]).all()
    for name in sd_d:
        # the query linear's bias is folded into the BatchNorm: its gradient is rounding noise,
        # which Adam scales up to lr-sized steps (it changes no output; nor does running_mean)
        if name.endswith("linears.0.bias") or name.endswith("running_mean"):
            continue
        torch.testing.assert_close(sd_r[name], sd_d[name], atol=2e-6, rtol=1e-5, msg=name)


def test_lazy_adam_equals_hand_written_lazy_adam():
    """Lazy: the rows read get AdamW's update (the table's step count in the bias correction),
    untouched rows and their moments stay as they are."""
    torch.manual_seed(0)
    mem = memory(num_keys=6)
    hand = copy.deepcopy(mem)
    opt = make_optimizer(mem, lr=1e-2, value_lr=5e-2, value_weight_decay=0.1, value_optimizer="lazy_adam")
    opt_rest = make_optimizer(hand, lr=1e-2, value_lr=5e-2)  # AdamW; its value group is skipped below
    hand_values = opt_rest.param_groups[-1]
    assert hand_values["params"] == [hand.values]
    opt_rest.param_groups.remove(hand_values)
    b1, b2, eps, wd, lr = 0.9, 0.98, 1e-8, 0.1, 5e-2
    m, v = torch.zeros_like(hand.values), torch.zeros_like(hand.values)
    for t, (x, mask) in enumerate(batches(4, seed=5), 1):
        rec = Recorder()
        hand.usage_stats = rec
        mem(x, mask).square().mean().backward()
        hand(x, mask).square().mean().backward()
        opt.step()
        opt.zero_grad()
        opt_rest.step()
        with torch.no_grad():  # the hand-written lazy AdamW
            r = torch.unique(rec.indices[0][rec.indices[0] >= 0])
            g = hand.values.grad[r]
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            p = hand.values[r] * (1 - lr * wd)
            hand.values[r] = p - lr / (1 - b1**t) * m[r] / ((v[r] / (1 - b2**t)).sqrt() + eps)
        opt_rest.zero_grad()
        hand.values.grad = None
        untouched = torch.ones(mem.num_slots, dtype=torch.bool)
        untouched[r] = False
        assert untouched.any()
        torch.testing.assert_close(mem.values, hand.values, atol=1e-6, rtol=1e-5)
        state = opt.optimizers[1].state[mem.values]
        assert state["step"] == t
        torch.testing.assert_close(state["exp_avg"], m, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(state["exp_avg_sq"], v, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("value_optimizer", ["lazy_adam", "exact_adam"])
def test_row_adam_resume_is_exact_with_a_bf16_table(value_optimizer):
    data = batches(4, seed=7)

    def make():
        torch.manual_seed(3)
        mem = memory(value_dtype="bfloat16", num_keys=6)
        return mem, make_optimizer(mem, lr=1e-2, value_lr=3e-2, value_optimizer=value_optimizer)

    def steps(mem, opt, part):
        for x, mask in part:
            mem(x, mask).square().mean().backward()
            clip_grad_norm(mem, 1e-3)
            opt.step()
            opt.zero_grad()

    mem, opt = make()
    assert mem.values.dtype == torch.bfloat16
    steps(mem, opt, data[:2])
    saved = copy.deepcopy((mem.state_dict(), opt.state_dict()))
    steps(mem, opt, data[2:])
    mem2, opt2 = make()
    mem2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    state = opt2.optimizers[1].state[mem2.values]
    assert state["exp_avg"].dtype == torch.float32 and state["step"] == 2
    if value_optimizer == "exact_adam":
        assert state["last"].dtype == torch.int32
    steps(mem2, opt2, data[2:])
    for (name, a), b in zip(mem.state_dict().items(), mem2.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value_optimizer", ["lazy_adam", "exact_adam"])
def test_row_adam_loads_a_state_saved_with_an_int_step_count(value_optimizer):
    """States saved before the step count moved to the device (a Python int) load and continue as
    the saved run does; the count is a float32 tensor on the table's device from then on."""
    data = batches(4, seed=5)

    def make():
        torch.manual_seed(4)
        mem = memory(num_keys=6)
        return mem, make_optimizer(mem, lr=1e-2, value_lr=3e-2, value_optimizer=value_optimizer)

    def steps(mem, opt, part):
        for x, mask in part:
            mem(x, mask).square().mean().backward()
            opt.step()
            opt.zero_grad()

    mem, opt = make()
    steps(mem, opt, data[:2])
    saved = copy.deepcopy((mem.state_dict(), opt.state_dict()))
    steps(mem, opt, data[2:])
    old = saved[1]["optimizers"][1]  # (AdamW, RowAdam)
    for st in old["state"].values():
        assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32
        st["step"] = int(st["step"])  # as saved by pkmem before
    mem2, opt2 = make()
    mem2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    steps(mem2, opt2, data[2:])
    for (name, a), b in zip(mem.state_dict().items(), mem2.state_dict().values()):
        assert torch.equal(a, b), name
    step = opt2.optimizers[1].state[mem2.values]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 4


class Table(nn.Module):
    """A memory-shaped module that reads its value table with fixed slots."""

    def __init__(self, n=12, v=5, dtype=torch.float32):
        super().__init__()
        self.num_slots = n
        self.values = nn.Parameter(torch.randn(n, v, generator=torch.Generator().manual_seed(0)).to(dtype))

    def forward(self, idx, w):
        from pkmem.ops import weighted_gather

        return weighted_gather(self.values, idx, w)


def test_row_grads_accumulate_and_zero_grad_drops_them():
    idx1, idx2 = torch.tensor([[1, 2], [2, -1]]), torch.tensor([[2, 7]])
    w1, w2 = torch.tensor([[0.5, 1.0], [2.0, 9.0]]), torch.tensor([[1.5, -1.0]])
    rows, dense = Table(), Table()
    opt = make_optimizer(rows, lr=1e-2, value_optimizer="exact_adam")
    opt_d = make_optimizer(dense, lr=1e-2)
    for model in (rows, dense):
        model(idx1, w1).sum().backward()
        model(idx2, w2).square().sum().backward()
    rg = opt.optimizers[-1].row_grad(rows.values)  # the RowAdam (alone in its MultiOptimizer)
    assert rows.values.grad is None and rg.backwards == 2
    torch.testing.assert_close(rg.grad[[1, 2, 7]], dense.values.grad[[1, 2, 7]])
    r, v = clip_grad_norm(rows, 100.0)
    assert v.item() == pytest.approx(dense.values.grad.norm().item(), rel=1e-6)
    opt.step()
    opt_d.step()
    torch.testing.assert_close(rows.values, dense.values)
    rows(idx1, w1).sum().backward()
    opt.zero_grad()
    assert not rg.pending and (rg.touched == 0).all()
    before = rows.values.detach().clone()
    opt.step()  # nothing pending: no step, as AdamW without gradients
    assert torch.equal(before, rows.values)
    assert opt.state[rows.values]["step"] == 1


def test_row_adam_folds_dense_and_sparse_grads():
    """Gradients that reach ``table.grad`` (another reader of the table) still count."""
    for sparse in (False, True):
        rows, dense = EmbeddingBagMemory(sparse=sparse), EmbeddingBagMemory(sparse=False)
        dense.load_state_dict(rows.state_dict())
        opt = make_optimizer(rows, lr=1e-2, value_optimizer="exact_adam")
        opt_d = make_optimizer(dense, lr=1e-2)
        for step in range(3):
            for model, o in ((rows, opt), (dense, opt_d)):
                model(torch.tensor([[1, 4], [4, step]])).sum().backward()
                clip_grad_norm(model, 0.5)
                o.step()
                o.zero_grad()
        # a sparse gradient's other rows are kept current at every step (an EmbeddingBag reads them)
        torch.testing.assert_close(rows.values.weight, dense.values.weight)


def test_row_adam_arguments_and_value_optimizer_errors():
    model = Model()
    with pytest.raises(ValueError, match="value_optimizer"):
        make_optimizer(model, lr=1e-3, value_optimizer="sgd")
    with pytest.raises(ValueError, match="sparse_values=True"):
        make_optimizer(model, lr=1e-3, value_optimizer="sparse_adam")
    sparse = nn.ModuleList([nn.Linear(2, 2), memory(sparse_values=True)])
    opt = make_optimizer(sparse, lr=1e-3, value_optimizer="sparse_adam")
    assert isinstance(opt.optimizers[1], torch.optim.SparseAdam)
    opt = make_optimizer(Model(sparse=True), lr=1e-3, value_weight_decay=0.1, value_optimizer="lazy_adam")
    assert isinstance(opt.optimizers[1], RowAdam)  # sparse_values tables too; weight decay allowed
    table = nn.Parameter(torch.zeros(4, 3))
    for kw, name in [
        ({"mode": "eager"}, "mode"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"seed": -1}, "seed"),
        ({"stochastic_rounding": 1}, "stochastic_rounding"),
        ({"backend": "cuda"}, "backend"),
    ]:
        with pytest.raises(ValueError, match=name):
            RowAdam([table], **kw)
    for bad in (nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))):
        with pytest.raises(ValueError, match="value tables"):
            RowAdam([bad])
    bf16 = memory(value_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="exact_adam"):
        make_optimizer(bf16, lr=1e-3)


def test_row_adam_lives_with_its_table():
    """When the optimizer is gone the table gets dense gradients again; a pickled table leaves the
    optimizer behind; the LR scheduler and step hooks work through the MultiOptimizer."""
    import gc
    import io

    mem = memory()
    opt = make_optimizer(mem, lr=1e-2, value_optimizer="lazy_adam")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    x = torch.randn(4, 16)
    mem(x).sum().backward()
    assert mem.values.grad is None
    opt.step()
    sched.step()
    assert opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    buffer = io.BytesIO()
    torch.save(mem, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded(x).sum().backward()
    assert loaded.values.grad is not None
    del opt, sched
    gc.collect()
    mem.zero_grad()
    mem(x).sum().backward()
    assert mem.values.grad is not None and mem.values.grad.shape == mem.values.shape


def test_value_dtype():
    for dtype in ("bfloat16", torch.bfloat16):
        mem = memory(value_dtype=dtype)
        assert mem.values.dtype == torch.bfloat16 and "value_dtype=torch.bfloat16" in repr(mem)
        assert mem(torch.randn(3, 16)).dtype == torch.float32
    torch.manual_seed(0)
    a = memory()
    torch.manual_seed(0)
    b = memory(value_dtype="float32")
    assert a.values.dtype == torch.float32 and torch.equal(a.values, b.values)
    shared = memory(values=memory(value_dtype="bfloat16").values)
    assert shared.values.dtype == torch.bfloat16
    for bad in ("float16", torch.float64, "fp32", 3):
        with pytest.raises(ValueError, match="value_dtype"):
            memory(value_dtype=bad)
    with pytest.raises(ValueError, match="value_dtype"):
        memory(values=a.values, value_dtype="bfloat16")


def test_row_adam_under_torch_compile():
    """A compiled memory (a graph break around the gather of a row optimizer's table) trains as the
    eager one: the same tables after three steps."""
    torch.manual_seed(0)
    mem, ref = memory(query_bias=False), memory(query_bias=False)
    ref.load_state_dict(mem.state_dict())
    opt = make_optimizer(mem, lr=1e-2, value_optimizer="exact_adam")
    opt_ref = make_optimizer(ref, lr=1e-2, value_optimizer="exact_adam")
    compiled = torch.compile(mem)
    x = torch.randn(5, 16)
    for _ in range(3):
        for model, o in ((compiled, opt), (ref, opt_ref)):
            model(x).sum().backward()
            o.step()
            o.zero_grad()
    assert mem.values.grad is None and opt.state[mem.values]["step"] == 3
    torch.testing.assert_close(mem.state_dict()["values"], ref.state_dict()["values"], atol=1e-6, rtol=1e-5)


def test_make_optimizer_fused():
    """fused: torch's fused AdamW (the default on CUDA; chosen here on the CPU), the same steps."""

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"lin": nn.Linear(5, 5), "table": Table()})

    a, b = model(), model()
    opt_a = make_optimizer(a, lr=1e-2, weight_decay=0.1)
    opt_b = make_optimizer(b, lr=1e-2, weight_decay=0.1, fused=True)
    assert not opt_a.defaults.get("fused") and opt_b.defaults["fused"]
    idx, w = torch.tensor([[1, 3], [3, 0]]), torch.tensor([[0.5, 1.0], [2.0, -1.0]])
    for m, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            m["lin"](m["table"](idx, w)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="fused"):
        make_optimizer(a, lr=1e-2, fused="yes")


def test_value_betas():
    """``value_betas``: the value tables' own Adam betas, whichever optimizer takes them."""
    for value_optimizer in ("adamw", "lazy_adam", "exact_adam"):
        opt = make_optimizer(
            Model(), lr=1e-3, betas=(0.8, 0.9), value_betas=(0.5, 0.6), value_optimizer=value_optimizer
        )
        groups = {g["name"]: g for g in opt.param_groups}
        assert groups["decay"]["betas"] == (0.8, 0.9) and groups["values"]["betas"] == (0.5, 0.6)
    opt = make_optimizer(nn.ModuleList([memory(sparse_values=True)]), lr=1e-3, value_betas=(0.5, 0.6))
    assert opt.optimizers[-1].param_groups[0]["betas"] == (0.5, 0.6)
    with pytest.raises(ValueError, match="value_betas"):
        make_optimizer(Model(), lr=1e-3, value_betas=(0.5, 1.0))


@pytest.mark.parametrize("unscale", [False, True])
def test_grad_scaler_with_row_adam_in_make_optimizer_is_refused(unscale):
    """make_optimizer(value_optimizer="lazy_adam") wraps a RowAdam in a MultiOptimizer: GradScaler
    would unscale and inf-check only ``.grad`` and then step the loss-scaled rows unchecked; the
    step is refused with a clear error instead, and a plain step works afterwards."""
    model = Model()
    opt = make_optimizer(model, lr=1e-3, value_optimizer="lazy_adam")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    scaler.scale(model(x).square().mean()).backward()
    if unscale:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="MultiOptimizer holding a RowAdam does not support GradScaler"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    before = model.mem3.values.detach().clone()
    opt.step()
    assert not torch.equal(model.mem3.values.detach(), before)


def test_grad_scaler_with_multi_optimizer_without_row_adam_still_steps():
    """AdamW + SparseAdam (no RowAdam): GradScaler unscales every ``.grad`` and steps as usual."""
    model = Model(sparse=True)
    opt = make_optimizer(model, lr=1e-3, value_optimizer="adamw")
    assert isinstance(opt, MultiOptimizer) and not getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    scaler.scale(model(x).square().mean()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
