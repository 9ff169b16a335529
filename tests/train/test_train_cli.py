"""End to end through the real command line: train -> eval -> resume, plots, bench, generate."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from pkmem.cli import main
from pkmem.train.checkpoint import list_checkpoints

# the conftest's tiny run, with usage tracked and a larger evaluation
FAST = [*TINY, "eval_tokens=256", "final_eval_tokens=512", "track_usage=true"]


def _train(out: Path, cache_dir: Path, *extra: str, data: tuple = ()) -> int:
    return main(["train", "--out", str(out), "--no-progress", *data, *FAST, f"cache_dir={cache_dir}", *extra])


def _step_losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            for i, v in enumerate(r["losses"]):
                out[r["step"] - len(r["losses"]) + 1 + i] = v
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A tiny run on the default data (the standard library), trained in-process through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert _train(out, cache_dir, "max_steps=6") == 0
    return out


def test_train_leaves_a_complete_run(run, capsys):
    names = {p.name for p in run.iterdir()}
    assert {
        "checkpoints",
        "metrics.jsonl",
        "config.json",
        "tokenizer.json",
        "eval_valid.json",
        "plots",
    } <= names
    (ckpt,) = list_checkpoints(run)
    assert ckpt.name == "step_000000006"
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "tokenizer.json",
        "state.json",
        "manifest.json",
    }
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["train"]["data"] == "stdlib"
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert (run / "plots" / "memory.png").stat().st_size > 1000
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6] and all(len(r["losses"]) == 2 for r in train)
    assert all(0 < m["usage"] <= 1 for r in train for m in r["memories"])
    final = json.loads((run / "eval_valid.json").read_text())
    assert final["bpb"] > 0 and final["unigram_bits_per_token"] > 0 and final["memories"][0]["layer"] == 2


def test_eval_json(run, capsys):
    assert main(["eval", str(run), "--json", "--max-tokens", "256", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"loss", "ppl", "bpb", "tokens_per_s", "memories"} <= set(res)
    assert res["bpb"] == pytest.approx(res["loss"] / 0.6931471805599453)
    assert res["ppl"] == pytest.approx(2.718281828459045 ** res["loss"])
    assert res["tokens"] >= 256 and res["tokens_per_s"] > 0 and res["split"] == "valid"
    (mem,) = res["memories"]
    assert mem["layer"] == 2 and 0 < mem["usage"] <= 1 and mem["kl"] >= 0
    (saved,) = (run / "evals").glob("valid-stdlib-*.json")  # a new file: the training's own result stays
    assert json.loads(saved.read_text())["tokens"] == res["tokens"]
    assert json.loads((run / "eval_valid.json").read_text())["tokens"] != res["tokens"]


def test_eval_table_on_test_split_and_other_data(run, corpus, capsys):
    ckpt = list_checkpoints(run)[-1]
    assert main(["eval", str(ckpt), "--split", "test", "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "memory layer 2 usage" in out and "stdlib / test" in out
    assert main(["eval", str(run), "--data", "text", "--data-path", str(corpus), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"] == "text" and res["bpb"] > 0


def test_resume_repeats_the_uninterrupted_run(tmp_path, cache_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, cache_dir, "max_steps=10", "ckpt_every=4", "dropout=0.1") == 0
    # the first part stops at step 7 of a run planned for 10 (as a crash or max_time_s would)
    assert _train(part, cache_dir, "max_steps=7", "lr_decay_steps=10", "ckpt_every=4", "dropout=0.1") == 0
    args = ["train", "--out", str(part), "--resume", "--max-steps", "10", "--no-progress"]
    assert main(args) == 0
    a, b = _step_losses(full), _step_losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert a == b  # bit for bit on the CPU, dropout included
    assert list_checkpoints(part)[-1].name == "step_000000010"
    fa = json.loads((full / "eval_valid.json").read_text())
    fb = json.loads((part / "eval_valid.json").read_text())
    assert fa["loss"] == fb["loss"] and fa["memories"][0]["usage"] == fb["memories"][0]["usage"]


@pytest.mark.parametrize("value_optimizer", ["lazy_adam", "exact_adam"])
def test_row_optimizers_train_and_resume_exactly(tmp_path, cache_dir, value_optimizer):
    """train.value_optimizer reaches the optimizer; its row state survives a checkpoint exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    opt = f"value_optimizer={value_optimizer}"
    assert _train(full, cache_dir, "max_steps=6", "ckpt_every=3", opt) == 0
    assert _train(part, cache_dir, "max_steps=4", "lr_decay_steps=6", "ckpt_every=3", opt) == 0
    assert main(["train", "--out", str(part), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert _step_losses(full) == _step_losses(part)
    state = json.loads((full / "config.json").read_text())
    assert state["train"]["value_optimizer"] == value_optimizer
    code = main(["train", "--out", str(part), "--resume", "--no-progress", "value_optimizer=adamw"])
    assert code == 2  # the optimizer state is RowAdam's: it cannot change on resume


def test_resume_refuses_changes_and_existing_runs(run, capsys):
    assert main(["train", "--out", str(run), "--no-progress", "max_steps=8"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "dim=64", "--max-steps", "8"]) == 2
    assert "model setting" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--seed", "3", "--max-steps", "8"]) == 2
    assert "seed=3 differs" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "value_betas=[0.5, 0.9]", "--max-steps", "8"]) == 2
    assert "value_betas=(0.5, 0.9) differs from the run's None" in capsys.readouterr().err


def test_truncated_checkpoint_is_a_clear_error_and_loses_nothing(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert _train(out, cache_dir, "max_steps=4") == 0
    ckpt = list_checkpoints(out)[-1]
    model_file = ckpt / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    before = _tree_digest(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(model_file) in err and "truncated" in err and len(err.splitlines()) == 1
    assert main(["eval", str(out)]) == 2
    assert str(model_file) in capsys.readouterr().err
    assert _tree_digest(out) == before  # nothing written, nothing deleted
    # a corrupt state file is named too
    model_file.write_bytes(data)
    (ckpt / "state.json").write_text('{"format": 1, "step": ')
    assert main(["eval", str(out)]) == 2
    assert str(ckpt / "state.json") in capsys.readouterr().err


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, cache_dir, "max_steps=4") == 0
    good = _tree_digest(list_checkpoints(out)[-1])
    from pkmem.train import checkpoint

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 1
    (ckpt,) = checkpoint.list_checkpoints(out)
    assert _tree_digest(ckpt) == good and not list((out / "checkpoints").glob(".*"))


def test_plot_generate_and_bench(run, tmp_path, capsys, cache_dir):
    other = tmp_path / "baseline"
    assert _train(other, cache_dir, "max_steps=4", "mem_layers=[]") == 0
    assert main(["plot", str(run), str(other), "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "memory.png", "speed_ppl.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def f(", "--max-new-tokens", "12", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f(") and len(text.encode()) >= len("def f(") + 1
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--layers",
        "1,2",
        "--dims",
        "32",
        "--memories",
        "0,1",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    argv += ["--batch-size", "2", "--device", "cpu", "--out", str(out), "seq_len=16", "n_heads=2"]
    argv += ["memory.num_keys=8", "memory.topk=4", "memory.k_dim=16", "mem_layers=null"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 4 and res["env"]["torch"]
    assert {(r["layers"], r["memories"]) for r in res["rows"]} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(r["tokens_per_s"] > 0 and "words_per_s" not in r for r in res["rows"])  # bytes: tokens/s


def test_bench_follows_the_preset_labels_units_and_writes_only_where_told(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["seq_len=16", "dim=32", "n_heads=2", "memory.num_keys=8", "memory.topk=4", "memory.k_dim=16"]
    argv = ["bench", "--layers", "4,2", "--repeats", "1", "--warmup", "0", "--batch-size", "2"]
    assert main([*argv, "--device", "cpu", *small]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no bench.json unless --out says so
    header = next(line for line in out.splitlines() if "tokens/s" in line)
    for column in ("layers", "dim", "memories", "memory layers (1-based)", "params (M)", "ms per forward"):
        assert column in header
    rows = [line.split() for line in out.splitlines()[out.splitlines().index(header) + 1 :]]
    # the tiny preset: 4 layers, its memory at layer 3 (not the even spread's 2); 2 layers: spread
    assert [r[:4] for r in rows] == [["4", "32", "0", "-"], ["4", "32", "1", "3"], ["2", "32", "0", "-"],
                                     ["2", "32", "1", "1"]]  # fmt: skip
    assert main([*argv, "--out", "b/speed.json", "--tokens-per-word", "4", *small]) == 0
    res = json.loads((tmp_path / "b" / "speed.json").read_text())
    assert [r["memory_layers"] for r in res["rows"]] == [[], [3], [], [1]]
    assert res["rows"][1]["placement"] == "config" and res["rows"][3]["placement"] == "spread"
    assert all(r["words_per_s"] == pytest.approx(r["tokens_per_s"] / 4) for r in res["rows"])
    assert "words/s" in capsys.readouterr().out


def test_text_data_with_bpe(tmp_path, corpus, capsys):
    out = tmp_path / "bpe"
    argv = ["--data", "text", "--data-path", str(corpus)]
    assert (
        _train(out, tmp_path / "cache", "max_steps=3", "tokenizer=bpe", "bpe_vocab_size=300", data=argv) == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bpb"] is None and res["bits_per_token"] > 0 and res["tokenizer"] == "bpe"
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_real_pkmem_command(run, tmp_path):
    """The installed console script (or python -m pkmem.cli when it is not on PATH)."""
    exe = shutil.which("pkmem")
    cmd = [exe] if exe else [sys.executable, "-m", "pkmem.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    help_out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert help_out.returncode == 0
    for name in ("train", "eval", "bench", "plot", "generate"):
        assert name in help_out.stdout
    res = subprocess.run(
        [*cmd, "eval", str(run), "--json", "--max-tokens", "128", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert {"loss", "ppl", "bpb", "tokens_per_s", "memories"} <= set(json.loads(res.stdout))
    bad = subprocess.run([*cmd, "train", "dimension=3"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'dimension'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_python_dash_m_pkmem_is_the_command():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pkmem"]
    help_out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert help_out.returncode == 0 and help_out.stdout.startswith("usage: pkmem ")
    for name in ("train", "eval", "bench", "plot", "generate"):
        assert name in help_out.stdout
    bad = subprocess.run([*cmd, "train", "dimension=3"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'dimension'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, cache_dir, sig):
    """A real `pkmem train` interrupted with SIGINT (Ctrl-C) or SIGTERM (kill, a job scheduler)
    stops after the step, checkpoints, exits 130."""
    import signal
    import time

    exe = shutil.which("pkmem")
    cmd = [exe] if exe else [sys.executable, "-m", "pkmem.cli"]
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", *FAST, f"cache_dir={cache_dir}", "log_every=1"]
    proc = subprocess.Popen([*cmd, *args, "max_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    (ckpt,) = list_checkpoints(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 2 and "--resume" in stdout.decode()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--no-progress"]) == 0
    assert sorted(_step_losses(out)) == list(range(1, step + 3))


def test_out_must_be_new_or_empty_and_is_never_overwritten(tmp_path, cache_dir, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own"}')
    assert _train(mine, cache_dir, "max_steps=2") == 2
    assert "not empty and holds no run" in capsys.readouterr().err
    assert (mine / "config.json").read_text() == '{"my": "own"}' and len(list(mine.iterdir())) == 1
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    assert _train(afile, cache_dir, "max_steps=2") == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep"
    stopped = tmp_path / "stopped"  # a run killed before its first checkpoint
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("")
    assert _train(stopped, cache_dir, "max_steps=2") == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err


def test_relative_data_path_resumes_from_elsewhere_and_runs_inside_the_corpus_are_skipped(
    tmp_path, corpus, monkeypatch
):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(corpus, work / "texts")
    monkeypatch.chdir(work)
    argv = ["--data", "text", "--data-path", "texts"]
    assert _train(work / "texts" / "run1", tmp_path / "cache", "max_steps=2", data=argv) == 0
    saved = json.loads((work / "texts" / "run1" / "config.json").read_text())["train"]["data_path"]
    assert saved == str(work / "texts")
    # a second run on the same directory: the first run's metrics.jsonl is not training text
    assert _train(tmp_path / "run2", tmp_path / "cache", "max_steps=2", data=argv) == 0
    monkeypatch.chdir(tmp_path)
    run1 = str(work / "texts" / "run1")
    assert main(["train", "--out", run1, "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert main(["train", "--out", run1, "--resume", "--max-steps", "4", "--no-progress", "--data-path",
                 "work/texts"]) == 0  # fmt: skip


def test_finished_run_resumed_only_reports(run, capsys):
    before = (run / "metrics.jsonl").read_text(), (run / "eval_valid.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "evaluating only" in capsys.readouterr().out
    assert ((run / "metrics.jsonl").read_text(), (run / "eval_valid.json").read_text()) == before


def test_resume_with_the_same_named_config_file(tmp_path, cache_dir):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: myexp\nmodel:\n  dim: 32\n  n_heads: 2\n  n_layers: 2\n  seq_len: 32\n")
    out = tmp_path / "named"
    args = ["--no-progress", f"cache_dir={cache_dir}", "mem_layers=[]", "batch_size=4", "eval_tokens=256"]
    args += ["final_eval_tokens=256", "max_time_s=null", "tensorboard=false", "warmup_steps=1"]
    assert main(["train", "--config", str(cfg), "--out", str(out), "--max-steps", "2", *args]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(out), "--resume", "--max-steps", "3"]) == 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "{run}", "--batch-size", "0"], "--batch-size 0 is not allowed"),
        (["eval", "{run}", "--output", "{tmp}"], "is a directory"),
        (["generate", "{run}", "--temperature", "nan"], "--temperature nan is not allowed"),
        (["generate", "{run}", "--prompt", "caf\udce9"], "--prompt"),
        (["bench", "--seq-len", "0"], "--seq-len 0 is not allowed"),
        (["bench", "--warmup", "-1"], "--warmup -1 is not allowed"),
        (["bench", "--memories", ""], "--memories"),
        (["bench", "--out", "{tmp}"], "is a directory"),
        (["train", "--data", "stdlib", "--data-path", "x.txt", "--out", "{tmp}/x"], "data='stdlib'"),
        (["train", "--out", "{tmp}/x", "memory.topk=100", "memory.num_keys=8"], "memory.topk=100 is not"),
    ],
)
def test_cli_input_errors(run, tmp_path, capsys, argv, match):
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_research_switches_reach_the_run(tmp_path, cache_dir):
    from pkmem.train.checkpoint import load_checkpoint

    out = tmp_path / "switches"
    extra = ["max_steps=3", "warmup_steps=1", "norm_position=post", "value_schedule=constant"]
    assert _train(out, cache_dir, *extra, "value_betas=[0.5, 0.9]", "value_lr=0.05") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["norm_position"] == "post" and cfg["train"]["value_betas"] == [0.5, 0.9]
    groups = {g["name"]: g for g in load_checkpoint(out)["optimizer"]["param_groups"]}
    assert groups["values"]["betas"] == (0.5, 0.9) and groups["decay"]["betas"] == (0.9, 0.98)
    assert groups["values"]["lr"] == 0.05 and groups["decay"]["lr"] < 3e-3  # constant vs cosine at the end


def test_compiled_training_follows_the_eager_run(tmp_path, cache_dir, monkeypatch):
    """``compile=true compile_mode=reduce-overhead`` hands the mode to torch.compile and trains as the
    eager run (usage tracked inside the compiled forward); here with the aot_eager backend, as
    inductor would compile C++ for minutes on a CPU (CUDA graphs need a GPU: tests/test_layer_compile.py)."""
    import torch

    modes = []
    compile_ = torch.compile

    def recording(model, mode=None, **kw):
        modes.append(mode)
        return compile_(model, backend="aot_eager")

    assert _train(tmp_path / "eager", cache_dir, "max_steps=4") == 0
    monkeypatch.setattr(torch, "compile", recording)
    torch._dynamo.reset()
    assert (
        _train(
            tmp_path / "compiled", cache_dir, "max_steps=4", "compile=true", "compile_mode=reduce-overhead"
        )
        == 0
    )
    assert modes == ["reduce-overhead"]
    eager, compiled = _step_losses(tmp_path / "eager"), _step_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3, 4}
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_cuda_graph_modes_are_refused_with_ddp():
    from types import SimpleNamespace

    import torch

    from pkmem.train.loop import _compile

    par = SimpleNamespace(distributed=True, world_size=2)
    seen = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    try:
        for mode in ("default", "max-autotune-no-cudagraphs"):  # allowed with DDP
            _compile(torch.nn.Linear(2, 2), mode, par)
    finally:
        monkey.undo()
    assert seen == [None, "max-autotune-no-cudagraphs"]
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(
            ValueError, match=f"compile_mode='{mode}' is not allowed: compile_mode must be 'default'"
        ):
            _compile(torch.nn.Linear(2, 2), mode, par)
