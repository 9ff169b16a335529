"""benchmarks/distributed.py --only resume on 2 CPU processes (gloo): a run saved on 2 ranks resumes in
one process and the reverse, and the resumed losses follow the uninterrupted runs'."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_resume_part_across_world_sizes(tmp_path):
    out = tmp_path / "distributed.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--device", "cpu", "--nproc", "2"]
    cmd += ["--only", "resume", "--resume-steps", "2", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["resume"]
    assert "error" not in r, r
    assert r["steps"] == 2 and r["world_size"] == 2 and r["mode_on_n_ranks"] == "columns"
    assert len(r["uninterrupted_losses"]["n_ranks"]) == len(r["uninterrupted_losses"]["one"]) == 4
    for key in ("n_to_1", "one_to_n"):
        got = r[key]
        assert len(got["resumed_losses"]) == len(got["uninterrupted_losses"]) == 2
        # on a CPU the resumed steps repeat the uninterrupted run's to float noise
        assert got["max_abs_diff"] < 1e-4, got
    assert r["uninterrupted_1_vs_n_max_abs_diff"] < 1e-3
    assert "resume: saved on 2 ranks, resumed in one process" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume-steps", "-1"], "--resume-steps=-1 is not allowed: it must be an int >= 0"),
        (
            ["--only", "resume", "--resume-steps", "0"],
            "--resume-steps=0 is not allowed: it must be an int >= 1",
        ),
        (["--only", "resume", "--nproc", "1"], "--nproc 1 is not allowed with the resume part"),
        (
            ["--only", "resume", "--resume-data", "no/such/enwik8"],
            "--resume-data='no/such/enwik8' is not allowed",
        ),
    ],
)
def test_resume_arguments_refused(args, message):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and message in res.stderr, res.stderr
