import math

import pytest
import torch
from torch import nn

from pkmem import ProductKeyMemory
from pkmem.metrics import (
    UsageStats,
    UsageTracker,
    gini,
    kl_to_uniform,
    slots_for_mass,
    track_usage,
    usage,
)


def small_memory(**kw) -> ProductKeyMemory:
    kw = {"heads": 2, "num_keys": 6, "topk": 3, "k_dim": 8, **kw}
    return ProductKeyMemory(16, **kw)


# ---- pure functions, against hand-computed values ------------------------------------------------
def test_usage_by_hand():
    assert usage(torch.tensor([0.0, 2.0, 0.0, 1e-30])).item() == 0.5
    assert usage(torch.zeros(3)).item() == 0.0
    assert usage(torch.ones(7)).item() == 1.0


def test_kl_by_hand():
    # z = [1, 1, 2] -> p = [1/4, 1/4, 1/2]
    expected = math.log(3) + 2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)
    assert kl_to_uniform(torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx(expected, rel=1e-12)
    # zeros count as 0 log 0 = 0: p = [0, 1/2, 1/2, 0] -> log 4 + log(1/2) = log 2
    assert kl_to_uniform(torch.tensor([0.0, 2.0, 2.0, 0.0])).item() == pytest.approx(math.log(2), rel=1e-12)
    assert kl_to_uniform(torch.full((5,), 3.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(torch.tensor([0.0, 0.0, 9.0])).item() == pytest.approx(math.log(3), rel=1e-12)
    assert math.isnan(kl_to_uniform(torch.zeros(4)).item())


def test_gini_by_hand():
    # [1, 2, 3, 4]: sum over ordered pairs |xi - xj| = 20, 2 n^2 mean = 80
    assert gini(torch.tensor([3.0, 1.0, 4.0, 2.0])).item() == pytest.approx(0.25, rel=1e-12)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 5.0])).item() == pytest.approx(0.75, rel=1e-12)
    assert gini(torch.full((6,), 0.1)).item() == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(gini(torch.zeros(4)).item())


def test_slots_for_mass_by_hand():
    z = torch.tensor([1.0, 4.0, 0.0, 2.0, 3.0])  # sorted 4, 3, 2, 1: cumulative 4, 7, 9, 10 of 10
    assert slots_for_mass(z, 0.4).item() == 1
    assert slots_for_mass(z, 0.5).item() == 2
    assert slots_for_mass(z, 0.7).item() == 2
    assert slots_for_mass(z, 0.71).item() == 3
    assert slots_for_mass(z, 0.9).item() == 3
    assert slots_for_mass(z, 0.99).item() == 4
    assert slots_for_mass(z, 1.0).item() == 4  # the zero slot is never needed
    assert slots_for_mass(torch.zeros(3), 0.5).item() == 0
    assert slots_for_mass(torch.ones(100), 0.9).item() == 90


@pytest.mark.parametrize(
    "z",
    [torch.ones(2, 2), torch.ones(0), torch.tensor([1, 2]), torch.tensor([1.0, -0.5]), [1.0, 2.0]],
)
def test_pure_functions_reject_bad_z(z):
    for fn in (usage, kl_to_uniform, gini, lambda v: slots_for_mass(v, 0.5)):
        with pytest.raises(ValueError, match="z"):
            fn(z)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, True, "0.5", math.nan])
def test_slots_for_mass_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        slots_for_mass(torch.ones(3), fraction)


# ---- UsageStats ------------------------------------------------------------------------------------
def hand_batch():
    # 3 tokens, 2 heads, topk 2; token 1 is masked (index -1, weight 0)
    idx = torch.tensor([[[0, 3], [3, 5]], [[-1, -1], [-1, -1]], [[5, 1], [0, 0]]])
    w = torch.tensor([[[0.6, 0.4], [0.7, 0.3]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.9, 0.1]]])
    return idx, w


def test_update_accumulates_by_hand():
    s = UsageStats(8)
    idx, w = hand_batch()
    s.update(idx, w)
    s.update(idx[:1], w[:1])  # a second batch: token 0 again
    expected_w = torch.tensor(
        [0.6 + 0.9 + 0.1 + 0.6, 0.5, 0, 0.4 + 0.7 + 0.4 + 0.7, 0, 0.3 + 0.5 + 0.3, 0, 0]
    )
    expected_r = torch.tensor([4, 1, 0, 4, 0, 3, 0, 0])
    torch.testing.assert_close(s.weight, expected_w.float())
    assert s.weight.dtype == torch.float32
    assert torch.equal(s.reads, expected_r)
    assert s.tokens.item() == 3
    out = s.compute()
    z = expected_w.double()
    assert out["usage"] == pytest.approx(4 / 8)
    assert out["read_fraction"] == pytest.approx(4 / 8)
    assert out["kl"] == pytest.approx(kl_to_uniform(z).item(), rel=1e-6)
    assert out["gini"] == pytest.approx(gini(z).item(), rel=1e-6)
    # weights sorted: 2.2, 2.2, 1.1, 0.5 of 6.0 -> 50 %: 2 slots, 90 %: 3, 99 %: 4
    assert (out["slots_50"], out["slots_90"], out["slots_99"]) == (2, 3, 4)
    assert out["tokens"] == 3 and out["num_slots"] == 8


def test_token_counted_unless_all_its_indices_are_masked():
    s = UsageStats(4)
    idx = torch.tensor([[[2, -1], [-1, -1]], [[-1, -1], [-1, -1]], [[0, 1], [1, 3]]])
    s.update(idx, torch.full(idx.shape, 0.5))
    assert s.tokens.item() == 2
    assert s.reads.tolist() == [1, 2, 1, 1]


def test_read_counted_even_with_zero_weight():
    s = UsageStats(4)
    s.update(torch.tensor([[[1, 2]]]), torch.tensor([[[1.0, 0.0]]]))  # relu scores can be 0
    out = s.compute()
    assert out["usage"] == 0.25 and out["read_fraction"] == 0.5


def test_signed_weights_accumulate_their_magnitude():
    s = UsageStats(4)
    s.update(torch.tensor([[[1, 2]]]), torch.tensor([[[-2.0, 1.0]]]))
    torch.testing.assert_close(s.weight, torch.tensor([0.0, 2.0, 1.0, 0.0]))


def test_empty_stats_values():
    out = UsageStats(5).compute()
    assert out["usage"] == 0.0 and out["read_fraction"] == 0.0 and out["tokens"] == 0
    assert math.isnan(out["kl"]) and math.isnan(out["gini"])
    assert (out["slots_50"], out["slots_90"], out["slots_99"]) == (0, 0, 0)
    assert out["num_slots"] == 5
    s = UsageStats(8)
    s.update(*hand_batch())
    s.reset()
    out = s.compute()
    assert out["usage"] == 0.0 and math.isnan(out["kl"]) and out["slots_99"] == 0 and out["tokens"] == 0


def test_update_never_reads_values_on_the_host():
    # meta tensors have no data: any .item() / bool() / data-dependent shape in update would raise
    s = UsageStats(64)
    s.update(torch.zeros(4, 5, 2, 3, dtype=torch.long, device="meta"), torch.zeros(4, 5, 2, 3, device="meta"))
    assert s.weight.device.type == "meta" and s.reads.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_no_sync_on_cuda():
    idx, w = (t.cuda() for t in hand_batch())
    s = UsageStats(8)
    s.update(idx, w)  # creates the buffers
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            s.update(idx, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.tokens.item() == 8


def test_merge_and_state_dict():
    idx, w = hand_batch()
    a, b, both = UsageStats(8), UsageStats(8), UsageStats(8)
    a.update(idx[:2], w[:2])
    b.update(idx[2:], w[2:])
    both.update(idx, w)
    assert a.merge(b) is a
    torch.testing.assert_close(a.weight, both.weight)
    assert torch.equal(a.reads, both.reads) and a.tokens.item() == both.tokens.item() == 2
    empty = UsageStats(8).merge(a)  # merging into an empty one copies
    torch.testing.assert_close(empty.weight, a.weight)
    a.merge(UsageStats(8))  # merging an empty one changes nothing
    torch.testing.assert_close(empty.weight, a.weight)

    c = UsageStats(8)
    c.load_state_dict(a.state_dict())
    assert c.compute() == a.compute()
    c.update(idx, w)  # the loaded buffers are copies
    assert c.tokens.item() == 4 and a.tokens.item() == 2
    buffers = (c.weight, c.reads, c.tokens)
    c.load_state_dict(a.state_dict())  # into made buffers: in place (a compiled forward keeps them)
    assert c.compute() == a.compute() and all(x is y for x, y in zip(buffers, (c.weight, c.reads, c.tokens)))
    c.load_state_dict(UsageStats(8).state_dict())
    assert c.weight is buffers[0] and c.compute()["tokens"] == 0
    fresh = UsageStats(8)
    fresh.load_state_dict(UsageStats(8).state_dict())
    assert fresh.weight is None and fresh.compute()["tokens"] == 0


def test_stats_errors():
    with pytest.raises(ValueError, match="num_slots"):
        UsageStats(0)
    with pytest.raises(ValueError, match="num_slots"):
        UsageStats(4.0)
    s = UsageStats(8)
    idx, w = hand_batch()
    with pytest.raises(ValueError, match="indices"):
        s.update(idx.float(), w)
    with pytest.raises(ValueError, match="weights"):
        s.update(idx, w[..., :1])
    with pytest.raises(ValueError, match="weights"):
        s.update(idx[0, 0], w[0, 0])  # no heads dimension
    with pytest.raises(ValueError, match="num_slots=8"):
        s.update(torch.tensor([[8, 1]]), torch.ones(1, 2))  # a slot past the table
    with pytest.raises(ValueError, match="num_slots=8"):
        s.merge(UsageStats(9))
    with pytest.raises(ValueError, match="num_slots"):
        s.load_state_dict(UsageStats(9).state_dict())
    bad = {"num_slots": 8, "weight": torch.zeros(7), "reads": torch.zeros(8), "tokens": torch.tensor(0)}
    with pytest.raises(ValueError, match="weight"):
        s.load_state_dict(bad)


def test_all_reduce_without_distributed_is_a_no_op():
    s = UsageStats(8)
    assert s.all_reduce_() is s and s.weight is None
    s.update(*hand_batch())
    before = s.weight.clone()
    s.all_reduce_()
    torch.testing.assert_close(s.weight, before)


def _all_reduce_worker(rank: int, world: int, store_path: str, out_path: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        s = UsageStats(8)
        if rank == 0:  # rank 1 reads nothing: it must still take part, with zeros
            idx, w = hand_batch()
            s.update(idx, w)
            s.update(idx, w)
        s.all_reduce_()
        torch.save(s.state_dict(), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_all_reduce_sums_over_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _all_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "stats")), nprocs=2, join=True
    )
    ref = UsageStats(8)
    idx, w = hand_batch()
    ref.update(idx, w)
    ref.update(idx, w)
    for rank in range(2):
        state = torch.load(tmp_path / f"stats.{rank}")
        torch.testing.assert_close(state["weight"], ref.weight)
        assert torch.equal(state["reads"], ref.reads) and state["tokens"].item() == 4


# ---- UsageTracker ----------------------------------------------------------------------------------
class TwoMemories(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 16)
        self.mem1 = small_memory()
        self.mem2 = small_memory(num_keys=5)
        self.alias = self.mem1  # the same module under a second name

    def forward(self, x, mask=None):
        return self.mem2(self.mem1(self.inp(x), mask), mask)


def expected_weights(mem: ProductKeyMemory, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w, idx = mem.lookup(x, mask)
    keep = idx >= 0
    return torch.zeros(mem.num_slots, dtype=torch.float64).index_add_(0, idx[keep], w[keep].double())


def test_tracker_matches_lookup():
    model = TwoMemories().eval()
    x = torch.randn(3, 7, 16)
    mask = torch.rand(3, 7) > 0.3
    mask[0, 0] = True
    with torch.no_grad():
        h = model.inp(x)
        h1 = model.mem1(h, mask)
        want1, want2 = expected_weights(model.mem1, h, mask), expected_weights(model.mem2, h1, mask)
    tracker = UsageTracker(model)
    assert tracker.names == ["mem1", "mem2"]  # the alias is not counted twice
    with tracker:
        with torch.no_grad():
            model(x, mask)
            model(x, mask)
    report = tracker.report()
    assert set(report) == {"mem1", "mem2"}
    for name, want in [("mem1", want1), ("mem2", want2)]:
        torch.testing.assert_close(tracker.stats[name].weight.double(), 2 * want, rtol=1e-5, atol=1e-6)
        r = report[name]
        assert r["tokens"] == 2 * int(mask.sum())
        assert r["usage"] == pytest.approx(float((want > 0).double().mean()))
        assert r["kl"] == pytest.approx(kl_to_uniform(want).item(), rel=1e-5)
        assert r["gini"] == pytest.approx(gini(want).item(), rel=1e-5)
        assert r["slots_90"] == slots_for_mass(want, 0.9).item()
        assert r["num_slots"] == tracker.memories[name].num_slots == getattr(model, name).num_slots


def test_tracker_start_stop_reset():
    model = TwoMemories()
    x = torch.randn(4, 16)
    tracker = track_usage(model)
    assert tracker.active and model.mem1.usage_stats is tracker.stats["mem1"]
    with tracker:  # already started: entering keeps the statistics
        model(x)
    assert tracker.report()["mem1"]["tokens"] == 4
    assert not tracker.active and model.mem1.usage_stats is None and model.mem2.usage_stats is None
    model(x)  # stopped: nothing accumulates, the report is kept
    assert tracker.report()["mem2"]["tokens"] == 4
    tracker.start()  # fresh statistics
    assert tracker.report()["mem2"]["tokens"] == 0
    model(x)
    model(x)
    assert tracker.report()["mem2"]["tokens"] == 8
    tracker.reset()
    assert tracker.report()["mem2"]["tokens"] == 0 and tracker.active
    model(x)
    assert tracker.report()["mem2"]["tokens"] == 4
    tracker.stop()


def test_tracker_on_bare_memory_and_memory_like_modules():
    mem = small_memory()
    with track_usage(mem) as tracker:
        mem(torch.randn(5, 16))
    assert tracker.names == ["memory"]
    assert tracker.report()["memory"]["tokens"] == 5

    class Duck(nn.Module):  # any module with num_slots and usage_stats (as pkmem.compat.PKM)
        def __init__(self):
            super().__init__()
            self.num_slots, self.usage_stats = 10, None

        def forward(self, x):
            self.usage_stats.update(torch.tensor([[[1, 2]]]), torch.tensor([[[0.5, 0.5]]]))
            return x

    model = nn.Sequential(nn.Identity(), Duck())
    with track_usage(model) as tracker:
        model(torch.zeros(1))
    assert tracker.names == ["1"] and tracker.report()["1"]["usage"] == pytest.approx(0.2)


def test_tracker_errors():
    with pytest.raises(ValueError, match="no memory"):
        UsageTracker(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="model"):
        UsageTracker("not a model")
    model = TwoMemories()
    first = track_usage(model)
    with pytest.raises(RuntimeError, match="already tracked"):
        track_usage(model)
    first.stop()
    second = track_usage(model)  # fine once the first one stopped
    first.stop()  # stopping the old one does not detach the new one's statistics
    assert model.mem1.usage_stats is second.stats["mem1"]
    second.stop()


def test_tracker_makes_buffers_on_the_memorys_one_device():
    """start() makes the buffers on the memory's device and a restart zeroes them in place; a memory
    on several devices (or on the meta device) gets its buffers from the first update instead."""

    class Mem(nn.Module):
        def __init__(self, *devices):
            super().__init__()
            self.num_slots, self.usage_stats = 8, None
            self.ps = nn.ParameterList([nn.Parameter(torch.zeros(2, device=d)) for d in devices])

    tracker = UsageTracker(Mem("cpu")).start()
    made = tracker.stats["memory"]
    assert made.device == torch.device("cpu")
    idx, w = hand_batch()
    made.update(idx, w)
    tracker.stop().start()
    assert tracker.stats["memory"] is made and made.tokens.item() == 0
    for devices in (("cpu", "meta"), ("meta",)):
        stats = UsageTracker(Mem(*devices)).start().stats["memory"]
        assert stats.weight is None
        stats.update(idx, w)
        assert stats.device == idx.device
