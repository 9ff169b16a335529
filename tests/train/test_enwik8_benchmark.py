"""benchmarks/enwik8_small.py end to end on the CPU, on a small enwik8-like file."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "enwik8_small.py"
SMALL = [
    "dim=32",
    "n_heads=2",
    "n_layers=2",
    "seq_len=32",
    "mem_layers=[2]",
    "batch_size=2",
    "memory.num_keys=8",
]
SMALL += ["memory.k_dim=16", "memory.topk=4", "final_eval_tokens=512", "eval_tokens=256", "log_every=1"]


def _load():
    spec = importlib.util.spec_from_file_location("enwik8_small", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_enwik8_small_script(tmp_path, capsys):
    data = tmp_path / "enwik8"
    data.write_bytes(bytes((i * 31 + i // 7) % 90 + 32 for i in range(60_000)))
    out = tmp_path / "out"
    argv = ["--data-path", str(data), "--out", str(out), "--device", "cpu", "--steps", "3"]
    assert _load().main([*argv, "--work-dir", str(tmp_path / "work"), *SMALL]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 3 and set(res["variants"]) == {"memory", "baseline"}
    mem, base = res["variants"]["memory"], res["variants"]["baseline"]
    assert mem["tokens"] == base["tokens"] == 3 * 2 * 32 == res["tokens"]
    assert mem["memory_layers"] == [2] and base["memory_layers"] == [] and base["memories"] == []
    assert 0 < mem["memories"][0]["usage"] <= 1 and mem["bpb"] > 0 and base["train_tokens_per_s"] > 0
    assert res["versions"]["torch"] and res["device_name"]
    for name in ("loss.png", "memory.png", "speed_ppl.png"):
        assert (out / "plots" / name).is_file()
    assert "| memory |" in (out / "results.md").read_text()
    assert (out / "runs" / "baseline" / "metrics.jsonl").is_file()
    assert not list((out / "runs").rglob("*.safetensors"))  # checkpoints stay in the work dir


def test_product_key_memory_package_in_place_of_ours():
    """The benchmark's make_memory puts product-key-memory 0.3.0's PKM in the model, with the memory
    protocol of pkmem.metrics and pkmem.optim."""
    import pytest
    import torch

    pytest.importorskip("product_key_memory")
    from pkmem.config import load_config
    from pkmem.metrics import UsageTracker
    from pkmem.models import MemoryTransformer
    from pkmem.optim import value_parameters

    cfg = load_config("tiny", [*SMALL[:5], "memory.num_keys=8", "memory.k_dim=16", "memory.topk=4"])
    mod = _load()
    assert mod.make_memory("memory", cfg.model.memory) is None
    with pytest.raises(ValueError, match="layernorm"):
        mod.make_memory("product-key-memory", cfg.model.memory)
    cfg = load_config(
        "tiny",
        [*SMALL[:5], "memory.num_keys=8", "memory.k_dim=16", "memory.topk=4"]
        + mod.VARIANTS["product-key-memory"],
    )
    model = MemoryTransformer(cfg.model, mod.make_memory("product-key-memory", cfg.model.memory))
    ((_, _, pkm),) = model.memories()
    assert type(pkm).__module__.startswith("product_key_memory")
    assert value_parameters(model) == [pkm.values.weight]
    with UsageTracker(model) as tracker:
        model(torch.randint(0, 256, (2, 16)))
    rep = tracker.report()["blocks.1.memory"]
    assert rep["tokens"] == 32 and 0 < rep["usage"] <= 1
