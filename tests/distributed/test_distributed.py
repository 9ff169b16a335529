"""Training on several ranks (pkmem.distributed) against one process, on the CPU with gloo.

One spawn of 2 processes runs every distributed scenario in turn (starting processes is the slow
part on a busy CI machine); the tests compare what it wrote with one-process runs of the same
config. The config keeps Adam's eps at 1e-5: the query BatchNorm makes a few gradients exactly 0 in
theory (the bias before it), and Adam turns their float noise (1e-9, different on one process and
two) into full-size steps with a smaller eps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pkmem.config import load_config
from pkmem.distributed import DistributedError, Parallel
from pkmem.train import checkpoint as ckpt_lib
from pkmem.train.loop import load_run, resume, train

WORLD = 2
SPAWN_TIMEOUT_S = 240  # the whole spawn; each collective gives up after PKMEM_DIST_TIMEOUT_S
OVERRIDES = [
    "seq_len=32",
    "dim=32",
    "n_layers=2",
    "n_heads=2",
    "mem_layers=[2]",
    "memory.heads=2",
    "memory.num_keys=8",
    "memory.topk=4",
    "memory.k_dim=16",
    "batch_size=4",
    "lr=3e-3",
    "value_lr=1e-2",
    "eps=1e-5",
    "warmup_steps=1",
    "lr_decay_steps=5",  # the same schedule for runs of 3 and 5 steps
    "log_every=1",
    "ckpt_every=3",
    "keep_checkpoints=2",
    "eval_every=3",
    "eval_tokens=160",  # 5 windows: one rank evaluates a padded window
    "final_eval_tokens=160",
    "max_time_s=null",
    "tensorboard=false",
]


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = "the memory reads a few slots of a large table selected by product keys".split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + "\n")
    return root


def _quiet(*args, **kwargs):
    pass


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _worker(rank: int, ports: list[int], scenarios: list[dict], out_dir: str) -> None:
    """One rank: every scenario in turn (each joins a new process group); results as JSON."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        PKMEM_DIST_TIMEOUT_S="60",
    )
    torch.set_num_threads(1)
    import pkmem.train.loop as loop

    results = {}
    for port, sc in zip(ports, scenarios):
        os.environ["MASTER_PORT"] = str(port)
        t0 = time.perf_counter()
        try:
            if sc["kind"] == "train":
                cfg = load_config("tiny", sc["overrides"])
                loop.train(cfg, sc["dir"], progress=False, log=_quiet)
            elif sc["kind"] == "resume":
                loop.resume(sc["dir"], sc["overrides"], progress=False, log=_quiet)
            elif sc["kind"] == "fail":  # rank 1 cannot build its model
                build = loop.build_model

                def broken(*args, build=build, **kwargs):
                    if rank == 1:
                        raise ValueError("rank 1 cannot build its model")
                    return build(*args, **kwargs)

                loop.build_model = broken
                try:
                    loop.train(load_config("tiny", sc["overrides"]), sc["dir"], progress=False, log=_quiet)
                finally:
                    loop.build_model = build
            results[sc["name"]] = {"ok": True, "seconds": time.perf_counter() - t0}
        except Exception as e:
            results[sc["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn(scenarios: list[dict], out_dir: Path) -> list[dict]:
    ctx = mp.start_processes(
        _worker,
        args=(_free_ports(len(scenarios)), scenarios, str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} spawned ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["type"] == "train"]


def _evals(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["type"] == "eval"}


def _params(path: Path) -> dict[str, torch.Tensor]:
    model = load_run(path)[0]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_params_close(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:09d}"


def _only_checkpoint(run_dir: Path, step: int) -> None:
    """Keep the run's checkpoint of ``step`` alone (the run then resumes from it)."""
    for ck in ckpt_lib.list_checkpoints(run_dir):
        if ck.name != f"step_{step:09d}":
            shutil.rmtree(ck)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process references and the distributed scenarios (one spawn), run once."""
    root = tmp_path_factory.mktemp("distributed")
    data, cache = _corpus(root / "corpus"), root / "cache"
    base = ["data=text", f"data_path={data}", f"cache_dir={cache}", *OVERRIDES]
    torch.manual_seed(0)
    # the reference: one process, 5 steps, checkpoints at 3 and 5
    train(load_config("tiny", [*base, "max_steps=5"]), root / "ref", progress=False, log=_quiet)
    sparse = [*base, "max_steps=3", "mem_layers=[1,2]", "mem_share_values=true", "memory.sparse_values=true"]
    train(load_config("tiny", sparse), root / "sparse_ref", progress=False, log=_quiet)
    shutil.copytree(root / "ref", root / "one_to_two")
    _only_checkpoint(root / "one_to_two", 3)
    scenarios = [
        {"name": "fail", "kind": "fail", "dir": str(root / "fail"), "overrides": [*base, "max_steps=3"]},
        {"name": "dp", "kind": "train", "dir": str(root / "dp"), "overrides": [*base, "max_steps=3"]},
        {
            "name": "columns",
            "kind": "train",
            "dir": str(root / "sharded"),
            "overrides": [*base, "max_steps=3", "shard_values=true"],
        },
        {
            "name": "columns_to_rows",  # saved with columns, resumed with rows
            "kind": "resume",
            "dir": str(root / "sharded"),
            "overrides": ["max_steps=5", "shard_layout=rows"],
        },
        {
            "name": "sparse",  # two memories sharing one table, row-sparse gradients, SparseAdam
            "kind": "train",
            "dir": str(root / "sparse"),
            "overrides": [*sparse, "shard_values=true"],
        },
        {
            "name": "row_adam",  # RowAdam's exact mode (dense AdamW's result) on a table split by rows
            "kind": "train",
            "dir": str(root / "row_adam"),
            "overrides": [
                *base,
                "max_steps=3",
                "shard_values=true",
                "shard_layout=rows",
                "value_optimizer=exact_adam",
            ],
        },
        {
            "name": "one_to_two",
            "kind": "resume",
            "dir": str(root / "one_to_two"),
            "overrides": ["max_steps=5", "shard_values=true"],
        },
    ]
    t0 = time.perf_counter()
    results = _spawn(scenarios, root)
    spawn_s = time.perf_counter() - t0
    # a sharded run saved on 2 ranks, resumed in one process
    if (root / "sharded").is_dir():  # else the scenario's test reports the ranks' errors
        shutil.copytree(root / "sharded", root / "two_to_one")
        _only_checkpoint(root / "two_to_one", 3)
        resume(root / "two_to_one", ["max_steps=5"], progress=False, log=_quiet)
    return {"root": root, "results": results, "spawn_s": spawn_s}


def _ok(runs, name: str) -> None:
    """The scenario ran on every rank (its error otherwise)."""
    for rank, res in enumerate(runs["results"]):
        assert res[name]["ok"], f"rank {rank}: {res[name]}"


def test_data_parallel_equals_one_process(runs):
    _ok(runs, "dp")
    root = runs["root"]
    ref = _losses(root / "ref")
    np.testing.assert_allclose(_losses(root / "dp"), ref[:3], rtol=1e-5)
    _assert_params_close(_params(_checkpoint(root / "dp", 3)), _params(_checkpoint(root / "ref", 3)))
    # the evaluation split over the ranks (one padded window) gives one process's numbers
    got, want = _evals(root / "dp")[3], _evals(root / "ref")[3]
    assert got["tokens"] == want["tokens"] == 160
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["memories"][0]["usage"] == pytest.approx(want["memories"][0]["usage"], rel=1e-6)
    state = json.loads((_checkpoint(root / "dp", 3) / "state.json").read_text())
    assert state["layout"] == "dcp" and state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD


def test_sharded_values_equal_one_process(runs):
    _ok(runs, "columns")
    _ok(runs, "columns_to_rows")
    root = runs["root"]
    # 3 steps with the table split by columns, then (resumed) 2 by rows: the one-process run's steps
    np.testing.assert_allclose(_losses(root / "sharded"), _losses(root / "ref"), rtol=1e-5)
    for step in (3, 5):
        _assert_params_close(
            _params(_checkpoint(root / "sharded", step)), _params(_checkpoint(root / "ref", step))
        )
    assert _evals(root / "sharded")[5]["loss"] == pytest.approx(_evals(root / "ref")[5]["loss"], rel=1e-5)


def test_sharded_shared_sparse_values_equal_one_process(runs):
    _ok(runs, "sparse")
    root = runs["root"]
    np.testing.assert_allclose(_losses(root / "sparse"), _losses(root / "sparse_ref"), rtol=1e-5)
    got, want = _params(_checkpoint(root / "sparse", 3)), _params(_checkpoint(root / "sparse_ref", 3))
    _assert_params_close(got, want)
    model = load_run(root / "sparse")[0]  # one table, loaded once
    assert model.blocks[0].memory.values is model.blocks[1].memory.values


def test_sharded_values_with_the_row_optimizer(runs):
    _ok(runs, "row_adam")
    root = runs["root"]
    np.testing.assert_allclose(_losses(root / "row_adam"), _losses(root / "ref")[:3], rtol=1e-5)
    _assert_params_close(_params(_checkpoint(root / "row_adam", 3)), _params(_checkpoint(root / "ref", 3)))


def test_resume_across_world_sizes(runs):
    _ok(runs, "one_to_two")
    root = runs["root"]
    ref = _losses(root / "ref")
    want = _params(_checkpoint(root / "ref", 5))
    # saved by one process, resumed on 2 ranks with sharded values; saved sharded on 2, resumed on 1
    for name in ("one_to_two", "two_to_one"):
        np.testing.assert_allclose(_losses(root / name), ref, rtol=1e-5, err_msg=name)
        _assert_params_close(_params(_checkpoint(root / name, 5)), want)


def test_sharded_checkpoint_loads_in_one_process(runs):
    """``pkmem eval`` / ``generate`` read a sharded run with whole tables (load_run)."""
    root = runs["root"]
    model, cfg, tok, ck = load_run(root / "sharded")
    assert ck["state"]["layout"] == "dcp" and ck["model"] is None
    assert model.blocks[1].memory.values.shape == (64, 32)
    ref = load_run(_checkpoint(root / "ref", 5))[0]
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_failing_rank_is_reported_on_every_rank(runs):
    fail = [r["fail"] for r in runs["results"]]
    assert not fail[0]["ok"] and not fail[1]["ok"]
    assert fail[1]["error"] == "ValueError: rank 1 cannot build its model"  # its own error
    assert fail[0]["error"].startswith("DistributedError: building the model: rank 1 failed: ValueError")
    assert not (runs["root"] / "fail").exists()  # a run that never started leaves nothing
    # and the next scenario ran: the ranks left the failed run's process group cleanly
    _ok(runs, "dp")


# ---- one process: what needs no second rank ---------------------------------------------------------
def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    par = Parallel.from_env("cpu")
    assert not par.distributed and par.is_main and par.rows(5) == slice(None)
    assert par.agree("x", lambda: 3) == 3 and par.any(True, False) == (True, False)


def test_bad_environment_and_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not allowed with WORLD_SIZE=2"):
        Parallel.from_env("cpu")
    monkeypatch.setenv("PKMEM_DIST_TIMEOUT_S", "soon")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"PKMEM_DIST_TIMEOUT_S='soon' is not allowed"):
        Parallel.from_env("cpu")
    with pytest.raises(ValueError, match=r"batch_size=5 is not allowed with 2 ranks"):
        Parallel(rank=1, world_size=2).rows(5)
    assert Parallel(rank=1, world_size=2).rows(6) == slice(3, 6)


def test_replicated_row_sparse_values_are_refused():
    from pkmem.models import MemoryTransformer

    par = Parallel(rank=0, world_size=2)
    model = MemoryTransformer(load_config("tiny", [*OVERRIDES, "memory.sparse_values=true"]).model)
    with pytest.raises(
        ValueError, match=r"sparse_values=True is not allowed on 2 ranks .* shard_values=true"
    ):
        par.check_model(model, shard_values=False)
    par.check_model(model, shard_values=True)
    dense = MemoryTransformer(load_config("tiny", OVERRIDES).model)
    with pytest.raises(
        ValueError, match=r"value_optimizer='lazy_adam' is not allowed on 2 ranks .* shard_values"
    ):
        par.check_model(dense, shard_values=False, value_optimizer="lazy_adam")
    par.check_model(dense, shard_values=True, value_optimizer="lazy_adam")


def test_a_rank_that_never_joins_times_out(monkeypatch):
    (port,) = _free_ports(1)
    for k, v in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PKMEM_DIST_TIMEOUT_S", "2")
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match=r"rank 0 of 2 could not join the process group .* within 2 s"):
        Parallel.from_env("cpu")
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("shape", [(64, 32), (1000, 24), (37, 3), (5, 3)])
@pytest.mark.parametrize("dim", [0, 1])
def test_draw_part_gives_the_whole_tables_numbers(shape, dim):
    """A shard's values are the unsharded table's, and the random numbers drawn after it too."""
    from pkmem.distributed.values import draw_part

    torch.manual_seed(3)
    whole = torch.empty(shape).normal_(0, 0.5)
    after = torch.rand(4)
    n = shape[dim]
    for part in (slice(0, n // 2), slice(n // 2, n)):
        torch.manual_seed(3)
        got = draw_part(shape, 0.5, dim, part, chunk_elements=64)  # many small blocks
        assert torch.equal(got, whole[part] if dim == 0 else whole[:, part])
        assert torch.equal(torch.rand(4), after)


def test_cli_prints_another_ranks_failure_as_one_line(monkeypatch, capsys):
    import pkmem.train.loop as loop
    from pkmem.cli import main

    def failing(*args, **kwargs):
        raise DistributedError("building the model: rank 1 failed: ValueError: no room")

    monkeypatch.setattr(loop, "train", failing)
    assert main(["train", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pkmem train: error: building the model: rank 1 failed: ValueError: no room"]
