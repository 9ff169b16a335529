"""What a run tells its user and leaves behind: the time limit against the step count, the shared data
cache, file modes, 1-based memory layers in every record, optional packages, CPU threads."""

import io
import json
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from pkmem.cli import main

FAST = ["dim=32", "n_heads=2", "n_layers=2", "seq_len=32", "mem_layers=[2]", "memory.num_keys=8"]
FAST += ["memory.topk=4", "memory.k_dim=16", "memory.heads=2", "batch_size=4", "log_every=2"]
FAST += ["warmup_steps=2", "eval_tokens=256", "final_eval_tokens=512", "max_time_s=null", "tensorboard=false"]
# (as test_train_cli's: a few steps take well under a second)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, corpus):
    """A run on text files with no cache_dir: its data goes to the shared cache ($XDG_CACHE_HOME)."""
    out = tmp_path_factory.mktemp("runs") / "text"
    argv = ["train", "--out", str(out), "--no-progress", "--data", "text", "--data-path", str(corpus), *FAST]
    assert main([*argv, "max_steps=4"]) == 0
    return out


def test_time_limit_says_what_stops_the_run_and_how_to_continue(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *FAST, f"cache_dir={cache_dir}", "max_time_s=5"]
    argv += ["--max-steps", "100000"]
    assert main(argv) == 0  # with the progress bar
    text = capsys.readouterr().out
    assert "limits: max_steps=100000 and max_time_s=5" in text
    assert "max_time_s=5 will stop the run at about step" in text  # once the speed is known
    final = json.loads((out / "eval_valid.json").read_text())
    step = final["step"]
    assert final["stopped_early"] and final["stopped_by"] == "max_time_s" and final["max_steps"] == 100000
    assert f"stopped at step {step} of 100000 by max_time_s=5" in text
    assert f"continue with: pkmem train --out {out} --resume" in text
    assert text.rstrip().splitlines()[-1].startswith("note: stopped at step")  # the last word
    # the run continues to the end; the new result is not stopped early
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "max_time_s=null",
                 "--max-steps", str(step + 2)]) == 0  # fmt: skip
    final = json.loads((out / "eval_valid.json").read_text())
    assert final["step"] == step + 2 and not final["stopped_early"] and final["stopped_by"] == "max_steps"


def _limit(max_steps, max_time_s, elapsed, name="tiny"):
    from pkmem.train.loop import _TimeLimit

    said = []
    cfg = SimpleNamespace(name=name, train=SimpleNamespace(max_steps=max_steps, max_time_s=max_time_s))
    run = SimpleNamespace(cfg=cfg, pbar=tqdm(total=max_steps, file=io.StringIO()), dir=Path("runs/x"))
    limit = _TimeLimit(run, 0, time.perf_counter() - elapsed, said.append)
    limit.t1 = limit.t0  # as if the first step had taken no time
    return limit, run.pbar, said


def test_the_progress_bar_follows_the_limit_that_stops_the_run():
    limit, pbar, said = _limit(750, 240, elapsed=24.0)  # 10 steps in 24 s: 0.42 steps/s
    pbar.n = 10
    limit.follow(10)
    assert pbar.total == pytest.approx(100, abs=1)  # the ETA is that of max_time_s
    assert "10/100" in str(pbar) or "10/101" in str(pbar)
    assert "will stop the run at about step 100 of max_steps=750" in said[-1]
    assert "not the preset's documented result (max_time_s=null runs every step)" in said[-1]
    limit, pbar, said = _limit(750, 240, elapsed=2.0)  # 5 steps/s: 750 steps in 2.5 min
    limit.follow(10)
    assert pbar.total == 750 and "max_steps=750 ends the run in about 2.5 min" in said[-1]
    limit.last = 0.0  # a second later
    limit.follow(20)
    assert len(said) == 2  # said once
    limit, pbar, said = _limit(750, 240, elapsed=239.99)  # at the limit: the total stays above n
    pbar.n = 99
    limit.follow(99)
    assert pbar.total == 100 and "99/100" in str(pbar)


def test_a_run_references_the_shared_data_cache(text_run):
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "pkmem"
    assert not (text_run / "data").exists()  # no copy in the run
    record = json.loads((text_run / "data.json").read_text())
    assert Path(record["cache"]).parent == cache.resolve() and Path(record["cache"], "train.bin").is_file()
    assert record["source"] == "text" and record["splits"]["train"]["tokens"] > 0
    assert record["fingerprint"].startswith("text-")


def test_a_run_made_before_the_shared_cache_keeps_its_own(tmp_path):
    from pkmem.config import load_config
    from pkmem.train.loop import data_cache_dir, default_cache_dir

    cfg = load_config("tiny")
    assert data_cache_dir(cfg, tmp_path) == default_cache_dir()
    (tmp_path / "data").mkdir()
    assert data_cache_dir(cfg, tmp_path) == tmp_path / "data"
    cfg.train.cache_dir = str(tmp_path / "mine")
    assert data_cache_dir(cfg, tmp_path) == tmp_path / "mine"


def test_run_files_get_the_users_umask(text_run):
    expected = 0o666 & ~_umask()
    files = [p for p in text_run.rglob("*") if p.is_file()]
    assert {"config.json", "eval_valid.json", "data.json", "state.json", "loss.png"} <= {
        p.name for p in files
    }
    wrong = {str(p.relative_to(text_run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != expected}  # fmt: skip
    assert not wrong, f"expected {oct(expected)}"
    dirs = {str(p.relative_to(text_run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in text_run.rglob("*")
            if p.is_dir() and stat.S_IMODE(p.stat().st_mode) != 0o777 & ~_umask()}  # fmt: skip
    assert not dirs  # the checkpoint directory too (mkdtemp makes 0700 ones)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_memory_layers_are_1_based_in_every_record(text_run, capsys):
    records = [json.loads(line) for line in (text_run / "metrics.jsonl").read_text().splitlines()]
    mems = [m for r in records for m in r.get("memories", [])]
    assert mems and all(m["layer"] == 2 and "name" not in m and "module" not in m for m in mems)
    final = json.loads((text_run / "eval_valid.json").read_text())
    assert [set(m) & {"layer", "name", "module"} for m in final["memories"]] == [{"layer"}]
    assert main(["eval", str(text_run), "--json", "--max-tokens", "256", "--no-progress"]) == 0
    (mem,) = json.loads(capsys.readouterr().out)["memories"]
    assert mem["layer"] == 2 and "name" not in mem


def test_a_memory_outside_numbered_layers_is_named_by_its_module():
    import torch

    from pkmem import ProductKeyMemory

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.mem = ProductKeyMemory(8, heads=1, num_keys=4, topk=2, k_dim=4)
            self.head = torch.nn.Linear(8, 16)

        def forward(self, idx):
            return self.head(self.mem(self.emb(idx)))

    from pkmem import UsageTracker
    from pkmem.train.evaluate import memory_report

    model = Model().eval()
    tracker = UsageTracker(model)
    tracker.start()
    with torch.no_grad():
        model(torch.randint(0, 16, (4, 8)))
    tracker.stop()
    (mem,) = memory_report(tracker, {})  # no layer numbers known
    assert mem["layer"] is None and mem["module"] == "mem" and 0 < mem["usage"] <= 1
    (mem,) = memory_report(tracker, {"mem": 1})
    assert mem["layer"] == 1 and "module" not in mem


def test_tensorboard_true_without_tensorboard_warns(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    argv = ["train", "--out", str(tmp_path / "tb"), "--no-progress", *FAST, f"cache_dir={cache_dir}"]
    assert main([*argv, "max_steps=2", "tensorboard=true"]) == 0
    err = capsys.readouterr().err
    assert "pkmem train: warning: tensorboard=true but TensorBoard cannot be used" in err
    assert "pip install tensorboard" in err
    argv = ["train", "--out", str(tmp_path / "tb2"), "--no-progress", *FAST[:-1], f"cache_dir={cache_dir}"]
    assert main([*argv, "max_steps=2"]) == 0
    assert "warning" not in capsys.readouterr().err  # null (the default): TensorBoard if installed, quietly


def test_threads_are_chosen_recorded_and_kept_on_resume(tmp_path, cache_dir, capsys, monkeypatch):
    from pkmem.train import evaluate as ev

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr("torch.get_num_threads", lambda: 4)
    monkeypatch.setattr(ev, "_others_running", lambda: 0.0)
    assert ev.choose_threads() == (4, "4 cores, idle")
    monkeypatch.setattr(ev, "_others_running", lambda: 2.6)  # a busy machine: the free cores
    assert ev.choose_threads() == (1, "4 cores, 2.6 busy with other programs")
    monkeypatch.setattr(ev, "_others_running", lambda: 9.0)
    assert ev.choose_threads()[0] == 1
    assert ev.choose_threads(3) == (3, "asked for")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ev.choose_threads() == (2, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="threads=0 is not allowed"):
        ev.choose_threads(0)
    monkeypatch.undo()
    import torch

    before = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        argv = ["train", "--out", str(out), "--no-progress", *FAST, f"cache_dir={cache_dir}", "max_steps=2"]
        assert main([*argv, "--threads", "1"]) == 0
        assert json.loads((out / "config.json").read_text())["train"]["threads"] == 1
        assert "cpu threads: 1 (threads;" in capsys.readouterr().out
        torch.set_num_threads(before)
        assert main(["train", "--out", str(out), "--resume", "--no-progress", "--max-steps", "3"]) == 0
        assert "cpu threads: 1 (the run's own" in capsys.readouterr().out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
