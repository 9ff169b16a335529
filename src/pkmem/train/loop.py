"""The training loop (explicit, nanoGPT style): data, model, AdamW with value groups, schedule, logs,
periodic evaluation, atomic checkpoints and exact resumption.

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
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pkmem.config import Config, config_from_dict
from pkmem.models import MemoryTransformer
from pkmem.train import checkpoint as ckpt_lib
from pkmem.train.data import (
    TokenData,
    eval_windows,
    prepare_data,
    sample_batch,
    source_fingerprint,
    unigram_bits,
)
from pkmem.train.evaluate import autocast, evaluate, memory_report, resolve_device
from pkmem.train.tokenizer import atomic_write_bytes, load_tokenizer

__all__ = ["train", "lr_factor", "default_run_dir", "load_data_for", "build_model", "load_run"]

METRICS = "metrics.jsonl"


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
    raise ValueError(
        f"schedule={schedule!r} is not allowed: schedule must be cosine, inverse_sqrt or constant"
    )


def default_run_dir(cfg: Config, root: str | os.PathLike = "runs") -> Path:
    """``runs/<config>-<data>-<timestamp>`` under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{cfg.name}-{cfg.train.data}-{stamp}"
    n = 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = Path(root) / f"{cfg.name}-{cfg.train.data}-{stamp}-{n}"
    return path


def load_data_for(cfg: Config, run_dir: Path, tokenizer=None, log=print) -> TokenData:
    """The token data of a run's config (cached under ``cache_dir`` or ``<run_dir>/data``)."""
    t = cfg.train
    cache = Path(t.cache_dir) if t.cache_dir else Path(run_dir) / "data"
    return prepare_data(
        t.data,
        t.data_path,
        cache,
        tokenizer if tokenizer is not None else t.tokenizer,
        t.bpe_vocab_size,
        min_tokens=cfg.model.seq_len + 1,
        log=log,
    )


def build_model(cfg: Config, device: torch.device, make_memory=None) -> MemoryTransformer:
    torch.manual_seed(cfg.train.seed)
    return MemoryTransformer(cfg.model, make_memory).to(device)


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
    """``(model, config, tokenizer, checkpoint)`` of a run directory or checkpoint directory."""
    ck = ckpt_lib.load_checkpoint(path, verify=verify)
    cfg = config_from_dict(ck["state"]["config"], f"{ck['dir'] / ckpt_lib.STATE}")
    tok = load_tokenizer(ck["dir"] / "tokenizer.json")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model = MemoryTransformer(cfg.model)
    ckpt_lib.load_model_state(model, ck["model"], str(ck["dir"] / "model.safetensors"))
    return model.to(device).eval(), cfg, tok, ck


def _set_lr(optimizer, cfg: Config, factor: float) -> float:
    for g in optimizer.param_groups:
        base = cfg.train.value_lr if g.get("name") == "values" else cfg.train.lr
        g["lr"] = base * factor
    return cfg.train.lr * factor


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def _usage_tracker(model, enabled: bool):
    if not enabled or not model.memories():
        return None
    from pkmem.metrics import UsageTracker

    return UsageTracker(model)


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _fmt_mem(memories: list[dict]) -> str:
    return " ".join(f"L{m['layer']}:{100 * m['usage']:.0f}%" for m in memories)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


FIXED_ON_RESUME = ("data", "data_path", "tokenizer", "bpe_vocab_size", "batch_size", "grad_accum", "seed")


def _config_file_name(path: str) -> str | None:
    """The ``name:`` a YAML config file gives itself, if it is a readable file that has one."""
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception:  # not a file, not YAML: then the name is the preset's or the file's stem
        return None
    return data.get("name") if isinstance(data, dict) else None


def _resume_config(saved: dict, source: str, overrides: list[str], config_name: str | None) -> Config:
    """The saved config with ``overrides`` of train settings that do not change what is computed."""
    from pkmem.config import override_section

    if config_name is not None and saved.get("name") not in (
        config_name,
        Path(config_name).stem,
        _config_file_name(config_name),
    ):
        raise ValueError(
            f"--config {config_name!r} differs from the run's config {saved.get('name')!r}: a resumed run "
            "keeps its config (leave --config out with --resume)"
        )
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if override_section(key) == "model":
            raise ValueError(f"--resume: {key} is a model setting and cannot change when a run is resumed")
    cfg = config_from_dict(saved, source, overrides)
    before = saved["train"]
    if cfg.train.data_path is not None and before["data_path"] is not None:
        if _absolute(cfg.train.data_path) == _absolute(before["data_path"]):
            cfg.train.data_path = before["data_path"]  # the same files, written another way
    for key in FIXED_ON_RESUME:
        if cfg.train.to_dict()[key] != before[key]:
            raise ValueError(
                f"--resume: {key}={getattr(cfg.train, key)!r} differs from the run's "
                f"{before[key]!r}; it cannot change when a run is resumed"
            )
    return cfg


def train(
    cfg: Config | None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
    config_name: str | None = None,
    progress: bool = True,
    log=print,
    make_memory=None,
) -> dict:
    """Train (or, with ``resume``, continue) a run; returns the final summary dict.

    ``cfg`` is the run's config; with ``resume`` it is not needed: the saved config is used, with
    ``max_steps`` and ``overrides`` of train settings that keep the run the same (``config_name``,
    if given, must be the run's). Writes ``<run_dir>/metrics.jsonl``,
    ``checkpoints/``, ``tokenizer.json``, ``config.json``, ``eval_valid.json`` and ``plots/``.
    """
    overrides = list(overrides or [])
    resumed = None
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --out RUN_DIR: the run to continue")
        run_dir = Path(run_dir)
        ck = ckpt_lib.load_checkpoint(run_dir)  # verifies sizes and checksums: clear error if corrupt
        if max_steps is not None:
            overrides.append(f"max_steps={max_steps}")
        source = str(ck["dir"] / ckpt_lib.STATE)
        cfg, resumed = _resume_config(ck["state"]["config"], source, overrides, config_name), ck
    else:
        if cfg is None:
            raise ValueError("train() needs a config")
        if max_steps is not None:
            cfg.train.max_steps = max_steps
            cfg.validate()
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
        if cfg.train.data_path is not None:  # absolute: the run resumes and evaluates from anywhere
            cfg.train.data_path = _absolute(cfg.train.data_path)
    t = cfg.train
    if t.data != "stdlib":  # a missing --data-path is reported before anything is written
        source_fingerprint(t.data, t.data_path)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, run_dir, resumed, progress, log, make_memory)
    except BaseException:
        if created and not ckpt_lib.list_checkpoints(run_dir):  # nothing worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


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


def _train(cfg: Config, run_dir: Path, resumed: dict | None, progress: bool, log, make_memory) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    t_start = time.perf_counter()

    # data and tokenizer
    run_tok = load_tokenizer(resumed["dir"] / "tokenizer.json") if resumed else None
    data = load_data_for(cfg, run_dir, tokenizer=run_tok, log=log)
    tok = data.tokenizer
    cfg.model.vocab_size = tok.vocab_size
    tok.save(run_dir / "tokenizer.json")
    train_tokens = data.tokens("train")

    # model and optimizer
    from pkmem.optim import clip_grad_norm, make_optimizer

    model = build_model(cfg, device, make_memory)
    optimizer = make_optimizer(
        model,
        lr=t.lr,
        value_lr=t.value_lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        value_weight_decay=t.value_weight_decay,
    )
    step = 0
    if resumed:
        ckpt_lib.load_model_state(model, resumed["model"], str(resumed["dir"] / "model.safetensors"))
        if resumed["optimizer"] is not None:
            optimizer.load_state_dict(resumed["optimizer"])
        ckpt_lib.set_rng_state(resumed["state"].get("rng", {}))
        step = int(resumed["state"]["step"])
        _truncate_metrics(run_dir / METRICS, step)
        log(f"resuming {run_dir} from step {step} ({resumed['dir'].name})")
        if step >= t.max_steps:
            log(f"the run is already at step {step} >= max_steps={t.max_steps}: evaluating only")
    finished_before = bool(resumed) and step >= t.max_steps  # its records are written already
    atomic_write_bytes(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
    forward = torch.compile(model) if t.compile else model
    n_params = model.num_parameters()
    n_dense = model.num_parameters(values=False)
    log(
        f"model: {cfg.model.n_layers} layers, dim {cfg.model.dim}, memories at layers "
        f"{list(model.mem_layer_indices) or 'none'} ({cfg.model.mem_mode}); {n_params / 1e6:.2f}M parameters "
        f"({n_dense / 1e6:.2f}M without memory values); device {device}"
    )
    log(f"data: {data.meta['description']}, {len(train_tokens):,} training tokens ({tok.kind} tokenizer)")

    B, T, A = t.batch_size, cfg.model.seq_len, t.grad_accum
    tokens_per_step = B * T * A
    words_per_token = data.meta["splits"]["valid"]["words"] / max(1, data.meta["splits"]["valid"]["tokens"])
    eval_bs = t.eval_batch_size or B
    tracker = _usage_tracker(model, t.track_usage)
    layer_of = {name: layer for layer, name, _ in model.memories()}
    tb = _tensorboard(run_dir, t.tensorboard)
    metrics_path = run_dir / METRICS
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        pbar = tqdm(
            total=t.max_steps,
            initial=step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.2 if tty else 15.0,  # a log file gets a line every 15 s, not a flood
        )

    def do_eval(split: str, max_tokens: int | None) -> dict:
        if tracker is not None:
            tracker.stop()
        res = evaluate(
            model,
            data.tokens(split),
            T,
            eval_bs,
            device,
            t.precision,
            max_tokens=max_tokens,
            is_bytes=tok.is_bytes,
            words_per_token=words_per_token if split == "valid" else None,
            forward=forward,
        )
        if tracker is not None:
            tracker.start()
        return res

    step_losses: list[torch.Tensor] = []
    window_t0, window_steps = time.perf_counter(), 0
    train_seconds = 0.0
    last_saved = step if resumed else -1
    last_record: dict = {}
    stopped_early = False
    model.train()
    if tracker is not None:
        tracker.start()

    def flush_log(step: int, lr: float, norms) -> dict:
        nonlocal window_t0, window_steps, step_losses, train_seconds
        if not step_losses:
            return last_record
        losses = torch.stack(step_losses).tolist()  # the one host sync of a logging window
        dt = time.perf_counter() - window_t0
        train_seconds += dt
        rec = {
            "type": "train",
            "step": step,
            "tokens": step * tokens_per_step,
            "loss": float(np.mean(losses)),
            "losses": losses,
            "lr": lr,
            "grad_norm": float(norms[0]),
            "value_grad_norm": float(norms[1]),
            "tokens_per_s": window_steps * tokens_per_step / max(dt, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
        }
        if tracker is not None:
            mems = memory_report(tracker, layer_of)
            rec["memories"] = [{"layer": m["layer"], "usage": m["usage"], "kl": m["kl"]} for m in mems]
            tracker.reset()
        _append_jsonl(metrics_path, rec)
        if tb is not None:
            tb.add_scalar("train/loss", rec["loss"], step)
            tb.add_scalar("train/lr", lr, step)
            tb.add_scalar("train/tokens_per_s", rec["tokens_per_s"], step)
            for m in rec.get("memories", []):
                tb.add_scalar(f"memory/L{m['layer']}/usage", m["usage"], step)
                tb.add_scalar(f"memory/L{m['layer']}/kl", m["kl"], step)
        if pbar is not None:
            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("memories"):
                post["mem"] = _fmt_mem(rec["memories"])
            pbar.set_postfix(post, refresh=False)
        step_losses, window_t0, window_steps = [], time.perf_counter(), 0
        return rec

    def save(step: int) -> Path:
        state = {
            "config": cfg.to_dict(),
            "rng": ckpt_lib.rng_state(),
            "data_position": {"step": step, "seed": t.seed, "note": "batches are a function of (seed, step)"},
            "tokens": step * tokens_per_step,
            "metrics": {k: v for k, v in last_record.items() if k not in ("losses", "memories")},
            "data": {
                k: data.meta[k] for k in ("source", "data_path", "fingerprint", "tokenizer", "vocab_size")
            },
            "pkmem_version": __import__("pkmem").__version__,
            "torch_version": torch.__version__,
        }
        return ckpt_lib.save_checkpoint(
            run_dir, step, model, optimizer, state, tok.to_json(), t.keep_checkpoints
        )

    lr = cfg.train.lr
    norms = (torch.zeros(()), torch.zeros(()))
    loop_t0 = time.perf_counter()
    interrupt = _GracefulInterrupt().install()
    try:
        while step < t.max_steps:
            step += 1
            factor = lr_factor(
                step, t.schedule, t.warmup_steps, t.lr_decay_steps or t.max_steps, t.min_lr_ratio
            )
            lr = _set_lr(optimizer, cfg, factor)
            loss_sum = torch.zeros((), device=device)
            for micro in range(A):
                xy = torch.from_numpy(sample_batch(train_tokens, B, T, t.seed, step, micro))
                if device.type == "cuda":
                    xy = xy.pin_memory()
                xy = xy.to(device, non_blocking=True)
                with autocast(device, t.precision):
                    logits = forward(xy[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
                (loss / A).backward()
                loss_sum += loss.detach() / A
            norms = clip_grad_norm(model, t.grad_clip, t.value_grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss_sum)
            window_steps += 1
            if pbar is not None:
                pbar.update(1)
            out_of_time = t.max_time_s is not None and time.perf_counter() - loop_t0 >= t.max_time_s
            stop = interrupt.requested  # read once: a Ctrl-C arriving later is handled next step
            last = step == t.max_steps or out_of_time or stop
            do_ckpt = last or (t.ckpt_every and step % t.ckpt_every == 0)
            do_eval_now = t.eval_every and step % t.eval_every == 0 and not last
            if step % t.log_every == 0 or do_ckpt or do_eval_now or last:
                last_record = flush_log(step, lr, norms)
                if not math.isfinite(last_record["loss"]):
                    raise FloatingPointError(
                        f"the training loss is {last_record['loss']} at step {step}: lower lr"
                    )
            if do_eval_now:
                res = do_eval("valid", t.eval_tokens)
                _append_jsonl(metrics_path, {"type": "eval", "split": "valid", "step": step, **res})
                if tb is not None:
                    tb.add_scalar("valid/loss", res["loss"], step)
                window_t0 = time.perf_counter()
            if do_ckpt:
                save(step)
                last_saved = step
                window_t0 = time.perf_counter()
            if stop:
                log(f"\ninterrupted at step {step}: checkpoint saved; continue with --out {run_dir} --resume")
                raise KeyboardInterrupt
            if out_of_time:
                stopped_early = step < t.max_steps
                if stopped_early:
                    log(f"max_time_s={t.max_time_s} reached at step {step}: stopping (checkpoint saved)")
                break
    finally:
        interrupt.uninstall()
    if pbar is not None:
        pbar.close()
    if last_saved != step:
        save(step)

    # final evaluation on the validation split
    res = do_eval("valid", t.final_eval_tokens)
    if tracker is not None:
        tracker.stop()
    valid = data.tokens("valid")
    starts = eval_windows(len(valid), T, t.final_eval_tokens)
    targets = np.asarray(valid[(starts[:, None] + np.arange(1, T + 1)).reshape(-1)])
    res["unigram_bits_per_token"] = unigram_bits(train_tokens, targets, tok.vocab_size)
    res.update(
        {"step": step, "split": "valid", "train_seconds": train_seconds, "stopped_early": stopped_early}
    )
    if not finished_before:  # a resumed finished run only reports: its records stay as they are
        _append_jsonl(metrics_path, {"type": "eval", **res})
        atomic_write_bytes(run_dir / "eval_valid.json", json.dumps(res, indent=1).encode())
    if tb is not None:
        tb.add_scalar("valid/loss", res["loss"], step)
        tb.close()
    plots = []
    try:
        from pkmem.train.plot import plot_runs

        plots = plot_runs([run_dir], run_dir / "plots")
    except ImportError as e:  # matplotlib missing: the run itself is complete
        log(f"no plots: {e}")
    summary = {
        "run_dir": str(run_dir),
        "step": step,
        "tokens": step * tokens_per_step,
        "wall_s": time.perf_counter() - t_start,
        "train_tokens_per_s": (step - (int(resumed["state"]["step"]) if resumed else 0))
        * tokens_per_step
        / max(train_seconds, 1e-9),
        "valid": res,
        "plots": [str(p) for p in plots],
    }
    unit = "bits per byte" if tok.is_bytes else "bits per token"
    log(
        f"done: step {step}, {summary['tokens']:,} tokens, {summary['wall_s']:.0f} s "
        f"({summary['train_tokens_per_s']:,.0f} training tokens/s)"
    )
    log(
        f"validation: {res['bits_per_token']:.3f} {unit} (loss {res['loss']:.3f}, ppl {res['ppl']:.2f}); "
        f"unigram baseline {res['unigram_bits_per_token']:.3f} {unit}"
    )
    for m in res["memories"]:
        log(f"memory layer {m['layer']}: usage {100 * m['usage']:.1f}%, KL {m['kl']:.3f}")
    log(f"run directory: {run_dir} (checkpoint, {METRICS}, plots/)")
    return summary


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
) -> dict:
    """Evaluate a run's newest checkpoint (or a checkpoint) on a split of its data or of other data."""
    if split not in ("valid", "test", "train"):
        raise ValueError(f"--split {split!r} is not allowed: split must be valid or test (or train)")
    dev = resolve_device(device)
    model, cfg, tok, ck = load_run(path, dev)
    run_dir = ck["dir"].parent.parent
    if data is not None or data_path is not None:
        cfg.train.data = data or cfg.train.data
        cfg.train.data_path = data_path if data_path is not None else (None if data else cfg.train.data_path)
        cfg.train.validate()
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
    )
    res.update(
        {
            "split": split,
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
