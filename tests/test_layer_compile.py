"""torch.compile(fullgraph=True) of a whole MemoryTransformer with a memory: no graph break, and the
compiled model's outputs, gradients and BatchNorm statistics equal the eager model's (training mode,
padded batch). On a CPU the Triton kernels run under Triton's interpreter (set here before they are
imported); the compiled graph calls them through their custom ops."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pkmem.models import MemoryTransformer, MemoryTransformerConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _models(backend: str):
    cfg = MemoryTransformerConfig(
        vocab_size=50, seq_len=16, dim=32, n_layers=2, n_heads=4, mem_layers=(2,),
        memory={"heads": 2, "num_keys": 8, "topk": 4, "k_dim": 16, "backend": backend},
    )  # fmt: skip
    torch.manual_seed(0)
    eager = MemoryTransformer(cfg).to(DEVICE)
    compiled = MemoryTransformer(cfg).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _step(call, model, idx, mask, grad):
    out = call(idx, mask)
    (out * grad).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _skip_without_kernels(backend: str) -> None:
    if backend == "triton":
        try:
            from pkmem.ops.triton import _common
        except ImportError as e:  # pragma: no cover - triton is a dev dependency
            pytest.skip(f"triton kernels do not import: {e}")
        if DEVICE.type == "cpu" and not _common.INTERPRET:
            pytest.skip("no CUDA device and the kernels were imported without TRITON_INTERPRET=1")


def _compare(backend: str, compiler, tol: float, track: bool = False) -> None:
    """Two training steps of the compiled model against the eager one: outputs, gradients, the
    BatchNorm statistics (and with ``track`` the usage statistics updated inside the forward); one
    graph, no graph break. The compiled model runs first, with the backend choice not yet cached
    (as in a training run started with ``compile=true``)."""
    from torch._dynamo.utils import counters

    from pkmem.metrics import UsageTracker
    from pkmem.ops import dispatch

    torch._dynamo.reset()
    counters.clear()
    dispatch._RESOLVED.clear()
    dispatch._REASONS.clear()
    eager, model = _models(backend)
    trackers = [UsageTracker(m).start() for m in (eager, model)] if track else []
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # the second call runs the cached graph
        idx = torch.randint(0, 50, (2, 8), generator=g).to(DEVICE)
        mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
        mask[1, 5:] = False
        grad = torch.randn(2, 8, 50, generator=g).to(DEVICE)
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        out2, g2 = _step(compiled, model, idx, mask, grad)
        out1, g1 = _step(eager, eager, idx, mask, grad)
        torch.testing.assert_close(out2, out1, rtol=tol, atol=tol)
        assert g1.keys() == g2.keys()
        for name in g1:
            msg = lambda m, n=name, s=step: f"step {s}, grad of {n}: {m}"  # noqa: E731
            torch.testing.assert_close(g2[name], g1[name], rtol=10 * tol, atol=tol, msg=msg)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for (name, a), b in zip(eager.named_buffers(), model.buffers()):  # BatchNorm running statistics
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)
    if track:
        (name,) = trackers[0].names
        a, b = trackers[0].stats[name], trackers[1].stats[name]
        assert int(a.tokens) == 2 * 13  # two steps of 13 unmasked positions
        torch.testing.assert_close(b.weight, a.weight, rtol=tol, atol=tol)
        assert torch.equal(b.reads, a.reads) and torch.equal(b.tokens, a.tokens)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_whole_model_fullgraph(backend):
    _skip_without_kernels(backend)
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    ops = {"forward": set(), "backward": set()}

    def record(kind):
        def compiler(gm, example_inputs):
            ops[kind].update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("pkmem."))
            return make_boxed_func(gm.forward)

        return compiler

    # as backend="aot_eager": AOTAutograd's forward and backward graphs, run without code generation
    # (inductor compiles C++ on a CPU: minutes), here recording which of pkmem's custom ops they call
    _compare(backend, aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward")), 1e-5)
    if backend == "triton":  # the kernels run inside the compiled graphs, as opaque custom ops
        names = ("batch_norm", "product_lookup", "weighted_gather")
        assert ops["forward"] == {f"pkmem.{n}.default" for n in names}, ops
        assert ops["backward"] == {f"pkmem.{n}_backward.default" for n in names}, ops
    else:
        assert ops == {"forward": set(), "backward": set()}, ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_whole_model_with_usage_tracking(backend):
    """``pkmem train compile=true`` tracks usage inside the compiled forward (the default): no graph
    break (on a CPU the index bound check, a host read, is skipped while compiling) and the same
    statistics as the eager model's."""
    _skip_without_kernels(backend)
    _compare(backend, "aot_eager", 1e-5, track=True)


def test_restarting_usage_tracking_keeps_the_compiled_graph():
    """A tracker stopped and started again (as around each evaluation of ``pkmem train``) zeroes its
    buffers in place: the compiled forward keeps its one graph and counts from the restart."""
    from torch._dynamo.utils import counters

    from pkmem.metrics import UsageTracker

    torch._dynamo.reset()
    counters.clear()
    _, model = _models("torch")
    tracker = UsageTracker(model).start()
    (name,) = tracker.names
    buffers = [id(t) for t in (tracker.stats[name].weight, tracker.stats[name].reads)]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    compiled(idx)
    assert int(tracker.stats[name].tokens) == 16
    tracker.stop().start()
    assert int(tracker.stats[name].tokens) == 0
    compiled(idx)
    compiled(idx)
    assert int(tracker.stats[name].tokens) == 32
    assert [id(t) for t in (tracker.stats[name].weight, tracker.stats[name].reads)] == buffers
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_constant_mark_is_torchs():
    """pkmem marks its trace-time constants as torch.compiler.assume_constant_result does, without
    importing torch._dynamo: the mark must stay the one that function sets."""
    from pkmem.ops import dispatch

    def f():
        return 1

    marked = torch.compiler.assume_constant_result(f)
    assert (
        marked.__dict__
        == dispatch._assume_constant_result(lambda: 1).__dict__
        == {"_dynamo_marked_constant": True}
    )


def test_backend_errors_under_compile_are_value_errors(monkeypatch):
    """A backend that cannot run raises the eager ValueError from a compiled model too (not dynamo's
    internal error)."""
    from pkmem.ops import dispatch

    torch._dynamo.reset()
    dispatch._RESOLVED.clear()
    query, subkeys = torch.randn(3, 2, 8), torch.randn(2, 2, 4, 4)
    monkeypatch.setenv("PKMEM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PKMEM_BACKEND='bogus' is not allowed"):
        torch.compile(lambda q, k: dispatch.product_topk(q, k, 3), backend="eager")(query, subkeys)


def test_kernel_caches_are_made_while_tracing():
    """The search's cached candidate table is made while torch.compile traces, before the compiled
    graph first runs: made by that run, it would sit in the run's CUDA-graph pool (reduce-overhead:
    "tensor(s) in the cudagraph pool not tracked as outputs")."""
    _skip_without_kernels("triton")
    from pkmem.ops.triton import search

    torch._dynamo.reset()
    search._candidate_table.cache_clear()
    cached_when_run = []

    def backend(gm, example_inputs):
        def run(*args):
            cached_when_run.append(search._candidate_table.cache_info().currsize)
            return gm.forward(*args)

        return run

    _, model = _models("triton")
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    torch.compile(model, backend=backend, fullgraph=True)(idx)
    assert cached_when_run == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_whole_model_inductor_gpu():
    """The default compiler (inductor) on CUDA, the kernels between its generated code."""
    _skip_without_kernels("triton")
    _compare("triton", "inductor", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_reduce_overhead_with_usage_tracking_gpu():
    """mode="reduce-overhead" (the forward and backward replayed from CUDA graphs) with usage
    tracking: the statistics are updated in place at static addresses, so the graphs replay; three
    training steps equal the eager model's (outputs, gradients, statistics)."""
    _skip_without_kernels("triton")
    from pkmem.metrics import UsageTracker
    from pkmem.ops import dispatch
    from pkmem.ops.triton import search

    torch._dynamo.reset()
    dispatch._RESOLVED.clear()
    search._candidate_table.cache_clear()  # as in a fresh process: the compiled model runs first
    eager, model = _models("triton")
    trackers = [UsageTracker(m).start() for m in (eager, model)]
    compiled = torch.compile(model, mode="reduce-overhead")
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        idx = torch.randint(0, 50, (2, 8), generator=g).to(DEVICE)
        grad = torch.randn(2, 8, 50, generator=g).to(DEVICE)
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        out2, g2 = _step(lambda i, _: compiled(i), model, idx, None, grad)
        out1, g1 = _step(lambda i, _: eager(i), eager, idx, None, grad)
        torch.testing.assert_close(out2, out1, rtol=1e-4, atol=1e-4)
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-3, atol=1e-4, msg=name)
    (name,) = trackers[0].names
    a, b = trackers[0].stats[name], trackers[1].stats[name]
    assert int(b.tokens) == int(a.tokens) == 4 * 16
    assert torch.equal(b.reads, a.reads)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-4)
