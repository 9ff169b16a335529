"""benchmarks/repro.py: the tables' bookkeeping (paired differences, verdicts, equal time) on made-up
runs, and one job end to end on the CPU (resumable: a finished run is not trained again)."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "repro.py"


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("repro", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _fake_run(run, valid: float, test: float, curve: list[tuple[int, float]]) -> None:
    run.dir.mkdir(parents=True)
    mem = [{"layer": 5, "usage": 0.9, "kl": 0.7}] if run.variant.overrides != ("mem_layers=[]",) else []
    (run.dir / "eval_valid.json").write_text(
        json.dumps({"bpb": valid, "memories": mem, "stopped_early": False})
    )
    (run.dir / "eval_test.json").write_text(json.dumps({"bpb": test, "memories": mem}))
    cfg = {"train": {"batch_size": 32, "grad_accum": 1}, "model": {"seq_len": 512}}
    (run.dir / "config.json").write_text(json.dumps(cfg))
    lines = [{"type": "train", "step": s, "loss": 1.0} for s, _ in curve]
    lines += [{"type": "eval", "split": "valid", "step": s, "bpb": y, "tokens": 1024} for s, y in curve]
    lines.append(
        {"type": "eval", "split": "valid", "step": curve[-1][0], "bpb": valid, "stopped_early": False}
    )
    (run.dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _args(tmp_path, steps=100, seeds=(0, 1, 2)):
    return SimpleNamespace(
        data_path=str(tmp_path / "enwik8"),
        out=str(tmp_path),
        device="cpu",
        steps=steps,
        seeds=list(seeds),
        tiny=False,
        overrides=[],
        trained_on=None,
        with_runs_from=None,
    )


def test_paired_differences_verdicts_and_equal_time(repro, tmp_path):
    job = repro.JOBS["noise"]
    args = _args(tmp_path)
    runs = repro.plan_runs(job, args)
    assert len(runs) == 6 and len({r.dir for r in runs}) == 6
    # the memory is better by 0.05 +- 0.01 on valid (paired), its curve 0.1 lower at every step
    base_valid = {0: 1.50, 1: 1.52, 2: 1.49}
    gains = {0: 0.04, 1: 0.05, 2: 0.06}
    for r in runs:
        mem = r.variant.name != job.variants[0].name
        v = base_valid[r.seed] - (gains[r.seed] if mem else 0.0)
        curve = [(50, v + 0.2 - (0.1 if mem else 0.0)), (100, v)]
        _fake_run(r, v, v + 0.01, curve)
    step_s = {job.variants[0].name: 0.010, job.variants[1].name: 0.020}  # the memory is twice as slow
    res = repro.summarize(job, runs, args, step_s, noise_sd=None)
    base, mem = res["variants"]
    assert base["verdict_valid"] == "baseline" and res["tokens_per_step"] == 32 * 512
    assert mem["diff_valid"]["mean"] == pytest.approx(-0.05) and mem["diff_valid"]["sd"] == pytest.approx(
        0.01
    )
    assert mem["diff_valid"]["n"] == 3 and mem["verdict_valid"] == "better"  # 0.05 > 2 * 0.01
    assert mem["diff_test"]["mean"] == pytest.approx(-0.05)
    assert mem["usage"] == pytest.approx(0.9) and base["usage"] is None
    # equal time: in the baseline's 100 steps the memory reaches step 50, where its curve reads
    # v + 0.2 - 0.1 - gain: minus the baseline's final v -> 0.1 - gain
    assert mem["equal_time"]["step"] == pytest.approx(50)
    assert mem["equal_time"]["diff"] == pytest.approx(statistics.fmean([0.1 - g for g in gains.values()]))
    # the diff curves pair the same seed at the same step
    assert [y for _, y in mem["diff_curves"][1]] == pytest.approx([-0.15, -0.05])
    text = repro.markdown(res)
    assert "| memory (preset) | 1.4533 ± 0.0208 | -0.0500 ± 0.0100 | better |" in text
    assert "paper" in text and "19.8" in text
    assert repro.plot(res, tmp_path / "diff.png").is_file()


def test_runs_from_an_earlier_json_count_beside_new_seeds(repro, tmp_path):
    """More seeds later: seeds 0-1 from an earlier JSON, seed 2 trained now; the paired differences
    span all three, each earlier row says where it came from, and a mismatched JSON is refused."""
    job = repro.JOBS["noise"]
    gains = {0: 0.04, 1: 0.05, 2: 0.06}

    def made(seeds, out):
        args = _args(out, seeds=seeds)
        runs = repro.plan_runs(job, args)
        for r in runs:
            mem = r.variant.name != job.variants[0].name
            v = 1.5 - (gains[r.seed] if mem else 0.0)
            _fake_run(r, v, v + 0.01, [(50, v + 0.1), (100, v)])
        return args, runs

    args, runs = made((0, 1), tmp_path / "a")
    first = tmp_path / "noise-first.json"
    first.write_text(
        json.dumps(
            repro.summarize(job, runs, args, {}, None) | {"device": "gpu0", "versions": {"git": "abc"}}
        )
    )
    args, runs = made((2,), tmp_path / "b")
    earlier = repro.earlier_rows(str(first), job, 100, [2])
    assert [r["seed"] for r in earlier[job.variants[1].name]] == [0, 1]
    args.with_runs_from = str(first)
    res = repro.summarize(job, runs, args, {}, None, earlier) | {"device": "gpu1", "versions": {"git": "def"}}
    mem = res["variants"][1]
    assert res["seeds"] == [0, 1, 2] and mem["diff_valid"]["n"] == 3
    assert mem["diff_valid"]["mean"] == pytest.approx(-0.05) and mem["diff_valid"]["sd"] == pytest.approx(
        0.01
    )
    assert mem["diff_test"]["n"] == 3 and sorted(mem["diff_curves"]) == [0, 1, 2]
    assert [bool(r.get("earlier")) for r in mem["runs"]] == [True, True, False]
    assert "Seeds [0, 1] were trained earlier" in repro.markdown(res) and "abc" in repro.markdown(res)
    assert (
        repro.earlier_rows(str(first), job, 100, [0, 2])[job.variants[1].name][0]["seed"] == 1
    )  # seed 0 here
    for bad_job, steps in ((repro.JOBS["table2"], 100), (job, 99)):
        with pytest.raises(SystemExit, match="--with-runs-from"):
            repro.earlier_rows(str(first), bad_job, steps, [2])
    with pytest.raises(SystemExit, match="does not exist"):
        repro.earlier_rows(str(tmp_path / "nope.json"), job, 100, [2])


def test_verdict_needs_two_sd_and_uses_the_noise_floor_for_one_seed(repro, tmp_path):
    assert repro._verdict(-0.03, 0.01) == "better" and repro._verdict(0.03, 0.01) == "worse"
    assert repro._verdict(-0.019, 0.01) == "within noise" and repro._verdict(-0.01, None) == "n/a"
    job = repro.JOBS["table4"]
    args = _args(tmp_path, seeds=(0,))
    runs = repro.plan_runs(job, args)
    for i, r in enumerate(runs):
        _fake_run(r, 1.5 - 0.01 * i, 1.5, [(50, 1.6), (100, 1.5 - 0.01 * i)])
    res = repro.summarize(job, runs, args, {}, noise_sd=0.004)
    v = res["variants"]
    assert v[1]["diff_valid"]["sd"] is None and v[1]["diff_valid"]["sd_from"] == "noise job"
    assert v[1]["verdict_valid"] == "better"  # 0.01 > 2 * 0.004
    assert v[1]["equal_time"] is None  # no step times: no equal-time comparison
    assert math.isclose(v[4]["diff_valid"]["mean"], -0.04)


def test_runs_shared_between_jobs_and_variant_selection(repro, tmp_path):
    args = _args(tmp_path, seeds=(0,))
    a = repro.plan_runs(repro.JOBS["noise"], args)
    b = repro.plan_runs(repro.JOBS["table2"], args)
    assert a[0].dir == b[0].dir  # the baseline is the same run in both tables: trained once
    assert a[0].dir != repro.plan_runs(repro.JOBS["noise"], _args(tmp_path, steps=99, seeds=(0,)))[0].dir
    data = tmp_path / "enwik8"
    data.write_bytes(b"x" * 100)
    parsed = repro.parse_args(["table3", "--data-path", str(data), "--variants", "3,2"])
    assert parsed.variant_indices == [0, 2, 3]  # the baseline is always in
    for bad in (["--variants", "99"], ["--seeds", "0,0"], ["--steps", "0"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            repro.parse_args(["noise", "--data-path", str(data), *bad])


def test_a_job_end_to_end_on_the_cpu_and_resumed(repro, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PKMEM_COMMIT", "abc1234")  # the code that trains the runs, recorded per run
    data = tmp_path / "enwik8"
    data.write_bytes(bytes((i * 31 + i // 7) % 90 + 32 for i in range(80_000)))
    out = tmp_path / "out"
    argv = ["noise", "--data-path", str(data), "--out", str(out), "--device", "cpu", "--tiny"]
    argv += [
        "--seeds",
        "0",
        "--steps",
        "2",
        "--jobs",
        "2",
        "--time-steps",
        "2",
        "n_layers=2",
        "mem_layers=[2]",
    ]
    assert repro.main(argv) == 0
    res = json.loads((out / "noise.json").read_text())
    base, mem = res["variants"]
    assert res["steps"] == 2 and base["runs"][0]["status"] == "done" and mem["runs"][0]["status"] == "done"
    assert base["test_bpb"][0] > 0 and mem["valid_bpb"][0] > 0 and 0 < mem["usage"] <= 1
    assert mem["step_s"] > 0 and mem["params"] > base["params"] and mem["value_params"] == 16**2 * 32
    assert [s for s, _ in mem["runs"][0]["curve"]] == [1, 2]  # eval_every = steps // 10 -> every step
    assert (out / "noise.md").is_file() and (out / "noise-diff.png").is_file()
    assert base["runs"][0]["trained_with"] == mem["runs"][0]["trained_with"] == ["abc1234"]
    assert "trained with pkmem abc1234" in (out / "noise.md").read_text()
    stamp = (Path(mem["runs"][0]["dir"]) / "eval_valid.json").stat().st_mtime_ns
    capsys.readouterr()
    assert repro.main([*argv, "--time-steps", "0"]) == 0
    assert "2 done, 0 to train" in capsys.readouterr().out
    res = json.loads((out / "noise.json").read_text())
    assert res["variants"][1]["runs"][0]["trained_with"] == ["abc1234"]  # not trained again: not recorded
    assert (Path(mem["runs"][0]["dir"]) / "eval_valid.json").stat().st_mtime_ns == stamp
    # a run trained before the commits were recorded (no record) is not counted as this commit's
    base_dir = Path(base["runs"][0]["dir"])
    (base_dir.parent / f"{base_dir.name}.trained_with.json").unlink()
    assert repro.main([*argv, "--time-steps", "0"]) == 0
    md = (out / "noise.md").read_text()
    assert "1 of this job's 2 runs were trained with pkmem abc1234; the other 1 before" in md


def test_table1_times_evaluation_forwards_and_plots_speed(repro, tmp_path):
    """Table 1 / Fig. 4: with --time-steps, each variant's evaluation forward is timed alone and
    the table gets a speed column and a bits-per-byte vs speed plot; other jobs do not."""
    data = tmp_path / "enwik8"
    data.write_bytes(bytes((i * 31 + i // 7) % 90 + 32 for i in range(80_000)))
    out = tmp_path / "out"
    argv = ["table1", "--data-path", str(data), "--out", str(out), "--device", "cpu", "--tiny"]
    argv += ["--seeds", "0", "--steps", "2", "--jobs", "2", "--time-steps", "2", "--variants", "1"]
    assert repro.main(argv) == 0
    res = json.loads((out / "table1.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["12 layers", "12 layers + 1 memory"]
    for v in res["variants"]:
        assert v["eval_tokens_per_s"] > 0 and v["step_s"] > 0
    assert "eval tok/s (alone)" in (out / "table1.md").read_text()
    assert (out / "table1-speed.png").is_file()
    assert repro.JOBS["table1"].eval_speed and not repro.JOBS["table2"].eval_speed


def test_no_train_times_and_reports_without_training(repro, tmp_path, capsys):
    """--no-train: nothing is trained; the variants are timed and the unfinished runs reported as
    such (a variant too slow to train within a GPU budget still gets its speed)."""
    data = tmp_path / "enwik8"
    data.write_bytes(bytes((i * 31 + i // 7) % 90 + 32 for i in range(80_000)))
    out = tmp_path / "out"
    argv = ["table4", "--data-path", str(data), "--out", str(out), "--device", "cpu", "--tiny", "--no-train"]
    argv += ["--seeds", "0", "--steps", "2", "--time-steps", "2", "--variants", "1"]
    argv += ["n_layers=2", "mem_layers=[2]"]
    assert repro.main(argv) == 0
    assert "--no-train: 2 unfinished run(s) not trained" in capsys.readouterr().out
    res = json.loads((out / "table4.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["baseline (FFN)", "16k flat keys"]
    for v in res["variants"]:
        assert v["step_s"] > 0 and v["runs"][0]["status"] == "todo" and v["valid_bpb"] == [None, None]
    assert not any((out / "runs").glob("*/metrics.jsonl"))


_CHILD = """
import signal, sys, time
from pathlib import Path
me = Path(sys.argv[1])
def stop(sig, frame):
    time.sleep(1.0)  # a checkpoint being written
    with open(me, "a") as f:
        f.write("saved\\n")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
me.write_text("")
time.sleep(120)
"""

_DRIVER = """
import importlib.util, sys
from pathlib import Path
from types import SimpleNamespace
spec = importlib.util.spec_from_file_location("repro", sys.argv[1])
repro = importlib.util.module_from_spec(spec); sys.modules["repro"] = repro; spec.loader.exec_module(repro)
out = Path(sys.argv[2])
tasks = []
for i in range(3):
    run = repro.Run(SimpleNamespace(name=f"v{i}"), 0, [], out / f"r{i}")
    tasks.append((run, [sys.executable, str(out / "child.py"), str(out / f"r{i}.txt")], out / f"r{i}.log"))
repro.execute(tasks, [None], 2, lambda *a: print(*a, flush=True))
"""


def test_a_signal_stops_the_runs_once_and_waits_for_their_checkpoints(tmp_path):
    """SIGTERM to the job's process group (as ``timeout`` sends it) reaches the runs once, through
    the job (they run in sessions of their own): each stops with its checkpoint, nothing new starts,
    and the job exits (143) only after they have."""
    import os
    import signal
    import subprocess
    import time

    (tmp_path / "child.py").write_text(_CHILD)
    (tmp_path / "driver.py").write_text(_DRIVER)
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(SCRIPT), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not all((tmp_path / f"r{i}.txt").exists() for i in range(2)):
        assert time.time() < deadline and proc.poll() is None, "the runs did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    for i in range(2):  # written before the job exited: it waited; once: one signal passed on
        assert (tmp_path / f"r{i}.txt").read_text() == "saved\n", out
    assert not (tmp_path / "r2.txt").exists()  # nothing new started after the signal
    assert "SIGTERM: stopping the runs" in out and out.count("interrupted v") == 2, out


def test_finished_runs_without_a_checkpoint_are_reported_without_a_test_split(repro, tmp_path, capsys):
    """Runs copied off a GPU machine without their checkpoints are finished: the job reports them
    (no test number) instead of failing on an evaluation that has nothing to load."""
    data = tmp_path / "enwik8"
    data.write_bytes(b"x" * 100)
    out = tmp_path / "out"
    argv = ["noise", "--data-path", str(data), "--out", str(out), "--device", "cpu", "--seeds", "0"]
    argv += ["--steps", "100", "--time-steps", "0"]
    for run in repro.plan_runs(repro.JOBS["noise"], repro.parse_args(argv)):
        _fake_run(run, 1.5, 1.4, [(50, 2.0), (100, 1.5)])
        (run.dir / "eval_test.json").unlink()
    assert repro.main(argv) == 0
    assert "test split: no checkpoint left in 2 run(s), not evaluated" in capsys.readouterr().out
    res = json.loads((out / "noise.json").read_text())
    assert [v["runs"][0]["test_bpb"] for v in res["variants"]] == [None, None]
    assert not list((out / "runs").glob("*.log"))  # no evaluation was started


def test_a_run_of_another_configuration_is_not_counted(repro, tmp_path):
    """Run directories are named by their overrides of the preset: after the preset changes, a run
    of the old one is refused (naming the setting), not counted or resumed as the new one."""
    from pkmem.config import load_config

    args = _args(tmp_path, steps=100, seeds=(0,))
    runs = repro.plan_runs(repro.JOBS["noise"], args)
    for r in runs:
        cfg = load_config(repro.BASE, [*r.overrides, "max_steps=100", "seed=0"]).to_dict()
        cfg["train"]["data_path"] = "/elsewhere/enwik8.gz"  # where the data was is not compared
        cfg["train"]["a_key_of_a_later_pkmem"] = 1  # keys only one side knows are not compared
        r.dir.mkdir(parents=True)
        (r.dir / "config.json").write_text(json.dumps(cfg))
    repro.check_runs_match(runs, 100)  # the same configuration: accepted
    mem = runs[1]
    cfg = json.loads((mem.dir / "config.json").read_text())
    cfg["model"]["memory"]["topk"] = 8
    (mem.dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"memory \(preset\), seed 0\): model\.memory\.topk=8 \(now 32\)"):
        repro.check_runs_match(runs, 100)
    with pytest.raises(SystemExit, match=r"train\.max_steps=100 \(now 200\)"):
        repro.check_runs_match(runs, 200)
    (mem.dir / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="config.json unreadable"):
        repro.check_runs_match(runs, 100)
