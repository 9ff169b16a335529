"""benchmarks/train_step.py runs on a CPU at tiny sizes and writes its JSON."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

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
        # over all steps, which one compile in the timed window doubled once (an eager lazy_adam row,
        # see docs/kernels.md)
        assert len(r["wall_ms_blocks"]) == 2 and r["wall_ms"] == statistics.median(r["wall_ms_blocks"])
        assert set(r["device_ms"]) >= {"forward", "metrics", "backward", "clip", "optimizer", "step"}
        assert r["device_ms"]["metrics"] > 0  # the usage tracking, timed apart from the forward
        vu = r["value_update"]
        assert vu["rows"] > 0 and vu["bytes"] > 0 and vu["measured_over_floor"] > 0, vu
        # the table's floor: each row read once, the gradient of the rows the update counts (all rows
        # under dense AdamW), the update's own bytes; without reuse every selection (tiny: batch 2 x 2
        # accumulated x 32 tokens, 2 heads x topk 4, v_dim 64)
        tf, es = r["table_floor"], 4 if "fp32" in r["variant"] else 2
        assert 0 < vu["rows_read"] <= vu["rows"] <= vu["num_slots"] == 16 * 16, vu
        assert vu["rows"] == (vu["num_slots"] if r["variant"] == "adamw fp32" else vu["rows_read"]), vu
        assert tf["read_bytes"] == vu["rows_read"] * 64 * es, tf
        assert tf["read_all_selected_bytes"] == 2 * 2 * 32 * 2 * 4 * 64 * es, tf
        assert tf["gradient_bytes"] == vu["rows"] * 64 * es and tf["update_bytes"] == vu["bytes"], tf
        total = tf["read_bytes"] + tf["gradient_bytes"] + tf["update_bytes"]
        assert tf["floor_ms_at_4.2TBps"] == pytest.approx(total / 4.2e12 * 1e3)
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


def test_train_step_benchmark_rejects_cuda_graphs_with_gradient_accumulation():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--compile", "on"]
    cmd += ["--compile-mode", "reduce-overhead"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--compile-mode reduce-overhead is not allowed" in res.stderr
    assert "grad_accum=2" in res.stderr


def test_train_step_benchmark_rejects_compile_with_quality():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quality", "5", "--compile", "on"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--quality=5" in res.stderr and "--compile=on" in res.stderr


def test_train_step_benchmark_rounds(tmp_path):
    """--rounds 2: every variant measured twice, the order rotated in the second round; the summary's
    ratio is the median of the per-round ratios, each against the same round's baseline."""
    out = tmp_path / "train_step.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny"]
    cmd += ["--presets", "enwik8-small", "--variants", "no memory,lazy_adam fp32", "--warmup", "1"]
    cmd += ["--steps", "2", "--update-repeats", "1", "--rounds", "2", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    order = [(r["round"], r["variant"]) for r in data["results"]]
    assert order == [(0, "no memory"), (0, "lazy_adam fp32"), (1, "lazy_adam fp32"), (1, "no memory")]
    rows = {(r["round"], r["variant"]): r for r in data["results"]}
    summary = {s["variant"]: s for s in data["summary"]}
    assert set(summary) == {"no memory", "lazy_adam fp32"}
    s = summary["lazy_adam fp32"]
    ratios = [
        rows[(k, "lazy_adam fp32")]["tokens_per_s"] / rows[(k, "no memory")]["tokens_per_s"] for k in (0, 1)
    ]
    assert s["rounds"] == 2 and s["ratio_vs_no_memory_rounds"] == pytest.approx(ratios)
    assert s["ratio_vs_no_memory_median"] == pytest.approx(statistics.median(ratios))
    assert s["wall_ms_median"] == pytest.approx(statistics.median(s["wall_ms_rounds"]))
    assert summary["no memory"]["ratio_vs_no_memory_median"] == 1.0
    assert "vs none (median)" in res.stdout


def test_train_step_benchmark_rounds_refused(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny"]
    cmd += ["--rounds", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--rounds=0 is not allowed" in res.stderr
