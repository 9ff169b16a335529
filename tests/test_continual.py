"""benchmarks/continual.py end to end at its --tiny size on the CPU: the results' structure, what each
method changes, resuming, and the errors of bad arguments."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("continual_bench", ROOT / "benchmarks" / "continual.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


C = _load()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    argv = ["--tiny", "--device", "cpu", "--out", str(out), "--threads", "1"]
    assert C.main(argv) == 0
    return out, argv, json.loads((out / "results.json").read_text())


def test_results_hold_every_method_the_grid_and_the_metrics(tiny_run):
    out, _, res = tiny_run
    s = res["settings"]
    assert res["finished"] and res["command"].startswith("python benchmarks/continual.py --tiny")
    assert {"python", "torch", "numpy", "git", "transformers", "peft"} <= set(res["versions"])
    assert set(res["runs"]) == set(C.METHODS) == set(res["chosen_lr"])
    for method in C.METHODS:
        grid = res["grid"][method]
        assert [r["lr"] for r in grid] == s["finetune"]["grid"][method]
        assert all(r["facts"] == "new_valid" for r in grid)
        assert res["chosen_lr"][method] == C.choose_lr(grid, s["finetune"]["select_within"])
        run = res["runs"][method]["0"]
        assert run["facts"] == "new_test" and run["lr"] == res["chosen_lr"][method]
        m = run["metrics"]
        assert set(m) == {"new_recall", "new_recall_heldout_phrasing", "old_recall", "heldout_text_bpb"}
        assert all(0 <= m[k] <= 1 for k in m if "recall" in k)
        assert 0 < m["heldout_text_bpb"] < 16
        assert run["train_s"] > 0 and run["trained_params"] > 0
    bg = res["background"]["0"]
    assert (
        bg["documents"] == s["pretrain"]["background_docs"]
        and 0 < bg["slots_read"] <= res["pretrained"]["0"]["slots"]
    )
    before = res["pretrained"]["0"]["metrics"]
    assert {"old_recall", "new_recall", "new_valid_recall", "heldout_text_bpb"} <= set(before)
    assert set(res["summary"]) == {*C.METHODS, "pretrained"}
    diff = res["summary"]["full"]["minus_sparse"]["old_recall"][0]
    assert diff == pytest.approx(
        res["runs"]["full"]["0"]["metrics"]["old_recall"]
        - res["runs"]["sparse"]["0"]["metrics"]["old_recall"]
    )
    assert "minus_sparse" not in res["summary"]["sparse"]
    assert res["compute_s"] > 0
    md = (out / "results.md").read_text()
    assert "sparse memory (SGD)" in md and "Learning-rate grid" in md
    assert (out / "continual.png").is_file()
    assert "*.safetensors" in (out / ".gitignore").read_text()


def test_each_method_changes_what_it_trains(tiny_run):
    _, _, res = tiny_run
    pre = res["pretrained"]["0"]
    runs = {m: res["runs"][m]["0"] for m in C.METHODS}
    # sparse memory finetuning: value rows only, the ones TF-IDF chose, at most top_t per step
    sparse = runs["sparse"]["changed"]
    assert sparse["tensors"] == 1 and sparse["outside_value_tables"] == 0 and sparse["buffers_changed"] == 0
    assert 0 < sparse["value_rows"] and sparse["value_rows_not_chosen"] == 0
    v_dim = pre["value_params"] // pre["slots"]
    assert runs["sparse"]["trained_params"] % v_dim == 0
    assert sparse["value_rows"] <= runs["sparse"]["trained_params"] // v_dim
    top_t, steps = res["settings"]["finetune"]["top_t"], res["settings"]["finetune"]["steps"]
    assert runs["sparse"]["trained_params"] <= top_t * steps * v_dim
    # full finetuning: every tensor, all parameters trained
    full = runs["full"]["changed"]
    assert full["tensors"] == full["of_tensors"] and full["outside_value_tables"] > 0
    assert full["buffers_changed"] == 0  # eval mode: the BatchNorm statistics stay
    assert runs["full"]["trained_params"] == pre["params"]
    # LoRA: merged into the projections, the memory untouched
    lora = runs["lora"]["changed"]
    assert 0 < lora["tensors"] < lora["of_tensors"] and lora["value_rows"] == 0
    assert 0 < runs["lora"]["trained_params"] < pre["params"]


def test_a_second_run_redoes_nothing(tiny_run, capsys):
    out, argv, res = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"}
    stamps[out / "pretrain-s0" / "model.safetensors"] = (
        (out / "pretrain-s0" / "model.safetensors").stat().st_mtime_ns
    )
    capsys.readouterr()
    assert C.main(argv) == 0
    log = capsys.readouterr().out
    assert "pretrained model done already" in log and "pretraining step" not in log
    assert "background counts done already" in log
    assert log.count("done already") == 2 + sum(len(g) for g in res["grid"].values()) + len(C.METHODS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == res["runs"] and again["grid"] == res["grid"]
    assert again["compute_s"] == pytest.approx(res["compute_s"])  # the parts' time, not this call's


def test_changed_settings_redo_only_what_they_change(tiny_run, tmp_path, capsys):
    import shutil

    out, argv, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    capsys.readouterr()
    argv = [a if a != str(out) else str(copy) for a in argv]
    assert C.main([*argv, "--methods", "sparse", "--top-t", "2"]) == 0
    log = capsys.readouterr().out
    assert "pretrained model done already" in log  # the finetuning settings touch neither
    assert "background counts done already" in log
    assert "sparse-lr100: done already" not in log  # but every sparse run is redone
    res = json.loads((copy / "results.json").read_text())
    assert set(res["runs"]) == {"sparse"} and res["settings"]["finetune"]["top_t"] == 2


def test_stop_after_leaves_the_rest_for_the_next_call(tmp_path):
    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--methods", "sparse", "--threads", "1"]
    assert C.main([*argv, "--stop-after", "1e-9"]) == 3
    res = json.loads((tmp_path / "results.json").read_text())
    assert not res["finished"] and res["runs"] == {}


@pytest.mark.parametrize(
    "args, named",
    [
        (["--top-t", "0"], "--top-t"),
        (["--steps", "-1"], "--steps"),
        (["--seeds", "1,1"], "--seeds"),
        (["--methods", "full,adam"], "--methods"),
        (["--lr-sparse", "1,-2"], "--lr-sparse"),
        (["--data-path", "/no/such/enwik8.gz"], "--data-path"),
        (["--tiny", "--cpu-small"], "--cpu-small"),
    ],
)
def test_bad_arguments_are_named(args, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_generated_text_is_seeded_and_not_fact_sentences():
    a, b = C.generated_text(2000, seed=1), C.generated_text(2000, seed=2)
    assert a == C.generated_text(2000, seed=1) and a != b and len(a) == 2000
    assert a.decode().isascii() and " lives in " not in a.decode()


def test_fact_sets_are_disjoint():
    s = C._merge(C.DEFAULT, C.TINY)
    old, valid, test = C.fact_sets(s)
    assert len(old) == s["facts"]["n_old"] and len(valid) == len(test) == s["facts"]["n_new"]
    assert not (set(old.names) & set(valid.names) or set(old.names) & set(test.names))
    assert not set(valid.names) & set(test.names)
