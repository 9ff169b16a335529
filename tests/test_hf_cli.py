"""`pkmem finetune` and `pkmem count-slots` on local model directories made here (tiny random Llama and
GPT-2 configs, a word-level tokenizer, saved under generated names; nothing is downloaded)."""

import json
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import pkmem  # noqa: E402
import pkmem.hf as H  # noqa: E402
from pkmem.cli import build_parser, main  # noqa: E402
from pkmem.train.checkpoint import list_checkpoints  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
MEM = ["memory.heads=2", "memory.num_keys=8", "memory.topk=4", "memory.k_dim=16"]  # 64 slots
# on the CPU wherever the tests run: runs are compared bit for bit with each other and the library's
SMALL = ["--batch-size", "4", "--seq-len", "16", "--no-progress", "--eval-tokens", "128", "--device", "cpu"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", eos_token="<eos>"
    )


def _save(model, tokenizer, root):
    """Save under a generated name: the command must find everything in the directory itself."""
    path = root / uuid.uuid4().hex[:12]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _llama_config(tok):
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(_llama_config(tok)), tok, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=64, bos_token_id=1, eos_token_id=1
    )  # dropout 0.1: a resumed run must restore the RNG states
    return _save(transformers.GPT2LMHeadModel(cfg), tok, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """50 small documents: split by a hash of their names, as pkmem train splits them."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for i in range(50):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS[:20]) for _ in range(60)) + "\n")
    return root


def _finetune(model, data, out, *extra) -> int:
    return main(
        ["finetune", "--model", str(model), "--data-path", str(data), "--out", str(out), *SMALL, *extra]
    )


def _records(run, kind="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _step_losses(run) -> dict:
    out = {}
    for r in _records(run):
        for i, v in enumerate(r["losses"]):
            out[r["step"] - len(r["losses"]) + 1 + i] = v
    return out


@pytest.fixture(scope="module")
def trained(llama_dir, corpus, tmp_path_factory):
    """A Llama with a memory added at block 1, trained 4 steps by the command."""
    out = tmp_path_factory.mktemp("runs") / "llama"
    assert (
        _finetune(
            llama_dir, corpus, out, "--memory-layers", "1", "--max-steps", "4", "--log-every", "2", *MEM
        )
        == 0
    )
    return out


# ---- a run ---------------------------------------------------------------------------------------------
def test_finetune_adds_a_memory_trains_and_saves_what_from_pretrained_loads(trained, llama_dir, corpus, tok):
    assert {"metrics.jsonl", "finetune.json", "checkpoints", "model", "eval_valid.json"} <= {
        p.name for p in trained.iterdir()
    }
    recs = _records(trained)
    assert [r["step"] for r in recs] == [2, 4] and all(len(r["losses"]) == 2 for r in recs)
    for r in recs:
        assert {"loss", "lr", "grad_norm", "value_grad_norm", "skipped", "tokens_per_s"} <= set(r)
        (m,) = r["memories"]
        assert m["module"] == "model.layers.1.mlp.memory" and m["block"] == 1 and 0 < m["usage"] <= 1
        assert m["kl"] >= 0
    final = json.loads((trained / "eval_valid.json").read_text())
    assert final["step"] == 4 and math_finite(final["loss"]) and final["memories"][0]["usage"] > 0

    # the same training through the library, in-process: the command's model, bit for bit
    model = transformers.AutoModelForCausalLM.from_pretrained(
        llama_dir, local_files_only=True, dtype=torch.float32
    )
    torch.manual_seed(0)
    H.add_memory(model, [1], "parallel", heads=2, num_keys=8, topk=4, k_dim=16)
    optimizer = pkmem.make_optimizer(model, 1e-4, 1e-3)
    torch.manual_seed(0)
    from pkmem.hf.cli import _load_data

    tokens, _ = _load_data(str(corpus), tok)
    H.finetune(
        model, torch.from_numpy(tokens["train"]), steps=4, batch_size=4, seq_len=16, optimizer=optimizer
    )

    loaded = H.from_pretrained(trained / "model")
    (ckpt,) = list_checkpoints(trained)
    from_ckpt = H.from_pretrained(ckpt)
    x = torch.from_numpy(tokens["valid"][:24].astype(np.int64))[None]
    model.eval()
    with torch.no_grad():
        want = model(x).logits
        assert torch.equal(loaded(x).logits, want) and torch.equal(from_ckpt(x).logits, want)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["layout"] == "hf" and state["step"] == 4 and state["settings"]["memory_layers"] == [1]


def math_finite(v) -> bool:
    return isinstance(v, float) and np.isfinite(v)


def test_finetune_stops_when_on_step_says_so():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    model = H.add_memory(transformers.LlamaForCausalLM(cfg), [0], heads=2, num_keys=8, topk=4, k_dim=16)
    seen = []
    records = H.finetune(
        model,
        torch.arange(100) % 50,
        steps=10,
        batch_size=2,
        seq_len=8,
        log_every=5,
        on_step=lambda step, loss: seen.append((step, loss.dim())) or step == 3,
    )
    assert seen == [(1, 0), (2, 0), (3, 0)]
    assert [r["step"] for r in records] == [3]  # the window closes where training stops


# ---- resume and Ctrl-C --------------------------------------------------------------------------------
def test_resume_repeats_the_uninterrupted_run(gpt2_dir, corpus, tmp_path):
    """GPT-2 (dropout 0.1) with a memory replacing an MLP: 6 steps in one run, or 3 and a resume."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--memory-layers", "-1", "--mode", "replace", "--log-every", "2", "--warmup-steps", "2", *MEM]
    args += ["--eval-every", "3"]
    assert _finetune(gpt2_dir, corpus, full, "--max-steps", "6", "--ckpt-every", "3", *args) == 0
    assert _finetune(gpt2_dir, corpus, part, "--max-steps", "3", *args) == 0
    assert main(["finetune", "--out", str(part), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    a, b = _step_losses(full), _step_losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # bit for bit, dropout included
    fa, fb = (json.loads((r / "eval_valid.json").read_text()) for r in (full, part))
    assert fa["loss"] == fb["loss"] and fa["memories"] == fb["memories"]
    periodic = [
        [(r["step"], r["loss"]) for r in _records(run, "eval") if not r.get("final")] for run in (full, part)
    ]
    assert periodic[0] == periodic[1] and [s for s, _ in periodic[0]] == [3, 6]
    settings = json.loads((part / "finetune.json").read_text())
    assert settings["max_steps"] == 6 and settings["mode"] == "replace" and settings["memory_layers"] == [-1]


def test_ctrl_c_saves_a_checkpoint_and_resume_goes_on(trained, corpus, tmp_path, capsys):
    """SIGINT (Ctrl-C) stops after the step with a checkpoint and exit code 130; --resume continues
    (and says when the data files changed in between)."""
    data = shutil.copytree(corpus, tmp_path / "text")
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    try:
        code = _finetune(trained / "model", data, out, "--max-steps", "100000", "--log-every", "1")
    finally:
        watcher.join()
    assert code == 130
    (ckpt,) = list_checkpoints(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 2 and f"pkmem finetune --out {out} --resume" in capsys.readouterr().out
    os.utime(data / "doc00.txt", (1e9, 1e9))
    assert (
        main(["finetune", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--no-progress"]) == 0
    )
    assert sorted(_step_losses(out)) == list(range(1, step + 3))
    assert "warning: --data-path" in capsys.readouterr().err  # the batches may differ: said


# ---- sparse memory finetuning -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def background(trained, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("counts") / "background.safetensors"
    args = ["count-slots", "--model", str(trained / "model"), "--data-path", str(corpus), "--out", str(path)]
    args += [
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--max-tokens",
        "320",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    return path


def test_count_slots_writes_what_slot_counts_gives(trained, corpus, background, tok):
    counts = H.SlotCounts.load(background)
    assert counts.num_batches == 10  # 320 tokens in windows of 16, 2 per batch
    from pkmem.hf.cli import _read_text
    from pkmem.train.data import eval_windows

    ids = _read_text(str(corpus), "--data-path", tok, ("train",))[0]["train"]
    starts = eval_windows(len(ids), 16, 320)
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(16)].astype(np.int64))
    want = H.slot_counts(H.from_pretrained(trained / "model"), windows.split(2))
    name = "model.layers.1.mlp.memory"
    assert torch.equal(counts.batches_read[name], want.batches_read[name])
    assert torch.equal(counts.reads[name], want.reads[name])


def _rows_changed(a: dict, b: dict) -> dict:
    """``{name: rows that differ}`` of the tensors of two state dicts that differ."""
    assert a.keys() == b.keys()
    out = {}
    for k in a:
        if not torch.equal(a[k], b[k]):
            diff = (
                (a[k] != b[k]).reshape(a[k].shape[0], -1).any(1) if a[k].dim() else torch.ones(1, dtype=bool)
            )
            out[k] = diff.nonzero().flatten().tolist()
    return out


def test_sparse_memory_updates_only_top_t_value_rows_per_step(trained, corpus, background, tmp_path):
    out, top_t = tmp_path / "sparse", 3
    args = ["--sparse-memory", str(top_t), "--background", str(background), "--sparse-lr", "2.0"]
    args += ["--max-steps", "3", "--log-every", "1", "--ckpt-every", "1", "--keep-checkpoints", "5"]
    assert _finetune(trained / "model", corpus, out, *args) == 0
    states = [H.from_pretrained(trained / "model").state_dict()]
    states += [H.from_pretrained(c).state_dict() for c in list_checkpoints(out)]
    assert len(states) == 4
    values = "model.layers.1.mlp.memory.values"
    for before, after, rec in zip(states, states[1:], _records(out)):
        changed = _rows_changed(before, after)
        assert set(changed) == {values}  # nothing else: no other weight, no BatchNorm statistic
        assert 1 <= len(changed[values]) <= top_t == rec["slots"]["model.layers.1.mlp.memory"]
    final = H.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(final[k], states[-1][k]) for k in final)
    assert json.loads((out / "eval_valid.json").read_text())["step"] == 3


def test_sparse_adamw_resumes_exactly_and_new_facts_train_on_all_their_text(
    trained, corpus, background, tmp_path
):
    facts = tmp_path / "facts.txt"
    facts.write_text("w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w30 w31 w32 w33 w34 w35 w36\n")
    args = ["--sparse-memory", "4", "--background", str(background), "--sparse-lr", "0.1"]
    args += ["--sparse-optimizer", "adamw", "--valid-path", str(corpus), "--log-every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _finetune(trained / "model", facts, full, "--max-steps", "4", *args) == 0
    assert _finetune(trained / "model", facts, part, "--max-steps", "2", *args) == 0
    assert main(["finetune", "--out", str(part), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert _step_losses(full) == _step_losses(part) and len(_step_losses(full)) == 4
    a, b = (H.from_pretrained(r / "model").state_dict() for r in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((list_checkpoints(full)[-1] / "state.json").read_text())
    assert state["data"]["train_tokens"] == 18  # the whole fact (17 words and the EOS token), not a split


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_shape_dir(tmp_path_factory, tok):
    """A Llama whose memory has 16 x 16 slots (the background above counts 8 x 8)."""
    torch.manual_seed(1)
    cfg = _llama_config(tok)
    model = H.add_memory(
        transformers.LlamaForCausalLM(cfg), [1], "parallel", heads=2, num_keys=16, topk=4, k_dim=16
    )
    return _save(model, tok, tmp_path_factory.mktemp("models"))


def test_bad_input_is_a_clear_error_naming_the_flag(
    llama_dir, trained, other_shape_dir, corpus, background, tmp_path, capsys
):
    bg = ["--background", str(background)]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model": {"dim": 8}}')
    cases = [
        (
            [tmp_path / "nowhere", corpus, "--memory-layers", "1"],
            "--model '.*nowhere' is not allowed: .*not a directory",
        ),
        ([corpus, corpus, "--memory-layers", "1"], "has no config.json"),
        (
            [foreign, corpus, "--memory-layers", "1"],
            "--model '.*foreign' is not allowed: its config.json is not",
        ),
        ([llama_dir, corpus], "has no pkmem memories: give --memory-layers"),
        ([llama_dir, corpus, "--memory-layers", "2"], r"--memory-layers '2' is not allowed: .* in \[-2, 2\)"),
        ([llama_dir, corpus, "--memory-layers", "1", "memory.nope=3"], "'memory.nope=3' is not allowed"),
        (
            [llama_dir, corpus, "--memory-layers", "1", "memory.num_keys=8", "memory.topk=99"],
            "topk=99 is not allowed",
        ),
        ([llama_dir, corpus, "memory.topk=2"], "memory options .* need --memory-layers"),
        (
            [llama_dir, corpus, "--memory-layers", "1", "lr=3"],
            "'lr=3' is not allowed: pkmem finetune takes memory.KEY=VALUE arguments, KEY one of .*query_norm",
        ),
        (
            [llama_dir, corpus, "--memory-layers", "1", "--seq-len", "100000"],
            "--seq-len 100000 is not allowed",
        ),
        (
            [llama_dir, tmp_path / "none.txt", "--memory-layers", "1"],
            "--data-path '.*none.txt'.* does not exist",
        ),
        ([trained / "model", corpus, *bg], "--background .* without --sparse-memory"),
        (
            [trained / "model", corpus, "--sparse-memory", "4", "--sparse-lr", "1"],
            "--sparse-memory needs --background",
        ),
        ([trained / "model", corpus, "--sparse-memory", "4", *bg], "--sparse-memory needs --sparse-lr"),
        (
            [trained / "model", corpus, "--sparse-memory", "0", *bg, "--sparse-lr", "1"],
            "--sparse-memory 0 is not",
        ),
        (
            [trained / "model", corpus, "--sparse-memory", "4", *bg, "--sparse-lr", "1", "--lr", "0.1"],
            "--lr 0.1 is not allowed with --sparse-memory",
        ),
        (
            [
                trained / "model",
                corpus,
                "--sparse-memory",
                "4",
                "--background",
                str(corpus),
                "--sparse-lr",
                "1",
            ],
            "--background .* must be a file written by pkmem count-slots",
        ),
        (
            [other_shape_dir, corpus, "--sparse-memory", "4", *bg, "--sparse-lr", "1"],
            "--background .* does not fit the model: .*256 slots",
        ),
        ([llama_dir, corpus, "--memory-layers", "1", "--max-steps", "0"], "--max-steps 0 is not allowed"),
    ]
    for i, (argv, pattern) in enumerate(cases):
        out = tmp_path / f"run{i}"
        model, data, *extra = argv
        steps = [] if "--max-steps" in extra else ["--max-steps", "1"]
        code = _finetune(model, data, out, *extra, *steps)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert re.search(pattern, err), (pattern, err)
        assert err.startswith("pkmem finetune: error:") or "usage:" in err
        assert not out.exists()  # nothing is left behind


def test_resume_and_out_errors(trained, corpus, tmp_path, capsys):
    assert _finetune(trained / "model", corpus, trained, "--max-steps", "1") == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["finetune", "--out", str(trained), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    assert "--resume: --lr 0.5 differs from the run's 0.0001" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--no-progress"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    args = [
        "count-slots",
        "--model",
        str(trained.parent),
        "--data-path",
        str(corpus),
        "--out",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2 and "has no config.json" in capsys.readouterr().err
    # pkmem eval reads pkmem train's runs: a finetune run is named for what it is
    assert main(["eval", str(trained), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "is a Hugging Face model's (pkmem finetune)" in err and "pkmem.hf.from_pretrained" in err


def test_help_names_every_option():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    text = sub["finetune"].format_help() + sub["count-slots"].format_help()
    for flag in (
        "--memory-layers",
        "--sparse-memory",
        "--background",
        "--valid-path",
        "--resume",
        "memory.KEY",
    ):
        assert flag in text
