import copy
import math

import pytest
import torch
from torch import nn

from pkmem import ProductKeyMemory
from pkmem.optim import MultiOptimizer, clip_grad_norm, make_optimizer, param_groups, value_parameters


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
