"""A checkpoint verifies all of itself: manifest, fields, file names, finiteness; resume checks
the optimizer state against the run's config before it writes anything."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quick_train

from pkmem.cli import main
from pkmem.train import checkpoint as ck
from pkmem.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, write_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    quick_train(run, corpus, cache_dir)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


def _digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _edit_state(ckpt: Path, change) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    change(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt)  # sealed: the damage reaches the field checks


def test_every_file_is_covered(run):
    (ckpt,) = list_checkpoints(run)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                            "state.json", "tokenizer.json"])  # fmt: skip
    for name in names:
        path = ckpt / name
        raw = path.read_bytes()
        for damaged in (raw[: len(raw) // 2], raw[:-1] + bytes([raw[-1] ^ 0x01])):
            path.write_bytes(damaged)
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(run)
            assert str(path) in str(e.value)
        path.unlink()
        with pytest.raises(CheckpointError, match="missing|does not list") as e:
            load_checkpoint(run)
        assert name in str(e.value)
        path.write_bytes(raw)
    load_checkpoint(run)  # intact again


def test_state_bit_flip_is_caught(run):
    """The issue's case: a flipped bit turned step 20 into 28 and was accepted."""
    (ckpt,) = list_checkpoints(run)
    raw = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(raw.replace('"step": 2,', '"step": 6,', 1))
    with pytest.raises(CheckpointError, match=r"state.json.*sha256|state.json.*bytes"):
        load_checkpoint(run)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda s: s.update(step=3), "'step'=3"),
        (lambda s: s.update(step=-1), "'step'=-1"),
        (lambda s: s.update(step="2"), "'step'='2'"),
        (lambda s: s.update(tokens=-5), "'tokens'"),
        (lambda s: s.update(config=[1]), "'config'"),
        (lambda s: s["rng"].update(torch="AAAA"), "rng.torch"),
        (lambda s: s["rng"].update(torch="not base64!"), "rng.torch"),
        (lambda s: s.update(rng={"mersenne": 1}), "'rng'"),
        (lambda s: s["data_position"].update(step=7), "data_position.step"),
        (lambda s: s.update(format=9), "format 9"),
        (lambda s: s.update(torch_version=2), "'torch_version'"),
    ],
)
def test_state_fields_are_validated(run, change, field):
    (ckpt,) = list_checkpoints(run)
    _edit_state(ckpt, change)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run)
    assert str(ckpt / "state.json") in str(e.value) and field in str(e.value)


def test_optimizer_structure_is_validated(run):
    (ckpt,) = list_checkpoints(run)
    path = ckpt / "optimizer.json"
    text = path.read_text()
    for bad, what in [
        (text.replace('"__tensor__": "t0"', '"__tensor__": "t999"', 1), "t999"),
        (text.replace('"__tensor__": "t0"', '"__tensor__": 0', 1), "refers to the tensor 0"),
        (text.replace('{"__dict__": [', '{"__dict__": 3, "x": [', 1), "keys"),
    ]:
        assert bad != text
        path.write_text(bad)
        write_manifest(ckpt)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(run)
        assert str(path) in str(e.value) and what in str(e.value)


def test_names_outside_the_checkpoint_are_refused(run, tmp_path, monkeypatch):
    (ckpt,) = list_checkpoints(run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    opened = []
    real_open = ck._open
    monkeypatch.setattr(ck, "_open", lambda p: opened.append(str(p)) or real_open(p))
    for name in ("../../../../etc/passwd", "/etc/passwd", "..", "sub/model.safetensors"):
        files = dict(manifest["files"], **{name: {"bytes": 1, "sha256": "0" * 64}})
        forged = {"format": 2, "files": files, "sha256": ck._manifest_digest(files)}
        (ckpt / "manifest.json").write_text(json.dumps(forged))
        opened.clear()
        with pytest.raises(CheckpointError, match="plain names inside its directory") as e:
            load_checkpoint(run)
        assert repr(name) in str(e.value)
        assert not [p for p in opened if "passwd" in p]  # not even hashed
    # a symbolic link to a file outside, with the right content and checksum, is refused too
    write_manifest(ckpt)
    outside = tmp_path / "outside.json"
    shutil.copy(ckpt / "tokenizer.json", outside)
    (ckpt / "tokenizer.json").unlink()
    os.symlink(outside, ckpt / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json.* is a symbolic link"):
        load_checkpoint(run)


def _old_format(ckpt: Path, files: dict | None = None) -> None:
    """Turn a checkpoint into one of format 1, as pkmem wrote them before the manifest."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    if files is None:
        names = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "tokenizer.json")
        files = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": ck._sha256(ckpt / n)} for n in names}
    state.update(format=1, files=files)
    (ckpt / "state.json").write_text(json.dumps(state, indent=1))


def test_old_format_checkpoints_still_load_with_their_checks(run, capsys):
    (ckpt,) = list_checkpoints(run)
    _old_format(ckpt)
    loaded = load_checkpoint(run)
    assert loaded["state"]["step"] == 2 and loaded["optimizer"] is not None
    assert main(["eval", str(run), "--max-tokens", "64", "--json"]) == 0
    capsys.readouterr()
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*sha256"):
        load_checkpoint(run)
    (ckpt / "model.safetensors").write_bytes(raw)
    # the file names an old state.json lists are confined too
    _edit_old = json.loads((ckpt / "state.json").read_text())
    _edit_old["files"]["../../../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / "state.json").write_text(json.dumps(_edit_old))
    with pytest.raises(CheckpointError, match="plain names"):
        load_checkpoint(run)


def test_a_new_checkpoint_without_its_manifest_is_refused(run):
    (ckpt,) = list_checkpoints(run)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json' is missing"):
        load_checkpoint(run)


def test_non_finite_weights_are_never_written(run):
    from pkmem.train.loop import load_run

    model, cfg, tok, loaded = load_run(run)
    before = _digest(run)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        ck.save_checkpoint(run, 3, model, None, {"config": cfg.to_dict()}, tok.to_json())
    assert _digest(run) == before and not list((run / "checkpoints").glob(".*"))


def test_eval_refuses_non_finite_weights_and_exits_non_zero_on_a_non_finite_loss(run, capsys):
    from safetensors.torch import load_file, save_file

    (ckpt,) = list_checkpoints(run)
    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k in tensors if k.endswith("values"))
    poisoned = dict(tensors, **{name: torch.full_like(tensors[name], float("nan"))})
    save_file(poisoned, ckpt / "model.safetensors", metadata={"format": "pt"})
    write_manifest(ckpt)  # checksums made to match, as in the issue
    assert main(["eval", str(run), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "non-finite weights" in err and name in err and len(err.strip().splitlines()) == 1
    # finite weights whose output overflows: the loss is NaN and the exit code says so
    head = next(k for k in tensors if k.startswith("head"))
    save_file(dict(tensors, **{head: torch.full_like(tensors[head], 3e38)}), ckpt / "model.safetensors")
    write_manifest(ckpt)
    assert main(["eval", str(run), "--max-tokens", "64"]) == 1
    assert "the loss is nan" in capsys.readouterr().err


def test_resume_with_another_configurations_optimizer_writes_nothing(
    run, tmp_path, corpus, cache_dir, capsys
):
    other = tmp_path / "other"
    quick_train(other, corpus, cache_dir, "mem_layers=[1,2]")
    (ckpt,) = list_checkpoints(run)
    (other_ckpt,) = list_checkpoints(other)
    for name in ("optimizer.json", "optimizer.safetensors"):
        shutil.copy(other_ckpt / name, ckpt / name)
    write_manifest(ckpt)  # a consistent checkpoint whose optimizer state belongs to another model
    before = _digest(run)
    args = ["train", "--out", str(run), "--resume", "--max-steps", "4", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert str(ckpt / "optimizer.json") in err and "does not match the run's optimizer" in err
    assert len(err.splitlines()) == 1
    assert _digest(run) == before  # config.json, tokenizer.json, metrics.jsonl untouched


def test_a_run_killed_after_its_last_checkpoint_gets_its_final_evaluation(run, capsys):
    """Killed between the final checkpoint and eval_valid.json: --resume writes them, once."""

    def finals():
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["type"] == "eval" and "stopped_early" in r]

    want = json.loads((run / "eval_valid.json").read_text())["loss"]
    (run / "eval_valid.json").unlink()  # killed before it was written (the final record was)
    args = ["train", "--out", str(run), "--resume", "--no-progress"]
    assert main(args) == 0
    assert json.loads((run / "eval_valid.json").read_text())["loss"] == want and len(finals()) == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(x for x in lines if "stopped_early" not in x) + "\n")
    (run / "eval_valid.json").unlink()  # killed before both
    assert main(args) == 0
    assert (run / "eval_valid.json").is_file() and len(finals()) == 1
    assert main(args) == 0 and len(finals()) == 1  # a finished run only reports
