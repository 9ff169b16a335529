"""The training loop (explicit, nanoGPT style): data, model, AdamW with value groups, schedule, logs,
periodic evaluation, atomic checkpoints and exact resumption.

Read it top to bottom: :func:`train` (a new run) and :func:`resume` (a run from its newest
checkpoint) set a run up (:func:`set_up`: data, model, optimizer, the checkpoint's state), then
:func:`fit` repeats :func:`train_step` and, when due, :func:`log_window`, :func:`evaluate_split`
and :func:`save`; :func:`finish` evaluates the final model and writes the run's records. What the
run works with is a :class:`Run`; what changes from step to step is a :class:`LoopState`.

The loop never syncs the host inside a step: losses accumulate on the device and are read every
``log_every`` steps (and at evaluations, checkpoints and the end). A batch is a pure function of
``(seed, step)``, the learning rate a function of the step, and a checkpoint holds the model, the
optimizer state and the RNG states, so a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pkmem._util import atomic_write_bytes, not_allowed
from pkmem.config import (
    CUDA_GRAPH_MODES,
    PRESETS,
    Config,
    TrainConfig,
    config_from_dict,
    override_section,
    read_config_file,
)
from pkmem.distributed.parallel import Parallel
from pkmem.models import MakeMemory, MemoryTransformer
from pkmem.optim import make_optimizer
from pkmem.train import checkpoint as ckpt_lib
from pkmem.train.data import (
    TokenData,
    eval_windows,
    prepare_data,
    sample_batch,
    source_fingerprint,
    unigram_bits,
)
from pkmem.train.evaluate import autocast, evaluate, memory_report, resolve_device, set_threads
from pkmem.train.guard import StepGuard
from pkmem.train.tokenizer import load_tokenizer

__all__ = [
    "train",
    "resume",
    "Run",
    "LoopState",
    "set_up",
    "fit",
    "train_step",
    "finish",
    "lr_factor",
    "default_run_dir",
    "default_cache_dir",
    "load_data_for",
    "build_model",
    "load_run",
    "evaluate_run",
]

METRICS = "metrics.jsonl"
# train settings a resumed run keeps (the optimizer state holds its betas: a change would not apply)
FIXED_ON_RESUME = (
    "data",
    "data_path",
    "follow_symlinks",
    "tokenizer",
    "bpe_vocab_size",
    "batch_size",
    "grad_accum",
    "seed",
    "betas",
    "value_betas",
    "value_optimizer",
)


# ---- schedule, run directory, data and model --------------------------------------------------------
def lr_factor(step: int, schedule: str, warmup: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (1-based).

    Linear warmup over ``warmup`` steps, then "cosine" (down to ``min_ratio`` at ``max_steps``),
    "inverse_sqrt" (Vaswani et al.: ``sqrt(warmup / step)``, the paper's schedule) or "constant".
    """
    if warmup > 0 and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / step)
    if schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise not_allowed("schedule", schedule, "cosine, inverse_sqrt or constant")


def default_run_dir(cfg: Config, root: str | os.PathLike = "runs") -> Path:
    """``runs/<config>-<data>-<timestamp>`` under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{cfg.name}-{cfg.train.data}-{stamp}"
    n = 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = Path(root) / f"{cfg.name}-{cfg.train.data}-{stamp}-{n}"
    return path


def default_cache_dir() -> Path:
    """The token cache that runs share: ``$XDG_CACHE_HOME/pkmem``, else ``~/.cache/pkmem``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "pkmem"


def data_cache_dir(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Where a run's token ids are cached: ``cache_dir``, else the shared :func:`default_cache_dir`
    (a run made before the shared cache keeps its own ``<run_dir>/data``)."""
    if cfg.train.cache_dir:
        return Path(cfg.train.cache_dir).expanduser()
    own = Path(run_dir) / "data"
    return own if own.is_dir() else default_cache_dir()


def load_data_for(cfg: Config, run_dir: Path, tokenizer=None, log=print) -> TokenData:
    """The token data of a run's config (cached in :func:`data_cache_dir`)."""
    t = cfg.train
    cache = data_cache_dir(cfg, run_dir)
    return prepare_data(
        t.data,
        t.data_path,
        cache,
        tokenizer if tokenizer is not None else t.tokenizer,
        t.bpe_vocab_size,
        min_tokens=cfg.model.seq_len + 1,
        log=log,
        follow_symlinks=t.follow_symlinks,
    )


def build_model(
    cfg: Config, device: torch.device, make_memory: MakeMemory | None = None
) -> MemoryTransformer:
    """The run's model, initialised from ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    return MemoryTransformer(cfg.model, make_memory).to(device)


def load_run(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    verify: bool = True,
    overrides: Sequence[str] = (),
    make_memory: MakeMemory | None = None,
):
    """``(model, config, tokenizer, checkpoint)`` of a run directory or checkpoint directory;
    ``overrides`` (``key=value``) change the config read from it (e.g. its data)."""
    ck = ckpt_lib.load_checkpoint(path, verify=verify)
    cfg = config_from_dict(ckpt_lib.saved_config(ck), str(ck["dir"] / ckpt_lib.STATE), overrides)
    tok = load_tokenizer(ck["dir"] / "tokenizer.json")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model = MemoryTransformer(cfg.model, make_memory)
    if ck["model"] is None:  # a distributed run's checkpoint: its shards make whole tables here
        from pkmem.distributed.checkpoint import load_model

        load_model(model, ck["dir"])
    else:
        ckpt_lib.load_model_state(model, ck["model"], str(ck["dir"] / "model.safetensors"))
    return model.to(device).eval(), cfg, tok, ck


# ---- the two entry points ---------------------------------------------------------------------------
def train(
    cfg: Config,
    run_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    log=print,
    make_memory: MakeMemory | None = None,
) -> dict:
    """Train a new run of ``cfg`` (a validated config: :func:`pkmem.config.load_config` gives one)
    in ``run_dir`` (new or empty; default :func:`default_run_dir`); returns the final summary.

    Writes ``<run_dir>/metrics.jsonl``, ``checkpoints/``, ``tokenizer.json``, ``config.json``,
    ``eval_valid.json`` and ``plots/``. ``make_memory``: see :class:`pkmem.models.MemoryTransformer`.
    Started by torchrun (``WORLD_SIZE`` > 1), every rank calls it: see :mod:`pkmem.distributed`.
    """
    par = Parallel.from_env(cfg.train.device)
    run_dir = par.on_main("choosing the run directory", lambda: _new_run_dir(cfg, run_dir))
    if cfg.train.data_path is not None:  # absolute: the run resumes and evaluates from anywhere
        cfg.train.data_path = _absolute(cfg.train.data_path)
    return _run(cfg, run_dir, None, progress, log, make_memory, par)


def resume(
    run_dir: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    config_name: str | None = None,
    progress: bool = True,
    log=print,
    make_memory: MakeMemory | None = None,
) -> dict:
    """Continue the run in ``run_dir`` from its newest checkpoint; returns the final summary.

    The run keeps its config; ``overrides`` (``key=value``) may change train settings that keep the
    run the same computation (``max_steps``, logging, evaluation, ...); ``config_name``, if given,
    must be the run's.
    """
    if run_dir is None:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    run_dir = Path(run_dir)
    ck = ckpt_lib.load_checkpoint(run_dir)  # verifies all of itself: clear error if corrupt
    cfg = _resume_config(ck, list(overrides), config_name)
    _check_resumable(cfg, ck, make_memory)  # before anything in the run directory is written
    return _run(cfg, run_dir, ck, progress, log, make_memory, Parallel.from_env(cfg.train.device))


def _new_run_dir(cfg: Config, run_dir: str | os.PathLike | None) -> Path:
    """The directory of a new run: new or empty, never one that holds a run or other files."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if ckpt_lib.list_checkpoints(run_dir):
        raise ValueError(
            f"--out {str(run_dir)!r} already holds a run: pass --resume to continue it, "
            "or choose another --out"
        )
    if (run_dir / METRICS).exists():
        raise ValueError(
            f"--out {str(run_dir)!r} holds a run stopped before its first checkpoint (nothing to "
            "resume): delete the directory or choose another --out"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file: it must be a new or empty directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(
            f"--out {str(run_dir)!r} is a directory that is not empty and holds no run: choose a new "
            "or empty directory (pkmem writes config.json, tokenizer.json, plots/, ... there)"
        )
    return run_dir


def _resume_config(ck: dict, overrides: list[str], config_name: str | None) -> Config:
    """The config a resumed run continues with: the checkpoint's (read once), with ``overrides`` of
    train settings that keep the run the same computation."""
    saved = ckpt_lib.saved_config(ck)
    if config_name is not None and saved.get("name") not in _names_of(config_name):
        raise ValueError(
            f"--config {config_name!r} differs from the run's config {saved.get('name')!r}: a resumed run "
            "keeps its config (leave --config out with --resume)"
        )
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if override_section(key) == "model":
            raise ValueError(f"--resume: {key} is a model setting and cannot change when a run is resumed")
    cfg = config_from_dict(saved, str(ck["dir"] / ckpt_lib.STATE), overrides)
    before = {**TrainConfig().to_dict(), **saved["train"]}  # keys added since the run was saved: defaults
    if cfg.train.data_path is not None and before["data_path"] is not None:
        if _absolute(cfg.train.data_path) == _absolute(before["data_path"]):
            cfg.train.data_path = before["data_path"]  # the same files, written another way
    for key in FIXED_ON_RESUME:
        if cfg.train.to_dict()[key] != before[key]:
            raise ValueError(
                f"--resume: {key}={getattr(cfg.train, key)!r} differs from the run's {before[key]!r}; "
                "it cannot change when a run is resumed"
            )
    return cfg


def _check_resumable(cfg: Config, ck: dict, make_memory: MakeMemory | None) -> None:
    """The checkpoint's model and optimizer state fit the run's config: checked against a model and
    optimizer built on the meta device (no memory, nothing written); CheckpointError naming the file."""
    try:
        with torch.device("meta"):
            model = MemoryTransformer(cfg.model, make_memory)
    except (RuntimeError, NotImplementedError):  # a make_memory that cannot be built without data:
        return  # set_up's own load checks it (after the run's files are written)
    if ck["model"] is None:  # a checkpoint of several ranks: its loader checks it against the model
        return
    ckpt_lib.match_model_state(model, ck["model"], str(ck["dir"] / "model.safetensors"))
    if ck["optimizer"] is not None:
        optimizer = _make_optimizer(model, cfg.train)
        ckpt_lib.check_optimizer_state(optimizer, ck["optimizer"], str(ck["dir"] / "optimizer.json"))


def _names_of(config_name: str) -> set:
    """The names a ``--config`` may give a run: as written, its file's stem, the file's ``name:``."""
    names = {config_name, Path(config_name).stem}
    try:
        data, _ = read_config_file(config_name)
        names.add(data.get("name") if isinstance(data, dict) else None)
    except (ValueError, OSError):  # not a preset or a readable YAML file: the name as written
        pass
    return names


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _run(
    cfg: Config, run_dir: Path, ck: dict | None, progress: bool, log, make_memory, par: Parallel
) -> dict:
    """Set up, fit and finish; a new run that fails before its first checkpoint leaves nothing."""
    if not par.is_main:  # rank 0 logs and writes the run's files
        log, progress = (lambda *args, **kwargs: None), False
    own = ck is not None and cfg.train.threads == ck["state"]["config"]["train"].get("threads")
    cfg.train.threads = set_threads(cfg.train.threads, log, "the run's own" if own else "threads")
    try:
        if cfg.train.compile:  # before anything is built or written
            _check_compile_mode(cfg.train.compile_mode, par)
        if cfg.train.data != "stdlib":  # a missing --data-path is reported before anything is written
            t = cfg.train
            par.agree("finding the data", lambda: source_fingerprint(t.data, t.data_path, t.follow_symlinks))
        created = par.on_main("creating the run directory", lambda: _make_dir(run_dir))
        try:
            run = set_up(cfg, run_dir, ck, progress, log, make_memory, par)
            state = LoopState(step=run.start_step, last_saved=run.start_step if ck else -1, lr=cfg.train.lr)
            stopped_early = fit(run, state, log)
            return finish(run, state, stopped_early, log)
        except BaseException:
            if created and par.is_main and not ckpt_lib.list_checkpoints(run_dir):  # nothing worth keeping
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    finally:
        par.close()


def _make_dir(run_dir: Path) -> bool:
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return created


# ---- set-up -----------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training run works with, set up once by :func:`set_up`."""

    cfg: Config
    dir: Path
    device: torch.device
    data: TokenData
    tok: object  # ByteTokenizer or BPETokenizer
    model: MemoryTransformer
    forward: Callable  # the model, or its torch.compile'd twin
    optimizer: torch.optim.Optimizer
    tracker: object | None  # pkmem.metrics.UsageTracker when the model has memories and track_usage
    tb: object | None  # a TensorBoard SummaryWriter
    pbar: object | None  # the tqdm progress bar
    start_step: int  # 0, or the step of the checkpoint resumed from
    t_start: float  # time.perf_counter() when the run started
    par: Parallel = field(default_factory=Parallel)  # the ranks (one process by default)

    @property
    def tokens_per_step(self) -> int:  # all ranks together
        return self.cfg.train.batch_size * self.cfg.model.seq_len * self.cfg.train.grad_accum

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS


@dataclass
class LoopState:
    """What changes from step to step of :func:`fit`."""

    step: int  # the last optimizer step taken
    lr: float  # the base learning rate of that step
    norms: tuple = field(default_factory=lambda: (torch.zeros(()), torch.zeros(())))  # its gradient norms
    losses: list = field(default_factory=list)  # per-step losses (on the device) since the last log
    window_t0: float = field(default_factory=time.perf_counter)  # start of the logging window
    window_steps: int = 0
    train_seconds: float = 0.0  # training time of the logged windows
    last_record: dict = field(default_factory=dict)  # the last train record of metrics.jsonl
    last_saved: int = -1  # the step of the newest checkpoint
    guard: StepGuard | None = None  # steps the optimizer only where the loss and gradients are finite


def set_up(
    cfg: Config,
    run_dir: Path,
    ck: dict | None,
    progress: bool,
    log,
    make_memory: MakeMemory | None = None,
    par: Parallel | None = None,
) -> Run:
    """Data and tokenizer, model and optimizer (restored from ``ck`` when resuming), logging; on
    several ranks (``par``) also the DDP wrap and the sharded value tables (:mod:`pkmem.distributed`)."""
    t, t_start = cfg.train, time.perf_counter()
    par = Parallel() if par is None else par
    device = par.device(t.device)
    tokenizer = load_tokenizer(ck["dir"] / "tokenizer.json") if ck else None
    data = par.main_first("preparing the data", lambda: load_data_for(cfg, run_dir, tokenizer, log=log))
    tok = data.tokenizer
    cfg.model.vocab_size = tok.vocab_size
    if par.is_main:
        tok.save(run_dir / "tokenizer.json")
        _record_data(run_dir, data)
    model, optimizer = par.agree(
        "building the model", lambda: _model_and_optimizer(cfg, device, make_memory, par)
    )
    par.seed_rank(t.seed)
    start_step = (
        par.agree("loading the checkpoint", lambda: _restore(model, optimizer, ck, run_dir, log, par))
        if ck
        else 0
    )
    forward = par.wrap(model)  # DDP on several ranks
    if t.compile:
        forward = _compile(forward, t.compile_mode, par)
    if start_step >= t.max_steps and ck:
        log(f"the run is already at step {start_step} >= max_steps={t.max_steps}: evaluating only")
    if par.is_main:
        atomic_write_bytes(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())

    n_params, n_dense = model.num_parameters(), model.num_parameters(values=False)
    log(
        f"model: {cfg.model.n_layers} layers, dim {cfg.model.dim}, memories at layers "
        f"{list(model.mem_layer_indices) or 'none'} ({cfg.model.mem_mode}); {n_params / 1e6:.2f}M parameters "
        f"({n_dense / 1e6:.2f}M without memory values); device {device}{par.describe(model)}"
    )
    log(
        f"data: {data.meta['description']}, {len(data.tokens('train')):,} training tokens "
        f"({tok.kind} tokenizer; token ids cached in {data.directory})"
    )
    return Run(
        cfg=cfg,
        dir=run_dir,
        device=device,
        data=data,
        tok=tok,
        model=model,
        forward=forward,
        optimizer=optimizer,
        tracker=_usage_tracker(model, t.track_usage),
        tb=_tensorboard(run_dir, t.tensorboard and par.is_main),
        pbar=_progress_bar(t.max_steps, start_step) if progress else None,
        start_step=start_step,
        t_start=t_start,
        par=par,
    )


def _model_and_optimizer(cfg: Config, device: torch.device, make_memory: MakeMemory | None, par: Parallel):
    t = cfg.train
    par.rows(t.batch_size)  # the global batch must split evenly over the ranks
    model = build_model(cfg, device, par.memory_maker(cfg, make_memory))
    par.check_model(model, t.shard_values, t.value_optimizer)
    return model, _make_optimizer(model, t)


def _make_optimizer(model, t: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer(
        model,
        lr=t.lr,
        value_lr=t.value_lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        value_weight_decay=t.value_weight_decay,
        value_betas=None if t.value_betas is None else tuple(t.value_betas),
        value_optimizer=t.value_optimizer,
    )


def _restore(model, optimizer, ck: dict, run_dir: Path, log, par: Parallel | None = None) -> int:
    """Load a checkpoint's model, optimizer and RNG states; returns its step."""
    par = Parallel() if par is None else par
    if par.distributed or ck["model"] is None:  # saved or resumed on several ranks
        from pkmem.distributed.checkpoint import load_sharded, load_whole, restore_rng

        if ck["model"] is None:
            load_sharded(ck, model, optimizer, par)
        else:
            load_whole(ck, model, optimizer, str(ck["dir"] / "model.safetensors"))
        restore_rng(ck["state"], par)
    else:
        ckpt_lib.load_model_state(model, ck["model"], str(ck["dir"] / "model.safetensors"))
        if ck["optimizer"] is not None:
            optimizer.load_state_dict(ck["optimizer"])
        ckpt_lib.set_rng_state(ck["state"].get("rng", {}), str(ck["dir"] / ckpt_lib.STATE))
    step = int(ck["state"]["step"])
    if par.is_main:
        _truncate_metrics(run_dir / METRICS, step)
    log(f"resuming {run_dir} from step {step} ({ck['dir'].name})")
    return step


def _compile(forward, mode: str, par):
    """``torch.compile(forward)`` in ``mode`` (train.compile_mode)."""
    _check_compile_mode(mode, par)
    return torch.compile(forward, mode=None if mode == "default" else mode)


def _check_compile_mode(mode: str, par) -> None:
    """The modes that replay CUDA graphs are refused on several ranks: DDP's gradient all-reduce
    runs between the backward's graphs, which pkmem does not test."""
    if par.distributed and mode in CUDA_GRAPH_MODES:
        raise not_allowed(
            "compile_mode",
            mode,
            f"'default' or 'max-autotune-no-cudagraphs' on {par.world_size} ranks (the modes with CUDA "
            "graphs are not supported with DDP here)",
        )


def _usage_tracker(model, enabled: bool):
    if not enabled or not model.memories():
        return None
    from pkmem.metrics import UsageTracker

    return UsageTracker(model)


def _record_data(run_dir: Path, data: TokenData) -> None:
    """``<run_dir>/data.json``: where the run's data came from and where its token ids are cached
    (the cache is shared by runs, not copied into each)."""
    meta = data.meta
    keep = ("source", "data_path", "fingerprint", "description", "tokenizer", "vocab_size", "splits")
    record = {"cache": str(Path(data.directory).resolve()), **{k: meta.get(k) for k in keep}}
    atomic_write_bytes(run_dir / "data.json", json.dumps(record, indent=1).encode())


def _tensorboard(run_dir: Path, enabled: bool | None):
    """A SummaryWriter, or None: ``enabled`` None uses TensorBoard when it is installed, True warns
    when it is not."""
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard not installed
        if enabled:
            warnings.warn(
                f"tensorboard=true but TensorBoard cannot be used ({e}): pip install tensorboard; "
                "this run logs to metrics.jsonl only",
                UserWarning,
                stacklevel=2,
            )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.2 if tty else 15.0,  # a log file gets a line every 15 s, not a flood
    )


# ---- the loop ---------------------------------------------------------------------------------------
def fit(run: Run, state: LoopState, log) -> bool:
    """Train from ``state.step`` to ``max_steps``, logging, evaluating and checkpointing when due.

    Returns whether ``max_time_s`` stopped it early; a Ctrl-C (or SIGTERM) stops it after the step
    with a checkpoint and raises KeyboardInterrupt.
    """
    t = run.cfg.train
    stopped_early = False
    loop_t0 = time.perf_counter()
    limit = _TimeLimit(run, state.step, loop_t0, log) if t.max_time_s is not None else None
    state.window_t0 = time.perf_counter()
    run.model.train()
    if run.tracker is not None:
        run.tracker.start()
    interrupt = _GracefulInterrupt().install()
    try:
        while state.step < t.max_steps:
            state.step += 1
            train_step(run, state)
            out_of_time = t.max_time_s is not None and time.perf_counter() - loop_t0 >= t.max_time_s
            stop = interrupt.requested  # read once: a Ctrl-C arriving later is handled next step
            stop, out_of_time = run.par.any(stop, out_of_time)  # every rank stops at the same step
            last = state.step == t.max_steps or out_of_time or stop
            do_ckpt = last or (t.ckpt_every and state.step % t.ckpt_every == 0)
            # the periodic series includes the last step when it falls on it (curves end where runs do)
            do_eval = t.eval_every and state.step % t.eval_every == 0
            if state.step % t.log_every == 0 or do_ckpt or do_eval or last:
                log_window(run, state, log)
            if limit is not None and not last:
                limit.follow(state.step)  # no host sync: step counts and the clock
            if do_eval:
                periodic_evaluation(run, state)
            if do_ckpt:
                save(run, state)
            if stop:
                resume_with = f"--out {run.dir} --resume"
                log(f"\ninterrupted at step {state.step}: checkpoint saved; continue with {resume_with}")
                raise KeyboardInterrupt
            if out_of_time:
                stopped_early = state.step < t.max_steps
                if stopped_early:
                    if run.pbar is not None:  # the bar ends full: its total was the estimated stop
                        run.pbar.total = state.step
                    _say(run, log, _stop_note(run, state.step, " (checkpoint saved)"))
                break
    finally:
        interrupt.uninstall()
    if run.pbar is not None:
        run.pbar.close()
    if state.last_saved != state.step:
        save(run, state)
    return stopped_early


def train_step(run: Run, state: LoopState) -> None:
    """One optimizer step (``grad_accum`` micro-batches) at ``state.step``; its loss stays on the device."""
    t, model, device = run.cfg.train, run.model, run.device
    state.lr = set_lr(run.optimizer, run.cfg, state.step)
    B, T, A = t.batch_size, run.cfg.model.seq_len, t.grad_accum
    rows = run.par.rows(B)  # this rank's rows of the global batch
    train_tokens = run.data.tokens("train")
    loss_sum = torch.zeros((), device=device)
    for micro in range(A):
        xy = torch.from_numpy(sample_batch(train_tokens, B, T, t.seed, state.step, micro)[rows])
        if device.type == "cuda":
            xy = xy.pin_memory()
        xy = xy.to(device, non_blocking=True)
        with run.par.accumulating(run.forward, micro < A - 1):
            if t.compile:  # with CUDA graphs (reduce-overhead): the last step's outputs are not read again
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, t.precision):
                logits = run.forward(xy[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
            (loss / A).backward()
        loss_sum += loss.detach() / A
    state.norms = run.par.clip_grad_norm(model, t.grad_clip, t.value_grad_clip)
    if state.guard is None or state.guard.optimizer is not run.optimizer:
        state.guard = StepGuard(run.optimizer)
    # a non-finite loss or gradient changes nothing (on several ranks the all-reduced gradients,
    # hence the norms, are non-finite on every rank: they all skip the step)
    state.guard.step(loss_sum, *state.norms)
    run.optimizer.zero_grad(set_to_none=True)
    state.losses.append(loss_sum)
    state.window_steps += 1
    if run.pbar is not None:
        run.pbar.update(1)


def set_lr(optimizer, cfg: Config, step: int) -> float:
    """Set every group's learning rate for ``step``; returns the base (non-value) learning rate.

    The values follow the same warm-up; after it, the schedule too (``value_schedule="same"``) or
    stay at ``value_lr`` (``"constant"``, as the paper's code).
    """
    t = cfg.train
    factor = lr_factor(step, t.schedule, t.warmup_steps, t.lr_decay_steps or t.max_steps, t.min_lr_ratio)
    value_factor = factor
    if t.value_schedule == "constant":
        value_factor = lr_factor(step, "constant", t.warmup_steps, t.max_steps)
    for g in optimizer.param_groups:
        g["lr"] = t.value_lr * value_factor if g.get("name") == "values" else t.lr * factor
    return t.lr * factor


def log_window(run: Run, state: LoopState, log=print) -> dict:
    """Read the window's losses (the loop's one host sync), append a train record to metrics.jsonl,
    TensorBoard and the progress bar. Steps skipped for a non-finite loss or gradient are counted
    (``skipped``) and said; ``max_nonfinite_steps`` of them in a row raise FloatingPointError."""
    if not state.losses:
        return state.last_record
    losses = run.par.mean(torch.stack(state.losses)).tolist()  # over the ranks' rows
    skipped, in_a_row = state.guard.read() if state.guard is not None else (0, 0)
    finite = [v for v in losses if math.isfinite(v)]
    dt = time.perf_counter() - state.window_t0
    state.train_seconds += dt
    rec = {
        "type": "train",
        "step": state.step,
        "tokens": state.step * run.tokens_per_step,
        "loss": float(np.mean(finite)) if finite else math.nan,
        "losses": losses,
        "skipped": skipped,
        "lr": state.lr,
        "grad_norm": float(state.norms[0]),
        "value_grad_norm": float(state.norms[1]),
        "tokens_per_s": state.window_steps * run.tokens_per_step / max(dt, 1e-9),
        "elapsed_s": time.perf_counter() - run.t_start,
    }
    if run.tracker is not None:
        if run.par.distributed:
            run.tracker.all_reduce_(run.par.group)
        mems = memory_report(run.tracker, _layer_of(run.model))
        rec["memories"] = [{"layer": m["layer"], "usage": m["usage"], "kl": m["kl"]} for m in mems]
        run.tracker.reset()
    if run.par.is_main:
        _append_jsonl(run.metrics_path, rec)
    if run.tb is not None:
        run.tb.add_scalar("train/loss", rec["loss"], state.step)
        run.tb.add_scalar("train/lr", state.lr, state.step)
        run.tb.add_scalar("train/tokens_per_s", rec["tokens_per_s"], state.step)
        for m in rec.get("memories", []):
            run.tb.add_scalar(f"memory/L{m['layer']}/usage", m["usage"], state.step)
            run.tb.add_scalar(f"memory/L{m['layer']}/kl", m["kl"], state.step)
    if run.pbar is not None:
        post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if rec.get("memories"):
            post["mem"] = " ".join(f"L{m['layer']}:{100 * m['usage']:.0f}%" for m in rec["memories"])
        run.pbar.set_postfix(post, refresh=False)
    state.losses, state.window_t0, state.window_steps = [], time.perf_counter(), 0
    state.last_record = rec
    limit = run.cfg.train.max_nonfinite_steps
    if in_a_row >= limit:
        raise FloatingPointError(
            f"{in_a_row} steps in a row up to step {state.step} had a non-finite loss or gradient norm "
            f"(max_nonfinite_steps={limit}): stopping; no weight was changed by them and the last "
            "checkpoint is intact. Lower lr or check the data"
        )
    if skipped:
        log(
            f"step {state.step}: skipped {skipped} non-finite step{'s' if skipped > 1 else ''} "
            "(NaN or infinite loss or gradient norm: the weights were left as they were)"
        )
    return rec


def evaluate_split(run: Run, split: str, max_tokens: int | None, progress: bool = False) -> dict:
    """:func:`pkmem.train.evaluate.evaluate` of the model on ``split`` (the training usage paused)."""
    if run.tracker is not None:
        run.tracker.stop()
    splits = run.data.meta["splits"]
    words_per_token = splits["valid"]["words"] / max(1, splits["valid"]["tokens"])
    t = run.cfg.train
    res = evaluate(
        run.model,
        run.data.tokens(split),
        run.cfg.model.seq_len,
        t.eval_batch_size or t.batch_size,
        run.device,
        t.precision,
        max_tokens=max_tokens,
        is_bytes=run.tok.is_bytes,
        words_per_token=words_per_token if split == "valid" else None,
        forward=run.forward if not run.par.distributed else run.model,
        parallel=run.par,
        progress=progress and run.par.is_main,
    )
    if run.tracker is not None:
        run.tracker.start()
    return res


def periodic_evaluation(run: Run, state: LoopState) -> None:
    """``eval_tokens`` of the validation split, recorded in metrics.jsonl and TensorBoard."""
    res = evaluate_split(run, "valid", run.cfg.train.eval_tokens)
    if run.par.is_main:
        _append_jsonl(run.metrics_path, {"type": "eval", "split": "valid", "step": state.step, **res})
    if run.tb is not None:
        run.tb.add_scalar("valid/loss", res["loss"], state.step)
    state.window_t0 = time.perf_counter()


def save(run: Run, state: LoopState) -> Path:
    """A checkpoint of the model, optimizer, RNG states and the run's config at ``state.step``."""
    t, step = run.cfg.train, state.step
    meta = run.data.meta
    ckpt_state = {
        "config": run.cfg.to_dict(),
        "rng": ckpt_lib.rng_state(),
        "data_position": {"step": step, "seed": t.seed, "note": "batches are a function of (seed, step)"},
        "tokens": step * run.tokens_per_step,
        "metrics": {k: v for k, v in state.last_record.items() if k not in ("losses", "memories")},
        "data": {k: meta[k] for k in ("source", "data_path", "fingerprint", "tokenizer", "vocab_size")},
        "pkmem_version": __import__("pkmem").__version__,
        "torch_version": torch.__version__,
    }
    if run.par.distributed:  # every rank writes its part (torch.distributed.checkpoint)
        from pkmem.distributed.checkpoint import save_sharded

        path = save_sharded(
            run.dir,
            step,
            run.model,
            run.optimizer,
            ckpt_state,
            run.tok.to_json(),
            t.keep_checkpoints,
            run.par,
        )
    else:
        path = ckpt_lib.save_checkpoint(
            run.dir, step, run.model, run.optimizer, ckpt_state, run.tok.to_json(), t.keep_checkpoints
        )
    state.last_saved, state.window_t0 = step, time.perf_counter()
    return path


# ---- the end ----------------------------------------------------------------------------------------
def finish(run: Run, state: LoopState, stopped_early: bool, log) -> dict:
    """Evaluate the final model on the validation split, write eval_valid.json and the plots; returns
    the run's summary. A resumed run that had finished already only reports (its records stay)."""
    t, T, tok = run.cfg.train, run.cfg.model.seq_len, run.tok
    res = evaluate_split(run, "valid", t.final_eval_tokens, progress=run.pbar is not None)
    if run.tracker is not None:
        run.tracker.stop()
    valid = run.data.tokens("valid")
    starts = eval_windows(len(valid), T, t.final_eval_tokens)
    targets = np.asarray(valid[(starts[:, None] + np.arange(1, T + 1)).reshape(-1)])
    res["unigram_bits_per_token"] = unigram_bits(run.data.tokens("train"), targets, tok.vocab_size)
    res.update(
        {
            "step": state.step,
            "split": "valid",
            "train_seconds": state.train_seconds,
            "max_steps": t.max_steps,
            "stopped_early": stopped_early,  # before max_steps, by max_time_s
            "stopped_by": "max_time_s" if stopped_early else "max_steps",
        }
    )
    # resumed after the end: nothing was trained and the records stay (unless a crash came between
    # the last checkpoint and them: then they are written now, once)
    finished_before = run.start_step >= t.max_steps and (run.dir / "eval_valid.json").is_file()
    if not finished_before and run.par.is_main:
        if not _has_final_record(run.metrics_path, state.step):
            _append_jsonl(run.metrics_path, {"type": "eval", **res})
        atomic_write_bytes(run.dir / "eval_valid.json", json.dumps(res, indent=1).encode())
    if run.tb is not None:
        run.tb.add_scalar("valid/loss", res["loss"], state.step)
        run.tb.close()
    plots = []
    try:
        from pkmem.train.plot import plot_runs

        plots = plot_runs([run.dir], run.dir / "plots") if run.par.is_main else []
    except ImportError as e:  # matplotlib missing: the run itself is complete
        log(f"no plots: {e}")
    tokens_trained = (state.step - run.start_step) * run.tokens_per_step
    summary = {
        "run_dir": str(run.dir),
        "step": state.step,
        "tokens": state.step * run.tokens_per_step,
        "wall_s": time.perf_counter() - run.t_start,
        "train_tokens_per_s": tokens_trained / max(state.train_seconds, 1e-9),
        "valid": res,
        "plots": [str(p) for p in plots],
        "stopped_early": stopped_early,
    }
    unit = "bits per byte" if tok.is_bytes else "bits per token"
    log(
        f"done: step {state.step}, {summary['tokens']:,} tokens, {summary['wall_s']:.0f} s "
        f"({summary['train_tokens_per_s']:,.0f} training tokens/s)"
    )
    log(
        f"validation: {res['bits_per_token']:.3f} {unit} (loss {res['loss']:.3f}, ppl {res['ppl']:.2f}); "
        f"unigram baseline {res['unigram_bits_per_token']:.3f} {unit}"
    )
    for m in res["memories"]:
        log(f"memory layer {m['layer']}: usage {100 * m['usage']:.1f}%, KL {m['kl']:.3f}")
    log(f"run directory: {run.dir} (checkpoint, {METRICS}, plots/)")
    if stopped_early:
        log(f"note: {_stop_note(run, state.step)}")
    return summary


# ---- the time limit ---------------------------------------------------------------------------------
def _say(run: Run, log, message: str) -> None:
    """``log(message)`` without breaking the progress bar (on a terminal)."""
    bar = run.pbar if run.pbar is not None and not run.pbar.disable and _on_terminal(run.pbar) else None
    if bar is not None:
        bar.clear()
    log(message)
    if bar is not None:
        bar.refresh()


def _on_terminal(bar) -> bool:
    isatty = getattr(getattr(bar, "fp", None), "isatty", None)
    return bool(isatty and isatty())


def _stop_note(run: Run, step: int, saved: str = "") -> str:
    """What stopping at ``step`` by ``max_time_s`` means, and how to go on."""
    t = run.cfg.train
    which = f" nor the {run.cfg.name} preset's documented one" if run.cfg.name in PRESETS else ""
    return (
        f"stopped at step {step} of {t.max_steps} by max_time_s={t.max_time_s:g}{saved}: the result is not "
        f"that of the full run{which}; continue with: pkmem train --out {run.dir} --resume (add "
        "max_time_s=null to run every remaining step)"
    )


class _TimeLimit:
    """With ``max_time_s`` and ``max_steps`` both set: says which one will stop the run (once the speed
    is measured: two seconds of steps after the first, which may compile or warm up) and points the
    progress bar's total, hence its ETA, at the earlier one (updated once a second)."""

    def __init__(self, run: Run, first_step: int, t0: float, log):
        self.run, self.t0, self.log = run, t0, log
        self.first_step, self.t1, self.last = first_step, None, 0.0
        t = run.cfg.train
        self.said = False
        if first_step < t.max_steps:
            _say(
                run,
                log,
                f"limits: max_steps={t.max_steps} and max_time_s={t.max_time_s:g} (seconds of training); "
                "the first one reached stops the run (which one is said once the speed is measured)",
            )

    def follow(self, step: int) -> None:
        t, pbar = self.run.cfg.train, self.run.pbar
        now = time.perf_counter()
        if self.t1 is None:  # the speed is measured from the end of the first step on
            self.t1, self.first_step = now, step
            return
        if now - self.last < 1.0 or step <= self.first_step:
            return
        self.last = now
        rate = (step - self.first_step) / (now - self.t1)  # steps per second
        at_limit = step + rate * max(0.0, t.max_time_s - (now - self.t0))  # the step max_time_s stops at
        by_time = at_limit < t.max_steps
        if pbar is not None:  # the total stays above the step: tqdm drops a total that n passed
            pbar.total = max(step + 1, math.ceil(at_limit)) if by_time else t.max_steps
            pbar.set_description("train (until max_time_s)" if by_time else "train", refresh=False)
        if self.said or now - self.t1 < 2.0:
            return
        self.said = True
        if by_time:
            what = (
                "the preset's documented result" if self.run.cfg.name in PRESETS else "the full run's result"
            )
            message = (
                f"at {rate:.2f} steps/s, max_time_s={t.max_time_s:g} will stop the run at about step "
                f"{at_limit:.0f} of max_steps={t.max_steps}: not {what} (max_time_s=null runs every step)"
            )
        else:
            left = (t.max_steps - step) / rate
            message = (
                f"at {rate:.2f} steps/s, max_steps={t.max_steps} ends the run in about {left / 60:.1f} min, "
                f"within max_time_s={t.max_time_s:g}"
            )
        _say(self.run, self.log, message)


# ---- small pieces -----------------------------------------------------------------------------------
def _layer_of(model) -> dict[str, int]:
    return {name: layer for layer, name, _ in model.memories()}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _has_final_record(path: Path, step: int) -> bool:
    """Whether metrics.jsonl holds the final evaluation of ``step`` (written by :func:`finish`)."""
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("type") == "eval" and r.get("step") == step and "stopped_early" in r:
            return True
    return False


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


class _GracefulInterrupt:
    """The first Ctrl-C ends training after the current step (with a checkpoint); the second aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def install(self) -> _GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, schedulers) too
            self._previous = {
                sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = None


# ---- evaluating a finished run ----------------------------------------------------------------------
def evaluate_run(
    path: str | os.PathLike,
    data: str | None = None,
    data_path: str | None = None,
    split: str = "valid",
    max_tokens: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    log=print,
    progress: bool = False,
) -> dict:
    """Evaluate a run's newest checkpoint (or a checkpoint) on a split of its data or of other data:
    about ``max_tokens`` tokens (None: the whole split); ``progress``: a tqdm bar on stderr."""
    if split not in ("valid", "test", "train"):
        raise not_allowed("--split", split, "valid or test (or train)")
    dev = resolve_device(device)
    overrides = []  # other data: --data alone drops the run's data_path, --data-path alone keeps its source
    if data is not None:
        overrides += [f"data={data}", f"data_path={data_path if data_path is not None else 'null'}"]
    elif data_path is not None:
        overrides.append(f"data_path={data_path}")
    model, cfg, tok, ck = load_run(path, dev, overrides=overrides)
    run_dir = ck["dir"].parent.parent
    data_obj = load_data_for(cfg, run_dir, tokenizer=tok, log=log)  # the run's tokenizer, whatever the data
    stats = data_obj.meta["splits"][split]
    res = evaluate(
        model,
        data_obj.tokens(split),
        cfg.model.seq_len,
        batch_size if batch_size is not None else (cfg.train.eval_batch_size or cfg.train.batch_size),
        dev,
        precision or cfg.train.precision,
        max_tokens=max_tokens,
        is_bytes=tok.is_bytes,
        words_per_token=stats["words"] / max(1, stats["tokens"]),
        progress=progress,
    )
    res.update(
        {
            "split": split,
            "split_tokens": stats["tokens"],
            "step": ck["state"]["step"],
            "checkpoint": str(ck["dir"]),
            "data": cfg.train.data,
            "data_path": cfg.train.data_path,
            "tokenizer": tok.kind,
            "device": str(dev),
            "config": cfg.name,
        }
    )
    return res
