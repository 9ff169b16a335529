"""benchmarks/small_step.py runs on a CPU at tiny sizes and writes its JSON; bad arguments are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "small_step.py")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


def test_small_step_benchmark_smoke(tmp_path):
    out = tmp_path / "small_step.json"
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--tokens", "8,24", "--steps", "2"]
    cmd += ["--warmup", "1", "--out", str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    names = [
        "ffn",
        "memory fp32 adamw",
        "memory fp32 lazy_adam",
        "memory bf16 lazy_adam",
        "memory fp32 sparse_adam",
    ]
    assert [(r["tokens"], r["variant"]) for r in rows] == [(t, v) for t in (8, 24) for v in names]
    for t in (8, 24):
        ffn = next(r for r in rows if r["tokens"] == t and r["variant"] == "ffn")
        for r in (r for r in rows if r["tokens"] == t):
            assert r["device_ms"] > 0 and r["eager_ms"] > 0
            assert r["vs_ffn"] == pytest.approx(r["device_ms"] / ffn["device_ms"])
    # what one step updates (tiny: dim 64, 16**2 slots, 2 heads x topk 4): the FFN's parameters, the
    # memory's with dense AdamW, its other parameters and the value rows read with RowAdam
    ffn_params = 64 * 256 + 256 + 256 * 64 + 64
    by = {(r["tokens"], r["variant"]): r for r in rows}
    assert by[(8, "ffn")]["params_updated"] == ffn_params and by[(8, "ffn")]["value_rows_updated"] is None
    assert by[(8, "ffn")]["update_bytes"] == ffn_params * 28  # fp32: read p, g, m, v; write p, m, v
    dense = by[(8, "memory fp32 adamw")]["params_updated"]
    for t in (8, 24):
        lazy = by[(t, "memory fp32 lazy_adam")]
        assert 0 < lazy["value_rows_updated"] <= min(16 * 16, t * 2 * 4)
        assert lazy["params_updated"] == dense - 16 * 16 * 64 + lazy["value_rows_updated"] * 64
        assert lazy["update_floor_ms_at_4.2TBps"] == pytest.approx(lazy["update_bytes"] / 4.2e12 * 1e3)
        sparse = by[(t, "memory fp32 sparse_adam")]  # the same rows read (same weights and input)
        assert sparse["value_rows_updated"] == lazy["value_rows_updated"]
        assert sparse["params_updated"] == lazy["params_updated"]
        assert sparse["update_bytes"] == lazy["update_bytes"]  # fp32: 28 bytes per element for both
    assert "vs FFN" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "0"], "--tokens='0' is not allowed"),
        (["--tokens", "a,b"], "--tokens='a,b' is not allowed"),
        (["--variants", "memory fp32 adamw"], "'ffn' included"),
        (["--steps", "0"], "--steps=0 is not allowed"),
    ],
)
def test_small_step_benchmark_refuses(args, message):
    res = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--tiny", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and message in res.stderr, res.stderr
