"""benchmarks/train_step.py runs on a CPU at tiny sizes and writes its JSON."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    variants = "adamw fp32,exact_adam bf16"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny"]
    cmd += ["--presets", "enwik8-small", "--variants", variants, "--warmup", "1", "--steps", "2"]
    cmd += ["--update-repeats", "1"]
    cmd += ["--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == variants.split(",")
    for r in rows.values():
        assert "error" not in r, r
        assert r["wall_ms"] > 0 and r["tokens_per_s"] > 0
        # the steps timed in blocks (here 2 steps: 2 blocks); wall is their median, not one mean
        # over all steps, which one compile in the timed window doubled once (an eager lazy_adam row, see docs/kernels.md)
        assert len(r["wall_ms_blocks"]) == 2 and r["wall_ms"] == statistics.median(r["wall_ms_blocks"])
        assert set(r["device_ms"]) >= {"forward", "metrics", "backward", "clip", "optimizer", "step"}
        assert r["device_ms"]["metrics"] > 0  # the usage tracking, timed apart from the forward
        vu = r["value_update"]
        assert vu["rows"] > 0 and vu["bytes"] > 0 and vu["measured_over_floor"] > 0, vu
    assert "wall ms" in res.stdout  # the table


def test_train_step_benchmark_compiled_rows(tmp_path):
    """--compile both: each variant eager and under torch.compile (the eager backend here: inductor
    compiles C++ on a CPU for minutes), rows marked and compared with the baseline of their kind."""
    out = tmp_path / "train_step.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny"]
    cmd += ["--presets", "enwik8-small", "--variants", "no memory,adamw fp32", "--warmup", "2"]
    cmd += ["--steps", "2", "--update-repeats", "1", "--compile", "both", "--compile-backend", "eager"]
    cmd += ["--host-profile", "1"]
    cmd += ["--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["compiled"]) for r in rows] == [
        ("no memory", False), ("no memory", True), ("adamw fp32", False), ("adamw fp32", True)
    ]  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0
        hp = r["host_profile"]  # the operators that take the host's time
        assert hp["aten_ops_per_step"] > 0 and hp["top_self_host_ms_per_step"][0]["ms"] > 0, hp
    assert "adamw fp32 (compiled)" in res.stdout


def test_train_step_benchmark_rejects_compile_with_quality():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quality", "5", "--compile", "on"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--quality=5" in res.stderr and "--compile=on" in res.stderr
