"""The paper's findings at small scale: one command per table, on enwik8 bytes, one GPU each.

    python benchmarks/repro.py noise  --data-path enwik8.gz --out runs/repro
    python benchmarks/repro.py table2 --data-path enwik8.gz --out runs/repro   # sizes x query BatchNorm
    python benchmarks/repro.py table3 --data-path enwik8.gz --out runs/repro   # position; heads x k
    python benchmarks/repro.py table4 --data-path enwik8.gz --out runs/repro   # flat vs product keys
    python benchmarks/repro.py table1 --data-path enwik8.gz --out runs/repro   # depth vs memories
    python benchmarks/repro.py recipe --data-path enwik8.gz --out runs/repro   # what makes a memory pay

Every run is ``pkmem train`` on the ``enwik8-small`` preset (the small base: 6 layers, dim 512,
8 heads, 512-byte context, a 512²-slot memory at layer 5 with 4 heads, k = 32, k_dim 512) with the
variant's ``key=value`` overrides and the job's number of steps. A batch is a function of (seed,
step), so every variant of a seed sees the same batches; seeds pair runs across variants.

What a job does, in order:

1. trains every (variant, seed) that has not finished yet (a finished run is never run again; an
   interrupted one resumes from its checkpoint: Ctrl-C or SIGTERM stops every run after its
   current step with a checkpoint, and the job waits for them before it exits), ``--jobs`` runs
   at a time per GPU (small models leave an H200 mostly idle: several side by side train more
   tokens per second in all), each run evaluating a fixed subset of the validation split every
   ``steps / 10`` steps and the whole validation split at the end;
2. evaluates each run on the whole test split (reported once, in the job's table);
3. times one training step of each variant alone on the GPU (``--time-steps``), for the comparison
   at equal training time: the step a variant reaches in the baseline's training time, and its
   validation loss there (interpolated between the periodic evaluations); for Table 1 also the
   evaluation forward alone (eager, no compilation: the speed axis of the paper's Fig. 4);
4. writes ``<out>/<job>.json`` (every run: curves, final validation and test numbers, usage, KL,
   step time, parameters, the commits that trained it; the device, versions and the command),
   ``<out>/<job>.md`` (the table, the paper's numbers beside ours) and ``<out>/<job>-diff.png``
   (each variant's paired difference from the baseline over training); with evaluation speeds,
   ``<out>/<job>-speed.png`` (validation bits per byte against evaluation tokens/s).

Differences are paired: variant minus baseline on the same seed (the same batches). A variant is
called better or worse only when the mean paired difference exceeds two standard deviations of the
paired difference (from this job's seeds when it has two or more, else from the ``noise`` job's
JSON in ``--out``); otherwise "within noise".

On a CPU, for a smoke test: ``--device cpu --tiny`` (a two-layer model, a few steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pkmem._util import atomic_write_bytes

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import git_commit, versions  # noqa: E402

BASE = "enwik8-small"
TINY = [  # the smoke-test model: every job's variants keep their meaning at this size
    "dim=32",
    "n_heads=2",
    "seq_len=32",
    "batch_size=4",
    "memory.num_keys=16",
    "memory.topk=4",
    "memory.k_dim=16",
    "eval_tokens=512",
    "final_eval_tokens=1024",
    "warmup_steps=2",
]


@dataclass(frozen=True)
class Variant:
    """A named set of overrides of the base config, and the paper's numbers for it (if any)."""

    name: str
    overrides: tuple[str, ...] = ()
    paper: dict | None = None  # {"ppl": ..., "usage": ... (fraction), "kl": ...}


BASELINE = Variant("baseline (FFN)", ("mem_layers=[]",), {"ppl": 23.0})


def _size(n: int) -> str:
    slots = n * n
    return f"{slots // 1024}k" if slots < 1024**2 else f"{slots / 1024**2:g}M"


# paper Table 2 (perplexity / usage / KL; 6 layers, memory at layer 5, CC-News), by num_keys and BatchNorm
_T2 = {
    (128, False): (22.8, 1.00, 0.56),
    (128, True): (23.0, 1.00, 0.56),
    (256, False): (21.7, 0.990, 0.69),
    (256, True): (21.9, 1.000, 0.58),
    (384, False): (20.9, 0.838, 0.94),
    (384, True): (20.7, 0.996, 0.65),
    (512, False): (20.5, 0.644, 1.20),
    (512, True): (19.8, 0.979, 0.68),
    (768, False): (20.0, 0.380, 1.70),
    (768, True): (18.7, 0.903, 0.83),
    (1024, False): (19.8, 0.258, 2.06),
    (1024, True): (18.0, 0.803, 0.95),
}
# paper Table 3: memory position in 6 layers
_T3 = {1: (21.5, 1.000, 2.23), 2: (20.7, 1.000, 0.95), 3: (20.4, 0.983, 0.74), 4: (20.1, 0.971, 0.71)}
_T3 |= {5: (19.8, 0.979, 0.68), 6: (20.3, 0.969, 1.08)}
# paper Table 4: flat keys (product keys: Table 2's BatchNorm column)
_T4_FLAT = {128: (23.2, 0.196, 2.04), 256: (22.6, 0.136, 2.48)}
# paper Table 1: test perplexity, dimension 1024, CC-News (layers, memories)
_T1 = {(12, 0): 17.7, (12, 1): 15.6, (12, 2): 14.8, (16, 0): 16.7, (24, 0): 16.0}


def _paper(t: tuple[float, float, float]) -> dict:
    return {"ppl": t[0], "usage": t[1], "kl": t[2]}


def _table2() -> list[Variant]:
    out = [BASELINE]
    for n in (128, 256, 384, 512, 768, 1024):
        for bn in (True, False):
            norm = "batchnorm" if bn else "none"
            out.append(
                Variant(
                    f"{_size(n)} slots, {'BN' if bn else 'no BN'}",
                    (f"memory.num_keys={n}", f"memory.query_norm={norm}"),
                    _paper(_T2[(n, bn)]),
                )
            )
    return out


def _table3() -> list[Variant]:
    out = [BASELINE]
    out += [Variant(f"memory at layer {i}", (f"mem_layers=[{i}]",), _paper(_T3[i])) for i in range(1, 7)]
    out += [
        Variant(f"{h} heads x k={k}", (f"memory.heads={h}", f"memory.topk={k}"), {"ppl": 20.5, "usage": 0.70})
        for h, k in ((1, 64), (2, 32), (4, 16), (8, 8))
    ]
    return out


def _table4() -> list[Variant]:
    out = [BASELINE]
    for n in (128, 256):
        out.append(
            Variant(
                f"{_size(n)} flat keys",
                (f"memory.num_keys={n}", "memory.product_keys=false"),
                _paper(_T4_FLAT[n]),
            )
        )
        out.append(Variant(f"{_size(n)} product keys", (f"memory.num_keys={n}",), _paper(_T2[(n, True)])))
    return out


def _table1() -> list[Variant]:
    def v(layers: int, mems: int) -> Variant:
        name = f"{layers} layers" + (f" + {mems} memor{'y' if mems == 1 else 'ies'}" if mems else "")
        place = ("mem_layers=[]",) if not mems else ("mem_layers=null", f"n_memories={mems}")
        return Variant(name, (f"n_layers={layers}", *place), {"ppl": _T1[(layers, mems)]})

    # the first variant is the table's baseline: 12 layers without memory
    return [v(12, 0), v(12, 1), v(12, 2), v(16, 0), v(24, 0)]


def _recipe() -> list[Variant]:
    # every variant starts from the values of the first enwik8-small preset (lr 3e-3 on the warm-up /
    # cosine schedule: the job's extra overrides) and changes one thing
    return [
        BASELINE,
        Variant("memory, values lr 3e-3 on the schedule"),
        Variant("values: constant lr 1e-3, betas (0.9, 0.98)", ("value_schedule=constant", "value_lr=1e-3")),
        Variant("values: lr 1e-2 on the schedule", ("value_lr=1e-2",)),
        Variant("memory beside the FFN (parallel)", ("mem_mode=parallel",)),
        Variant("Memory+ (swilu gate)", ("memory.gate=swilu",)),
        Variant("relu scores", ("memory.score=relu",)),
        Variant("post-LN blocks", ("norm_position=post",)),
    ]


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    variants: tuple[Variant, ...]
    steps: int  # training steps per run (the same for every variant)
    seeds: tuple[int, ...] = (0,)
    extra: tuple[str, ...] = ()  # overrides for every variant of the job
    test: bool = True  # evaluate the test split (the recipe search chooses on validation only)
    eval_speed: bool = False  # time each variant's evaluation forward alone (Table 1 / Fig. 4)
    paper_setting: str = "paper §4.5: 6 layers, 8 heads, dim 1024 (not given), memory at layer 5, CC-News BPE"


JOBS: dict[str, Job] = {
    j.name: j
    for j in (
        Job(
            "noise",
            "Noise floor: the baseline and the default memory over several seeds",
            (BASELINE, Variant("memory (preset)", (), _paper(_T2[(512, True)]))),
            steps=2500,
            seeds=(0, 1, 2),
        ),
        Job("table2", "Table 2 / Fig. 5: memory size x query BatchNorm", tuple(_table2()), steps=2000),
        Job(
            "table3", "Table 3 / Fig. 6: memory position; heads x k at h*k = 64", tuple(_table3()), steps=2000
        ),
        Job("table4", "Table 4: flat keys vs product keys", tuple(_table4()), steps=2000),
        Job(
            "table1",
            "Table 1 / Fig. 4: depth vs memories at equal tokens",
            tuple(_table1()),
            steps=2000,
            eval_speed=True,
            paper_setting="paper Table 1: dimension 1024, 16 heads, CC-News BPE, test perplexity",
        ),
        Job(
            "recipe",
            "What makes a memory pay off at this scale (validation split only)",
            tuple(_recipe()),
            steps=1800,
            extra=("value_schedule=same", "value_lr=3e-3"),
            test=False,
        ),
    )
}


# ---- runs -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One (variant, seed) of a job: where it lives and how to train it."""

    variant: Variant
    seed: int
    overrides: list[str]
    dir: Path
    gpu: str | None = None
    status: str = "todo"  # todo | done | failed | interrupted
    error: str | None = None
    records: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        f = self.dir / "eval_valid.json"
        if not f.is_file():
            return False
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            return False
        return not res.get("stopped_early", False)


def _run_dir(out: Path, overrides: Sequence[str], seed: int, steps: int) -> Path:
    """A directory named by what the run computes (the overrides that change the model, the data
    order or the training, not where the data lies): runs shared by jobs are trained once."""
    key = json.dumps({"base": BASE, "overrides": sorted(overrides), "seed": seed, "steps": steps})
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return out / "runs" / f"{digest}-s{seed}"


def plan_runs(job: Job, args) -> list[Run]:
    """Every (variant, seed) of ``job`` with its full override list and directory."""
    common = [
        "data=enwik8",
        f"data_path={os.path.abspath(args.data_path)}",
        f"device={args.device}",
        f"cache_dir={os.path.abspath(args.out)}/cache",
        f"eval_every={max(1, args.steps // 10)}",
        "ckpt_every=0",
        "tensorboard=false",
    ]
    what = list(job.extra) + (TINY if args.tiny else []) + list(args.overrides)
    runs = []
    for v in job.variants:
        for seed in args.seeds:
            ov = what + list(v.overrides)
            runs.append(Run(v, seed, common + ov, _run_dir(Path(args.out), ov, seed, args.steps)))
    return runs


# train keys that say where and how a run was done, not what it computes
_LOGISTICS = frozenset(
    {
        "data_path",
        "cache_dir",
        "device",
        "threads",
        "follow_symlinks",
        "tensorboard",
        "log_every",
        "ckpt_every",
        "keep_checkpoints",
        "max_time_s",
        "eval_batch_size",
    }
)


def _config_diffs(want: dict, had: dict, prefix: str = "") -> list[str]:
    """``key=recorded (now planned)`` for every setting both configs hold that differs; keys that the
    recorded config lacks (added to pkmem since) and the logistics above are not compared."""
    diffs = []
    for k, v in want.items():
        if k in _LOGISTICS or k not in had:
            continue
        if isinstance(v, dict) and isinstance(had[k], dict):
            diffs += _config_diffs(v, had[k], f"{prefix}{k}.")
        elif v != had[k]:
            diffs.append(f"{prefix}{k}={had[k]!r} (now {v!r})")
    return diffs


def check_runs_match(runs: Sequence[Run], steps: int) -> None:
    """SystemExit if a run's directory holds a run of another configuration than the one planned.

    A run's directory is named by its overrides of the preset, not by the preset's content: after
    the preset changes, a finished run of the old one would be counted (and an unfinished one
    resumed) as if it were the new one. Its ``config.json`` (written by ``pkmem train``) says."""
    from pkmem.config import load_config

    stale = []
    for r in runs:
        f = r.dir / "config.json"
        if not f.is_file():
            continue
        try:
            had = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            stale.append(f"{r.dir} ({r.variant.name}, seed {r.seed}): config.json unreadable ({e})")
            continue
        want = load_config(BASE, [*r.overrides, f"max_steps={steps}", f"seed={r.seed}"]).to_dict()
        diffs = _config_diffs(want, had if isinstance(had, dict) else {})
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            stale.append(f"{r.dir} ({r.variant.name}, seed {r.seed}): {', '.join(diffs[:3])}{more}")
    if stale:
        raise SystemExit(
            f"{len(stale)} run director{'y holds' if len(stale) == 1 else 'ies hold'} a run of another "
            "configuration than this job trains now (e.g. the preset changed since it was trained): "
            + "; ".join(stale)
            + ". Move them away (or use another --out) to train them again."
        )


def _python() -> list[str]:
    return [sys.executable, "-m", "pkmem"]


def _train_cmd(run: Run, args) -> list[str]:
    cmd = [*_python(), "train", "--config", BASE, "--out", str(run.dir), "--seed", str(run.seed)]
    cmd += ["--max-steps", str(args.steps), "--no-progress"]
    if (run.dir / "checkpoints").is_dir():
        cmd.append("--resume")
    return cmd + ([] if "--resume" in cmd else run.overrides)


def _test_cmd(run: Run, args) -> list[str]:
    cmd = [
        *_python(),
        "eval",
        str(run.dir),
        "--split",
        "test",
        "--json",
        "--output",
        str(run.dir / "eval_test.json"),
    ]
    return cmd + (["--max-tokens", "1024"] if args.tiny else [])


def _env(gpu: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def execute(tasks: list[tuple[Run, list[str], Path]], gpus: list[str | None], per_gpu: int, log) -> None:
    """Run ``(run, command, log_file)`` tasks, ``per_gpu`` at a time on each GPU; marks failures.

    The runs are started in sessions of their own: a Ctrl-C or SIGTERM (``timeout``, a scheduler)
    reaches this process only, which passes each such signal on to every run once (``pkmem train``
    stops after its step with a checkpoint; a second signal aborts it), starts nothing new, waits
    for the runs to exit, then exits itself (130 for SIGINT, 143 for SIGTERM): the next call of the
    same command resumes them."""
    slots = [g for g in gpus for _ in range(per_gpu)]
    pending, active = list(tasks), []
    signals: list[int] = []  # received, in order
    forwarded = 0

    def on_signal(sig, frame) -> None:
        if not signals:
            log(f"  {signal.Signals(sig).name}: stopping the runs after their current step, then exiting")
        signals.append(sig)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending and not signals) or active:
            while pending and slots and not signals:
                run, cmd, log_file = pending.pop(0)
                gpu = slots.pop(0)
                log_file.parent.mkdir(parents=True, exist_ok=True)
                fh = open(log_file, "a")
                fh.write(f"$ {' '.join(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(gpu), start_new_session=True
                )
                active.append((run, proc, fh, gpu, time.perf_counter(), log_file))
                log(f"  started {run.variant.name} seed {run.seed} ({log_file.name}, gpu {gpu})")
            time.sleep(0.5)
            while forwarded < len(signals):
                for _, proc, *_ in active:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                forwarded += 1
            for item in list(active):
                run, proc, fh, gpu, t0, log_file = item
                if proc.poll() is None:
                    continue
                fh.close()
                active.remove(item)
                slots.append(gpu)
                dt = time.perf_counter() - t0
                if proc.returncode != 0 and signals:
                    run.status = "interrupted"
                    log(f"  interrupted {run.variant.name} seed {run.seed} after {dt:.0f} s")
                elif proc.returncode != 0:
                    run.status, run.error = "failed", f"exit {proc.returncode}: see {log_file}"
                    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
                    log(f"  FAILED {run.variant.name} seed {run.seed} after {dt:.0f} s: {' | '.join(tail)}")
                else:
                    log(f"  finished {run.variant.name} seed {run.seed} in {dt:.0f} s")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if signals:
        log("interrupted: the same command resumes the runs from their checkpoints")
        raise SystemExit(128 + signals[0])


def _prepare_cache(args) -> None:
    """Tokenise the data once, before the runs start side by side (they share ``<out>/cache``)."""
    from pkmem.train.data import prepare_data

    prepare_data("enwik8", os.path.abspath(args.data_path), Path(args.out) / "cache", "bytes", log=print)


# ---- timing -----------------------------------------------------------------------------------------
def time_steps(job: Job, args, log) -> dict[str, float]:
    """Seconds per training step of each variant, alone on the device: the loop's own step
    (:func:`pkmem.train.loop.train_step`, usage tracking on), median of ``--time-steps`` after warm-up."""
    import tempfile

    import torch

    from pkmem.config import load_config
    from pkmem.train.loop import LoopState, set_up, train_step

    def sync() -> None:
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()

    out = {}
    for v in job.variants:
        cfg = load_config(BASE, plan_runs(replace(job, variants=(v,)), args)[0].overrides)
        try:
            with tempfile.TemporaryDirectory() as d:
                run = set_up(cfg, Path(d), None, progress=False, log=lambda *a: None)
                state = LoopState(step=0, lr=cfg.train.lr)
                run.model.train()
                if run.tracker is not None:
                    run.tracker.start()
                times = []
                for _ in range(max(3, args.time_steps // 3) + args.time_steps):
                    sync()
                    t0 = time.perf_counter()
                    state.step += 1
                    train_step(run, state)
                    sync()
                    times.append(time.perf_counter() - t0)
                out[v.name] = statistics.median(times[-args.time_steps :])
        except (RuntimeError, ValueError) as e:  # out of memory, say: the run itself may still have trained
            log(f"  timing {v.name}: {type(e).__name__}: {e}")
        finally:
            run = state = None  # freed before the next variant is built, also after an error
        log(f"  {v.name}: {1000 * out.get(v.name, float('nan')):.1f} ms/step")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def eval_speeds(job: Job, args, log) -> dict[str, float]:
    """Evaluation tokens/s of each variant alone on the device: the eager forward of one evaluation
    batch (``eval_batch_size`` or ``batch_size`` windows of validation tokens) in eval mode under
    the run's autocast, without compilation: the model's forward to logits only (``pkmem eval``
    adds the cross-entropy and, with ``--usage``, the memory's usage tracking); median of
    ``--time-steps`` forwards after warm-up, timed with CUDA events on a GPU. The weights are a
    fresh model's: the time of a forward does not depend on their values."""
    import tempfile

    import torch

    from pkmem.config import load_config
    from pkmem.train.evaluate import autocast
    from pkmem.train.loop import set_up

    out = {}
    for v in job.variants:
        cfg = load_config(BASE, plan_runs(replace(job, variants=(v,)), args)[0].overrides)
        try:
            with tempfile.TemporaryDirectory() as d:
                run = set_up(cfg, Path(d), None, progress=False, log=lambda *a: None)
                t = cfg.train
                B, T = t.eval_batch_size or t.batch_size, cfg.model.seq_len
                tokens = torch.as_tensor(run.data.tokens("valid")[: B * T].astype("int64"))
                x = tokens.reshape(B, T).to(run.device)
                cuda = run.device.type == "cuda"
                run.model.eval()
                times = []
                with torch.no_grad():
                    for _ in range(max(3, args.time_steps // 3) + args.time_steps):
                        if cuda:
                            start, end = (
                                torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True),
                            )
                            start.record()
                        t0 = time.perf_counter()
                        with autocast(run.device, t.precision):
                            run.model(x)
                        if cuda:
                            end.record()
                            end.synchronize()
                            times.append(start.elapsed_time(end) / 1e3)
                        else:
                            times.append(time.perf_counter() - t0)
                out[v.name] = B * T / statistics.median(times[-args.time_steps :])
        except (RuntimeError, ValueError) as e:  # out of memory, say
            log(f"  eval speed {v.name}: {type(e).__name__}: {e}")
        finally:
            run = x = None  # freed before the next variant is built, also after an error
        log(f"  {v.name}: {out.get(v.name, float('nan')):,.0f} evaluation tokens/s")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# ---- results ----------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


def _curve(run: Run) -> list[tuple[int, float]]:
    """(step, bits per byte) of the periodic evaluations on the validation subset."""
    pts = {}
    for r in _read_jsonl(run.dir / "metrics.jsonl"):
        if r.get("type") == "eval" and r.get("split") == "valid" and "stopped_early" not in r:
            if r.get("tokens_evaluated", r.get("tokens")) and r.get("bpb") is not None:
                pts[int(r["step"])] = float(r["bpb"])
    return sorted(pts.items())


def _interp(curve: list[tuple[int, float]], step: float) -> float | None:
    """Bits per byte at ``step`` by linear interpolation of ``curve`` (None outside it)."""
    if not curve or step < curve[0][0] or step > curve[-1][0]:
        return None
    for (s0, y0), (s1, y1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return y0 + (y1 - y0) * (step - s0) / max(1, s1 - s0)
    return curve[-1][1]


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _verdict(mean: float | None, sd: float | None) -> str:
    if mean is None or sd is None:
        return "n/a"
    if abs(mean) <= 2 * sd:
        return "within noise"
    return "better" if mean < 0 else "worse"


def _params(overrides: list[str]) -> tuple[int, int]:
    """(parameters, of which value tables) of a variant's model, built on the meta device."""
    import torch

    from pkmem.config import load_config
    from pkmem.models import MemoryTransformer

    cfg = load_config(BASE, overrides)
    with torch.device("meta"):
        model = MemoryTransformer(cfg.model)
    return model.num_parameters(), model.num_parameters() - model.num_parameters(values=False)


def _trained_with(r: Run) -> Path:
    """Beside the run's directory and log (``pkmem train`` wants its directory new or its own): the
    commits of the calls that trained the run."""
    return r.dir.parent / f"{r.dir.name}.trained_with.json"


def _record_training(r: Run) -> None:
    """Add the code's commit to the run's record before a call trains it (a resumed run has one
    entry per call): the job's JSON then says which code made each run, whatever code summarises."""
    r.dir.parent.mkdir(parents=True, exist_ok=True)
    calls = _load(_trained_with(r))
    calls = calls if isinstance(calls, list) else []
    calls.append(git_commit())
    atomic_write_bytes(_trained_with(r), json.dumps(calls).encode())


def _row(r: Run, tokens_per_step: int | None) -> dict:
    """One run's record in the job's JSON (read from its directory)."""
    valid = _load(r.dir / "eval_valid.json")
    test = _load(r.dir / "eval_test.json")
    mem = (valid or {}).get("memories") or [{}]
    return {
        "seed": r.seed,
        "dir": str(r.dir),
        "status": "done" if r.done else r.status,
        "valid_bpb": (valid or {}).get("bpb"),
        "test_bpb": (test or {}).get("bpb"),
        "usage": mem[0].get("usage"),
        "kl": mem[0].get("kl"),
        "curve": _curve(r),
        "trained_with": _load(_trained_with(r)),  # the commits of the calls that trained it, or None
        # training tokens/s side by side with the job's other runs (shared GPU: not a speed claim)
        "tokens_per_s_shared": (valid or {}).get("train_seconds")
        and tokens_per_step
        and tokens_per_step * valid["step"] / valid["train_seconds"],
    }


def earlier_rows(path: str | None, job: Job, steps: int, seeds: Sequence[int]) -> dict[str, list[dict]]:
    """Per variant name, the finished runs recorded in an earlier results JSON of the same job and
    steps (``--with-runs-from``), for the seeds not run here; each row keeps where it came from."""
    if not path:
        return {}
    res = _load(Path(path))
    if res is None:
        raise SystemExit(f"--with-runs-from: {path} does not exist or is not JSON")
    if res.get("job") != job.name or res.get("steps") != steps or res.get("base_config") != BASE:
        raise SystemExit(
            f"--with-runs-from: {path} holds job {res.get('job')!r}, {res.get('steps')} steps on "
            f"{res.get('base_config')!r}; allowed: job {job.name!r}, {steps} steps on {BASE!r}"
        )
    known = {v.name: list(v.overrides) for v in job.variants}
    out: dict[str, list[dict]] = {}
    for v in res["variants"]:
        if v["name"] not in known:
            continue
        if sorted(v["overrides"]) != sorted(known[v["name"]]):
            raise SystemExit(
                f"--with-runs-from: variant {v['name']!r} in {path} has overrides {v['overrides']}; "
                f"this job's are {known[v['name']]}"
            )
        src = {"from": str(path), "git": (res.get("versions") or {}).get("git"), "device": res.get("device")}
        out[v["name"]] = [
            dict(row, earlier=src)
            for row in v["runs"]
            if row["seed"] not in seeds and row.get("status") == "done"
        ]
    return out


def summarize(
    job: Job,
    runs: list[Run],
    args,
    step_s: dict[str, float],
    noise_sd: float | None,
    earlier: dict[str, list[dict]] | None = None,
    eval_tps: dict[str, float] | None = None,
) -> dict:
    """The job's JSON: per run and per variant, with paired differences (same seed) from the first
    variant. ``earlier``: rows of runs made before (``--with-runs-from``), counted like this job's."""
    base = job.variants[0]
    tokens_per_step = None
    for r in runs:
        cfg = _load(r.dir / "config.json")
        if cfg:
            t, m = cfg["train"], cfg["model"]
            tokens_per_step = t["batch_size"] * t.get("grad_accum", 1) * m["seq_len"]
            break
    rows_of: dict[str, list[dict]] = {v.name: [] for v in job.variants}
    for r in runs:
        rows_of[r.variant.name].append(_row(r, tokens_per_step))
    for name, rows in (earlier or {}).items():
        rows_of[name].extend(rows)
    for rows in rows_of.values():
        rows.sort(key=lambda row: row["seed"])
    base_rows = {row["seed"]: row for row in rows_of[base.name]}
    variants = []
    for v in job.variants:
        rows, diffs, test_diffs, curves = rows_of[v.name], [], [], {}
        for row in rows:
            b = base_rows.get(row["seed"])
            if b is None or row["valid_bpb"] is None:
                continue
            if b["valid_bpb"] is not None:
                diffs.append(row["valid_bpb"] - b["valid_bpb"])
            if b["test_bpb"] is not None and row["test_bpb"] is not None:
                test_diffs.append(row["test_bpb"] - b["test_bpb"])
            bc = dict(map(tuple, b["curve"]))
            curves[row["seed"]] = [(s, y - bc[s]) for s, y in row["curve"] if s in bc]
        mean, sd = _mean_sd(diffs)
        ref_sd = sd if sd is not None else noise_sd
        t_mean, t_sd = _mean_sd(test_diffs)
        params, value_params = _params(plan_runs(replace(job, variants=(v,)), args)[0].overrides)
        entry = {
            "name": v.name,
            "overrides": list(v.overrides),
            "paper": v.paper,
            "seeds": [r["seed"] for r in rows],
            "runs": rows,
            "valid_bpb": _mean_sd([r["valid_bpb"] for r in rows]),
            "test_bpb": _mean_sd([r["test_bpb"] for r in rows]),
            "usage": _mean_sd([r["usage"] for r in rows])[0],
            "kl": _mean_sd([r["kl"] for r in rows])[0],
            "diff_valid": {
                "mean": mean,
                "sd": sd,
                "n": len(diffs),
                "sd_used": ref_sd,
                "sd_from": "this job" if sd is not None else ("noise job" if noise_sd else None),
            },
            "diff_test": {"mean": t_mean, "sd": t_sd, "n": len(test_diffs)},
            "verdict_valid": _verdict(mean, ref_sd) if v is not base else "baseline",
            "verdict_test": _verdict(t_mean, t_sd if t_sd is not None else noise_sd)
            if v is not base
            else "baseline",
            "diff_curves": curves,
            "step_s": step_s.get(v.name),
            "eval_tokens_per_s": (eval_tps or {}).get(v.name),
            "params": params,
            "value_params": value_params,
        }
        variants.append(entry)
    # equal training time: the step each variant reaches in the baseline's time (solo step times)
    b_entry = variants[0]
    for e in variants:
        e["equal_time"] = None
        if e["step_s"] and b_entry["step_s"]:
            step = args.steps * b_entry["step_s"] / e["step_s"]
            vals = [_interp(r["curve"], min(step, args.steps)) for r in e["runs"]]
            base_vals = [r["curve"][-1][1] if r["curve"] else None for r in b_entry["runs"]]
            paired = [a - b for a, b in zip(vals, base_vals) if a is not None and b is not None]
            e["equal_time"] = {
                "step": min(step, args.steps),
                "valid_subset_bpb": _mean_sd(vals)[0],
                "diff": _mean_sd(paired)[0],
                "note": "validation subset; beyond its last step a faster variant is held at its final value"
                if step > args.steps
                else "validation subset",
            }
    return {
        "job": job.name,
        "title": job.title,
        "paper_setting": job.paper_setting,
        "base_config": BASE,
        "steps": args.steps,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step and tokens_per_step * args.steps,
        "seeds": sorted({r["seed"] for e in variants for r in e["runs"]}),
        "with_runs_from": args.with_runs_from,
        "noise_sd": noise_sd,
        "split_note": "valid_bpb: whole validation split; test_bpb: whole test split; curves: "
        "validation subset (eval_tokens) every steps/10",
        "variants": variants,
        "device": args.trained_on or _device(args.device),
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/repro.py", *sys.argv[1:]]),
    }


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _device(device: str) -> str:
    import platform

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _f(x, fmt: str = ".4f", pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else format(x, fmt)


def _pm(ms: tuple, fmt: str = ".4f") -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:{fmt}}" + (f" ± {s:{fmt.lstrip('+')}}" if s is not None else "")


def markdown(res: dict) -> str:
    has_test = any(v["test_bpb"][0] is not None for v in res["variants"])
    head = ["variant", "valid bits/byte", "Δ vs baseline (paired)", "verdict", "usage", "KL"]
    head += ["test bits/byte", "Δ test"] if has_test else []
    has_speed = any(v.get("eval_tokens_per_s") for v in res["variants"])
    head += ["ms/step (alone)", "Δ at equal time"] + (["eval tok/s (alone)"] if has_speed else [])
    head += ["params (values)", "paper ppl", "paper usage", "paper KL"]
    lines = [f"### {res['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in res["variants"]:
        d, dt, p, eq = v["diff_valid"], v["diff_test"], v["paper"] or {}, v["equal_time"] or {}
        cells = [v["name"], _pm(v["valid_bpb"])]
        cells += [
            "–" if v["verdict_valid"] == "baseline" else _pm((d["mean"], d["sd"]), "+.4f"),
            v["verdict_valid"],
        ]
        cells += [_f(v["usage"], pct=True), _f(v["kl"], ".2f")]
        if has_test:
            cells += [
                _pm(v["test_bpb"]),
                "–" if v["verdict_test"] == "baseline" else _pm((dt["mean"], dt["sd"]), "+.4f"),
            ]
        base = v["verdict_valid"] == "baseline"
        cells += [_f(v["step_s"] and 1000 * v["step_s"], ".1f"), "–" if base else _f(eq.get("diff"), "+.4f")]
        if has_speed:
            cells.append(_f(v.get("eval_tokens_per_s"), ",.0f"))
        cells += [f"{v['params'] / 1e6:.1f}M ({v['value_params'] / 1e6:.1f}M)", _f(p.get("ppl"), ".1f")]
        cells += [_f(p.get("usage"), pct=True), _f(p.get("kl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(res["seeds"])
    lines += [
        "",
        f"{res['steps']:,} steps × {res['tokens_per_step'] or 0:,} tokens = {res['tokens'] or 0:,} training "
        f"tokens per run; seeds {res['seeds']} ({n} per variant), the same batches for every variant of a "
        f"seed. Bits per byte on the whole enwik8 validation split{' and test split' if has_test else ''}; "
        "Δ = variant − baseline on the same seed (mean ± sd over seeds); a verdict other than 'within "
        "noise' needs |mean Δ| > 2 sd of the paired difference"
        + (f" (sd from the noise job: {res['noise_sd']:.4f})" if res["noise_sd"] and n < 2 else "")
        + ". 'Δ at equal time': the variant's validation-subset bits per byte at the step it reaches in the "
        "baseline's training time (step times measured alone on the device), minus the baseline's final one."
        + (
            " 'eval tok/s': the eager forward to logits of one evaluation batch alone on the device (no "
            "compilation, no loss or usage tracking), median of timed repeats."
            if has_speed
            else ""
        ),
        f"Paper columns: {res['paper_setting']} (perplexity of BPE words, not comparable in value; compare "
        "the trends). Device: " + res["device"] + f"; pkmem {res['versions'].get('git')}.",
    ]
    earlier = sorted(
        {(r["earlier"]["from"], r["earlier"]["git"], r["earlier"]["device"]): None for v in res["variants"]
         for r in v["runs"] if r.get("earlier")}
    )  # fmt: skip
    for src, git, device in earlier:
        seeds = sorted(
            {
                r["seed"]
                for v in res["variants"]
                for r in v["runs"]
                if (r.get("earlier") or {}).get("from") == src
            }
        )
        lines.append(
            f"Seeds {seeds} were trained earlier (from {src}: pkmem {git}, {device}), the same configuration."
        )
    mine = [r for v in res["variants"] for r in v["runs"] if not r.get("earlier")]
    trained = sorted({c for r in mine for c in r.get("trained_with") or () if c})
    done = [r for r in mine if r.get("status") == "done"]
    recorded = [r for r in done if r.get("trained_with")]
    if trained and len(recorded) == len(done):
        lines.append(f"This job's runs were trained with pkmem {', '.join(trained)}.")
    elif trained:
        lines.append(
            f"{len(recorded)} of this job's {len(done)} runs were trained with pkmem {', '.join(trained)}; "
            f"the other {len(done) - len(recorded)} before pkmem recorded the commit that trained a run."
        )
    lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path | None:
    """Each variant's paired difference from the baseline over training (mean over seeds, ± sd band)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    tps = res["tokens_per_step"] or 1
    for v in res["variants"][1:]:
        curves = list(v["diff_curves"].values())
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        if not steps:
            continue
        ys = [[dict(c)[s] for c in curves] for s in steps]
        mean = [statistics.fmean(y) for y in ys]
        x = [s * tps / 1e6 for s in steps]
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=v["name"])
        if len(curves) > 1:
            sd = [statistics.stdev(y) for y in ys]
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, sd)],
                [m + s for m, s in zip(mean, sd)],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("Δ bits per byte vs baseline (same seed)")
    ax.set_title(
        f"{res['title']}\nenwik8 validation subset; below 0 = better than {res['variants'][0]['name']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_speed(res: dict, path: Path) -> Path | None:
    """Validation bits per byte against evaluation tokens/s, one point per variant (Fig. 4)."""
    pts = [
        (v["eval_tokens_per_s"], v["valid_bpb"][0], v["name"])
        for v in res["variants"]
        if v.get("eval_tokens_per_s") and v["valid_bpb"][0] is not None
    ]
    if not pts:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for x, y, name in pts:
        ax.scatter([x / 1e3], [y], s=25)
        ax.annotate(name, (x / 1e3, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("evaluation tokens/s (thousands; eager, alone on the device)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"{res['title']}\n{res['device']}; lower right is better", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s JOB [options] [key=value ...]"
    )
    p.add_argument("job", choices=list(JOBS), help="which table")
    p.add_argument("--data-path", help="enwik8, enwik8.gz or enwik8.zip (needed unless --report-only)")
    p.add_argument("--out", default="runs/repro", help="runs and results (default: runs/repro)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the job's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the job's)")
    p.add_argument(
        "--gpus",
        default="0",
        help="comma-separated CUDA devices, one process each at a time "
        "times --jobs (default: 0); ignored with --device cpu",
    )
    p.add_argument("--jobs", type=int, default=4, help="runs side by side per GPU (default 4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--variants", help="comma-separated indices of the job's variants to run (default: all)")
    p.add_argument("--no-test", action="store_true", help="skip the test-split evaluation")
    p.add_argument(
        "--with-runs-from",
        metavar="JSON",
        help="an earlier results JSON of this job (same steps): its finished runs of other seeds are "
        "counted beside this run's (e.g. more seeds for the noise floor)",
    )
    p.add_argument(
        "--time-steps",
        type=int,
        default=20,
        help="timed steps per variant alone (0: no timing); Table 1 also times as many evaluation forwards",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke test on the CPU")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: evaluate, time (--time-steps) and report what is there; the runs not "
        "finished are reported as such (e.g. to time a variant too slow to train within a budget)",
    )
    p.add_argument(
        "--trained-on",
        help="the device the runs were trained on, when this summary is made on another machine",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table and plot from <out>/<job>.json, run nothing",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_intermixed_args(argv)
    job = JOBS[args.job]
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else job.steps)
    if args.steps < 1:
        p.error(f"--steps {args.steps} is not allowed: it must be >= 1")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs} is not allowed: it must be >= 1")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(job.seeds)
    except ValueError:
        p.error(f"--seeds {args.seeds!r} is not allowed: give comma-separated integers such as 0,1,2")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds {args.seeds} is not allowed: give distinct integers >= 0")
    if args.report_only:
        args.data_path = args.data_path or ""
    elif not args.data_path or not Path(args.data_path).is_file():
        p.error(f"--data-path {args.data_path!r} does not exist or is not a file")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"{bad[0]!r} is not allowed: overrides must be key=value")
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or ["0"]
    if args.variants:
        try:
            idx = sorted({int(i) for i in args.variants.split(",")})
        except ValueError:
            p.error(f"--variants {args.variants!r} is not allowed: give comma-separated variant indices")
        if idx[0] < 0 or idx[-1] >= len(job.variants):
            p.error(
                f"--variants {args.variants!r} is not allowed: indices must be in "
                f"[0, {len(job.variants) - 1}]"
            )
        if 0 not in idx:
            idx = [0, *idx]  # the baseline is always part of a table
        args.variant_indices = idx
    else:
        args.variant_indices = list(range(len(job.variants)))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    job = JOBS[args.job]
    job = replace(job, variants=tuple(job.variants[i] for i in args.variant_indices))
    out = Path(args.out)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.report_only:  # the table and plot again, from a job's JSON (e.g. one made on a GPU machine)
        res = _load(out / f"{job.name}.json")
        if res is None:
            raise SystemExit(f"--report-only: {out / f'{job.name}.json'} does not exist or is not JSON")
        return _report(res, out, log)
    runs = plan_runs(job, args)
    check_runs_match(runs, args.steps)
    earlier = earlier_rows(args.with_runs_from, job, args.steps, args.seeds)
    todo = [r for r in runs if not r.done]
    log(
        f"{job.title}: {len(job.variants)} variants x {len(args.seeds)} seeds, {args.steps} steps each; "
        f"{len(runs) - len(todo)} done, {len(todo)} to train"
    )
    if args.dry_run:
        for r in runs:
            state = "done" if r.done else "todo"
            log(f"[{state}] {r.variant.name} seed {r.seed}: " + " ".join(_train_cmd(r, args)))
        return 0
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    gpus: list[str | None] = [None] if args.device == "cpu" else args.gpus
    if todo and args.no_train:
        log(f"--no-train: {len(todo)} unfinished run(s) not trained")
    elif todo:
        for r in todo:
            _record_training(r)
        _prepare_cache(args)
        tasks = [(r, _train_cmd(r, args), r.dir.parent / f"{r.dir.name}.log") for r in todo]
        execute(tasks, gpus, args.jobs, log)
    if job.test and not args.no_test:
        tests = [r for r in runs if r.done and not (r.dir / "eval_test.json").is_file()]
        lost = [r for r in tests if not (r.dir / "checkpoints").is_dir()]
        if lost:  # copied without its checkpoint (e.g. from a GPU machine)
            names = ", ".join(r.dir.name for r in lost)
            log(f"test split: no checkpoint left in {len(lost)} run(s), not evaluated: {names}")
            tests = [r for r in tests if r not in lost]
        if tests:
            log(f"test split: {len(tests)} runs")
            tasks = [(r, _test_cmd(r, args), r.dir.parent / f"{r.dir.name}.log") for r in tests]
            execute(tasks, gpus, args.jobs, log)
    step_s = time_steps(job, args, log) if args.time_steps > 0 else {}
    eval_tps = eval_speeds(job, args, log) if args.time_steps > 0 and job.eval_speed else {}
    noise = _load(out / "noise.json")
    noise_sd = None
    if noise and len(noise["variants"]) > 1:
        noise_sd = noise["variants"][1]["diff_valid"]["sd"]
    res = summarize(job, runs, args, step_s, noise_sd, earlier, eval_tps)
    res["wall_s"] = time.perf_counter() - t0
    atomic_write_bytes(out / f"{job.name}.json", json.dumps(res, indent=1).encode())
    status = _report(res, out, log)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        log(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{r.variant.name} s{r.seed}: {r.error}" for r in failed)
        )
        return 1
    return status


def _report(res: dict, out: Path, log) -> int:
    """Write ``<job>.md``, ``<job>-diff.png`` (and ``<job>-speed.png``) from the job's results and
    print the table."""
    atomic_write_bytes(out / f"{res['job']}.md", markdown(res).encode())
    png = plot(res, out / f"{res['job']}-diff.png")
    speed_png = plot_speed(res, out / f"{res['job']}-speed.png")
    log("\n" + markdown(res))
    pngs = "".join(f", {p}" for p in (png, speed_png) if p)
    log(f"wrote {out / (res['job'] + '.json')}, {out / (res['job'] + '.md')}" + pngs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
