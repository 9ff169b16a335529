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
    "mem_num_keys=8",
]
SMALL += ["mem_k_dim=16", "mem_topk=4", "final_eval_tokens=512", "eval_tokens=256", "log_every=1"]


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
