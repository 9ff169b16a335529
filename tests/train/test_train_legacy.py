"""Run directories written before the memory section (flat mem_* keys) still evaluate and resume."""

import json
from pathlib import Path

import pytest
import torch

from pkmem.cli import main
from pkmem.config import MemoryTransformerConfig
from pkmem.models import MemoryTransformer
from pkmem.optim import make_optimizer
from pkmem.train.checkpoint import list_checkpoints, rng_state, save_checkpoint, write_manifest
from pkmem.train.loop import load_run
from pkmem.train.tokenizer import ByteTokenizer

# Config.to_dict() of pkmem 0.1.0 before the memory section, as its runs stored it in state.json
OLD_CONFIG = Path(__file__).parent / "data" / "config-0.1.0.json"


@pytest.fixture
def old_run(tmp_path, cache_dir) -> Path:
    """A run directory as the old code left it: config.json and a checkpoint with the old config."""
    old = json.loads(OLD_CONFIG.read_text())
    old["train"].update(cache_dir=str(cache_dir), final_eval_tokens=256)
    assert "memory" not in old["model"] and old["model"]["mem_impl"] == "pkmem"
    torch.manual_seed(0)
    memory = dict(heads=2, num_keys=8, topk=4, k_dim=16)  # the same model, written in the new shape
    model = MemoryTransformer(
        MemoryTransformerConfig(seq_len=32, dim=32, n_layers=2, n_heads=2, mem_layers=(2,), memory=memory)
    )
    run = tmp_path / "old-run"
    state = {"config": old, "rng": rng_state(), "tokens": 256, "pkmem_version": "0.1.0"}
    opt = make_optimizer(model, 3e-3, value_lr=0.1)
    save_checkpoint(run, 2, model, opt, state, ByteTokenizer().to_json())
    (run / "config.json").write_text(json.dumps(old, indent=1))
    (run / "tokenizer.json").write_text(ByteTokenizer().to_json())
    (run / "metrics.jsonl").write_text(
        json.dumps({"type": "train", "step": 2, "tokens": 256, "loss": 5.0, "losses": [5.0]}) + "\n"
    )
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return run


def test_old_run_loads_and_evaluates(old_run, capsys):
    with pytest.warns(
        FutureWarning, match=r"mem_impl, mem_heads, mem_num_keys, 18 more in .*state.json"
    ) as record:
        model, cfg, _, _ = load_run(old_run)
    assert len(record) == 1  # one notice for the whole load
    assert (
        cfg.model.memory["topk"] == 4 and cfg.model.memory["k_dim"] == 16 and cfg.model.memory["heads"] == 2
    )
    saved = torch.load(old_run.parent / "weights.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    assert main(["eval", str(old_run), "--json", "--max-tokens", "256", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["memories"][0]["layer"] == 2 and res["bpb"] > 0
    notices = [line for line in err.splitlines() if "old config keys" in line]
    assert len(notices) == 1 and notices[0].startswith("pkmem eval: warning: old config keys mem_impl")


def test_old_run_resumes_in_the_new_shape(old_run, capsys, recwarn):
    args = ["train", "--out", str(old_run), "--resume", "--max-steps", "3", "--no-progress"]
    assert main(args) == 0
    assert "pkmem train: warning: old config keys" in capsys.readouterr().err
    written = json.loads((old_run / "config.json").read_text())
    (ckpt,) = list_checkpoints(old_run)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3
    for cfg in (written, state["config"]):
        assert cfg["model"]["memory"]["topk"] == 4 and cfg["model"]["memory"]["k_dim"] == 16
        assert {k for k in cfg["model"] if k.startswith("mem_")} == {
            "mem_layers",
            "mem_mode",
            "mem_share_values",
        }
    recwarn.clear()
    load_run(old_run)  # the new checkpoint gives no notice
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_removed_mem_impl_in_an_old_run_is_a_clear_error(old_run, capsys):
    ckpt = list_checkpoints(old_run)[-1]
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["model"]["mem_impl"] = "product-key-memory"
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt)  # changed on purpose (an unsealed change is refused: tests/train/test_faults.py)
    assert main(["eval", str(old_run), "--max-tokens", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mem_impl='product-key-memory' is not allowed" in err and "make_memory" in err
    assert len(err.splitlines()) == 1
