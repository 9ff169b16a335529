"""The fault suite (benchmarks/faults.py) in CI: no fault may end in a wrong outcome."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def _faults():
    spec = importlib.util.spec_from_file_location("pkmem_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fault_suite_finds_nothing_wrong(tmp_path):
    result = _faults().run_suite(tmp_path / "faults.json", n_kills=12, huge_mb=24, log=lambda *a: None)
    wrong = [
        f"{name}: {c['case']}: {c.get('note', '')}"
        for name, cat in result["categories"].items()
        for c in cat["cases"]
        if c["outcome"] == "wrong"
    ]
    assert not wrong, "\n".join(wrong)
    cats = result["categories"]
    assert cats["kill"]["correct"] == cats["kill"]["tried"] >= 12 and cats["kill"]["killed"] >= 10
    assert cats["checkpoint"]["clear_error"] == cats["checkpoint"]["tried"] >= 80
    assert cats["config"]["tried"] >= 400 and cats["config"]["correct"] >= 60
    assert cats["data"]["clear_error"] >= 15 and cats["data"]["correct"] >= 2
    assert cats["nonfinite"]["tried"] >= 7
