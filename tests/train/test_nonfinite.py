"""A non-finite step changes nothing (on the device, no host sync), is said at the next log step,
and a run of them stops training with a clear error."""

import json
import math

import pytest
import torch
from conftest import TINY

from pkmem.config import load_config
from pkmem.models import MemoryTransformer, MemoryTransformerConfig
from pkmem.optim import clip_grad_norm, make_optimizer
from pkmem.train.checkpoint import list_checkpoints, load_checkpoint
from pkmem.train.guard import StepGuard, finite_flag
from pkmem.train.loop import LoopState, fit, set_up


def _model(sparse_values: bool = False) -> MemoryTransformer:
    torch.manual_seed(0)
    memory = dict(heads=2, num_keys=6, topk=3, k_dim=8, sparse_values=sparse_values)
    cfg = dict(vocab_size=40, seq_len=12, dim=16, n_layers=2, n_heads=2, mem_layers=(2,))
    return MemoryTransformer(MemoryTransformerConfig(**cfg, memory=memory))


def _snapshot(model, opt) -> list[torch.Tensor]:
    for o in getattr(opt, "optimizers", [opt]):
        if hasattr(o, "flush"):  # RowAdam (exact): rows nobody read lag in memory until flushed
            o.flush()
    out = [p.detach().clone() for p in model.parameters()]  # (BatchNorm statistics follow the forward)
    for o in getattr(opt, "optimizers", [opt]):
        for st in o.state.values():
            out += [v.clone() if torch.is_tensor(v) else torch.tensor(float(v)) for v in st.values()]
    return out


def _guarded_step(model, opt, guard, seed: int, poison: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (3, 13), generator=g)
    logits = model(x[:, :-1])
    if poison:
        logits = logits * float("nan")
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x[:, 1:].reshape(-1))
    loss.backward()
    ok = guard.step(loss, *clip_grad_norm(model, 1.0))
    opt.zero_grad()
    return ok


@pytest.mark.parametrize("on_device", [True, None])
@pytest.mark.parametrize("values", ["adamw", "sparse_adam", "lazy_adam", "exact_adam"])
def test_a_non_finite_step_changes_nothing(values, on_device):
    """On the device (as on CUDA): AdamW (fused, found_inf), SparseAdam (rows put back), RowAdam
    (its step dropped); on a CPU by default: the step not taken. The weights and moments stay."""
    sparse = values == "sparse_adam"
    model = _model(sparse)
    opt = make_optimizer(model, 1e-2, value_lr=1e-1, value_optimizer=values)
    guard = StepGuard(opt, on_device)
    assert _guarded_step(model, opt, guard, 0, poison=False)
    before = _snapshot(model, opt)
    assert not _guarded_step(model, opt, guard, 1, poison=True)
    after = _snapshot(model, opt)
    unchanged = [torch.equal(a, b) for a, b in zip(before, after)]
    if sparse and on_device:  # SparseAdam's step count is a Python int: it counts the skipped step
        assert sum(not u for u in unchanged) == 1
    else:
        assert all(unchanged) and len(before) == len(after)
    assert guard.read() == (1, 1)
    assert _guarded_step(model, opt, guard, 2, poison=False)
    assert guard.read() == (0, 1)  # the run of one that ended at the last read
    assert not all(torch.equal(a, b) for a, b in zip(after, _snapshot(model, opt)))  # a real step again
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_a_nested_multi_optimizer_skips_its_rows_too():
    """A MultiOptimizer inside a MultiOptimizer: the guard reaches the innermost optimizers (the
    RowAdam takes the flag), so a non-finite step changes nothing there either."""
    from pkmem.optim import MultiOptimizer

    model = _model(False)
    inner = make_optimizer(model, 1e-2, value_lr=1e-1, value_optimizer="lazy_adam")
    opt = MultiOptimizer(inner)
    guard = StepGuard(opt, on_device=True)
    assert _guarded_step(model, opt, guard, 0, poison=False)
    before = _snapshot(model, inner)
    assert not _guarded_step(model, opt, guard, 1, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, inner)))
    assert _guarded_step(model, opt, guard, 2, poison=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, inner)))


def test_an_optimizer_without_found_inf_is_restored():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard(opt, on_device=True)
    for poison in (False, True, True):
        before = _snapshot(model, opt)
        loss = model(torch.randn(2, 4)).sum() * (float("inf") if poison else 1.0)
        loss.backward()
        guard.step(loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))
    assert guard.read() == (2, 2)


def _loop(tmp_path, corpus, cache_dir, poisoned, *overrides):
    """``fit`` of a tiny run whose logits are NaN at the steps in ``poisoned``; returns (run, log
    lines, the weights seen by each step's forward)."""
    cfg = load_config(
        "tiny", [*TINY, "data=text", f"data_path={corpus}", f"cache_dir={cache_dir}", *overrides]
    )
    lines = []
    run = set_up(cfg, tmp_path / "run", None, False, lines.append)
    seen, forward = {}, run.forward
    state = LoopState(step=0, lr=cfg.train.lr)

    def poisoning_forward(x):
        if run.model.training and state.step not in seen:
            seen[state.step] = [p.detach().clone() for p in run.model.parameters()]
        logits = forward(x)
        return logits * float("nan") if run.model.training and state.step in poisoned else logits

    run.forward = poisoning_forward
    return run, state, lines, seen


def test_the_loop_skips_and_says_so(tmp_path, corpus, cache_dir):
    run, state, lines, seen = _loop(tmp_path, corpus, cache_dir, {3, 4}, "max_steps=6", "ckpt_every=2")
    fit(run, state, lines.append)
    assert any("skipped 2 non-finite steps" in line for line in lines)
    records = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [r["skipped"] for r in records if r["type"] == "train"] == [0, 2, 0]
    train = [r for r in records if r["type"] == "train"]
    assert [math.isfinite(r["loss"]) for r in train] == [True, False, True]  # steps 3-4: none finite
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[5]))  # steps 3 and 4 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[5], seen[6]))
    ck = load_checkpoint(run.dir)  # finite, verified
    assert ck["state"]["step"] == 6


def test_a_run_of_non_finite_steps_stops_the_run(tmp_path, corpus, cache_dir):
    poisoned = set(range(3, 100))
    run, state, lines, _ = _loop(
        tmp_path, corpus, cache_dir, poisoned, "max_steps=20", "ckpt_every=2", "max_nonfinite_steps=3"
    )
    with pytest.raises(FloatingPointError, match=r"steps in a row up to step 6 .*max_nonfinite_steps=3"):
        fit(run, state, lines.append)
    (ckpt,) = list_checkpoints(run.dir)
    assert ckpt.name == "step_000000004"  # two in a row by then: saved, steps 3-4 changed no weight
    load_checkpoint(run.dir)  # finite and verified


def test_max_nonfinite_steps_is_checked():
    with pytest.raises(ValueError, match="max_nonfinite_steps=0 is not allowed"):
        load_config("tiny", ["max_nonfinite_steps=0"])


def test_finite_flag_mixed_values_are_checked_in_their_own_dtype():
    half = torch.tensor(1.0, dtype=torch.float16)
    assert finite_flag(torch.tensor(1.0), torch.tensor(2.0)).item()
    assert not finite_flag(torch.tensor(1.0), torch.tensor(math.inf)).item()
    assert finite_flag(half, torch.tensor(100_000)).item()  # a stack would cast 1e5 to an inf float16
    assert not finite_flag(half, torch.tensor([1.0, math.nan])).item()
    assert finite_flag(torch.tensor(70_000)).item()
