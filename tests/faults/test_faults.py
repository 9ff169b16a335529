"""The fault suite (benchmarks/faults.py) in CI: no fault may end in a wrong outcome.

The suite forks its training runs (to kill them at chosen points); it runs in a fresh process of its
own, because a fork of the test process, whose torch has started its thread pools in earlier tests,
can hang in the child."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def test_the_fault_suite_finds_nothing_wrong(tmp_path):
    out = tmp_path / "faults.json"
    cmd = [sys.executable, str(BENCH), "--out", str(out), "--kills", "12", "--huge-mb", "24"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    wrong = [
        f"{name}: {c['case']}: {c.get('note', '')}"
        for name, cat in result["categories"].items()
        for c in cat["cases"]
        if c["outcome"] == "wrong"
    ]
    assert not wrong, "\n".join(wrong)
    assert res.returncode == 0, res.stderr[-3000:]
    cats = result["categories"]
    assert cats["kill"]["correct"] == cats["kill"]["tried"] >= 12 and cats["kill"]["killed"] >= 10
    assert cats["checkpoint"]["clear_error"] == cats["checkpoint"]["tried"] >= 80
    assert cats["config"]["tried"] >= 400 and cats["config"]["correct"] >= 60
    assert cats["data"]["clear_error"] >= 15 and cats["data"]["correct"] >= 2
    assert cats["nonfinite"]["tried"] >= 7
