"""``pkmem finetune`` and ``pkmem count-slots``: training a local Hugging Face model with memories from the
command line (the parser is in :mod:`pkmem.cli`; see docs/hf.md, "From the command line").

``pkmem finetune`` loads a model directory (``save_pretrained`` + its tokenizer; nothing is downloaded),
adds memories where asked (:func:`pkmem.hf.add_memory`), and trains it with :func:`pkmem.hf.finetune`
on text files read as ``pkmem train --data text`` reads them (the same train / valid split). It has
``pkmem train``'s run directory::

    RUN/metrics.jsonl       a train record every --log-every steps, an eval record per evaluation
    RUN/finetune.json       the command's settings
    RUN/checkpoints/step_N/ a save_pretrained directory (config.json, safetensors weights, tokenizer)
                            + optimizer.safetensors/json (or the sparse finetuner's state and its
                            background.safetensors) + state.json (step, settings, RNG states) +
                            manifest.json: written atomically, verified whole before a resume
    RUN/model/              the final model: pkmem.hf.from_pretrained("RUN/model") loads it
    RUN/eval_valid.json     the final validation loss (and memory usage and KL)

A batch is a function of ``(seed, step)`` (:func:`pkmem.hf.window_batch`), so ``--resume`` repeats the
uninterrupted run's losses. Ctrl-C (or SIGTERM) stops after the current step with a checkpoint.

``pkmem count-slots`` counts how often background text reads each memory slot
(:func:`pkmem.hf.slot_counts`): the file that ``pkmem finetune --sparse-memory TOP_T --background FILE``
ranks slots against (sparse memory finetuning, :class:`pkmem.hf.SparseMemoryFinetuner`).

``transformers`` is imported when a command runs, never by ``pkmem --help``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pkmem._util import atomic_write_bytes, file_mode, not_allowed
from pkmem.hf.model import CONFIG_KEY, _find_blocks, add_memory, from_pretrained, memory_modules
from pkmem.hf.sparse import OPTIMIZERS, SlotCounts, SparseMemoryFinetuner, slot_counts
from pkmem.hf.train import finetune, tokenize
from pkmem.layer import ProductKeyMemory
from pkmem.metrics import UsageTracker
from pkmem.optim import make_optimizer
from pkmem.train import checkpoint as ckpt_lib
from pkmem.train.data import CHUNK, DOC_SEP, SPLITS, eval_windows, open_source
from pkmem.train.evaluate import evaluate, resolve_device, set_threads
from pkmem.train.loop import (
    METRICS,
    _append_jsonl,
    _GracefulInterrupt,
    _new_run_dir,
    _progress_bar,
    _say,
    _truncate_metrics,
)

__all__ = ["finetune_command", "count_slots_command", "DEFAULTS", "FIXED_ON_RESUME"]

SETTINGS = "finetune.json"
BACKGROUND = "background.safetensors"
MODEL_DIR = "model"
MAX_NONFINITE = 100  # steps in a row with a non-finite loss after which the run stops

# the command's settings (flag names with "_"), their defaults, and what a resumed run keeps
DEFAULTS = {
    "model": None,
    "data": "text",
    "data_path": None,
    "valid_path": None,
    "memory_layers": None,
    "mode": "parallel",
    "memory": {},
    "max_steps": 1000,
    "batch_size": 8,
    "seq_len": 512,
    "lr": 1e-4,
    "value_lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "grad_clip": 1.0,
    "log_every": 10,
    "ckpt_every": 0,
    "keep_checkpoints": 1,
    "eval_every": 0,
    "eval_tokens": 262_144,
    "device": "auto",
    "precision": "auto",
    "seed": 0,
    "threads": None,
    "sparse_memory": None,
    "background": None,
    "sparse_lr": None,
    "sparse_optimizer": "sgd",
}
FIXED_ON_RESUME = (
    "model",
    "data",
    "data_path",
    "valid_path",
    "memory_layers",
    "mode",
    "memory",
    "batch_size",
    "seq_len",
    "lr",
    "value_lr",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "precision",
    "seed",
    "sparse_memory",
    "background",
    "sparse_lr",
    "sparse_optimizer",
)
DENSE_ONLY = ("lr", "value_lr", "weight_decay", "grad_clip")  # not used by sparse memory finetuning


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ---- settings -----------------------------------------------------------------------------------------
def _memory_options(overrides: list[str]) -> dict:
    """``memory.KEY=VALUE`` arguments -> ``{KEY: value}`` (values are YAML: 8, true, [1, 2], swilu)."""
    import yaml

    allowed = [
        n
        for n, p in inspect.signature(ProductKeyMemory.__init__).parameters.items()
        if n not in ("self", "dim", "values") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    options = {}
    for item in overrides:
        key, _, text = item.partition("=")
        name = key.strip().removeprefix("memory.")
        if not key.strip().startswith("memory.") or name not in allowed:
            raise ValueError(
                f"{item!r} is not allowed: pkmem finetune takes memory.KEY=VALUE arguments, KEY one of "
                f"ProductKeyMemory's arguments ({', '.join(allowed)})"
            )
        try:
            options[name] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"{item!r} is not allowed: its value is not a YAML value") from None
    return options


def _given(args, overrides: list[str]) -> dict:
    """The settings the command line gives (flags left out are not in it)."""
    given = {k: getattr(args, k) for k in DEFAULTS if k != "memory" and getattr(args, k, None) is not None}
    if overrides:
        given["memory"] = _memory_options(overrides)
    for key in ("model", "data_path", "valid_path", "background"):
        if key in given:
            given[key] = os.path.abspath(os.path.expanduser(given[key]))  # resumes from anywhere
    return given


def _check(s: dict) -> dict:
    """Every setting's type and range; errors name the flag."""
    ints = {"max_steps": 1, "batch_size": 1, "seq_len": 2, "log_every": 1, "keep_checkpoints": 1}
    ints.update(warmup_steps=0, ckpt_every=0, eval_every=0, seed=0)
    for key, low in ints.items():
        if not isinstance(s[key], int) or s[key] < low:
            raise not_allowed(_flag(key), s[key], f"an int >= {low}")
    for key, positive in (("lr", True), ("value_lr", True), ("grad_clip", True), ("weight_decay", False)):
        v = s[key]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise not_allowed(_flag(key), v, "a finite number " + ("> 0" if positive else ">= 0"))
    if s["eval_tokens"] != "all" and not (isinstance(s["eval_tokens"], int) and s["eval_tokens"] >= 1):
        raise not_allowed("--eval-tokens", s["eval_tokens"], "an int >= 1 or 'all'")
    if s["data"] != "text":
        raise not_allowed("--data", s["data"], "text")
    if s["mode"] not in ("parallel", "replace"):
        raise not_allowed("--mode", s["mode"], "parallel or replace")
    if s["sparse_optimizer"] not in OPTIMIZERS:
        raise not_allowed("--sparse-optimizer", s["sparse_optimizer"], f"one of {OPTIMIZERS}")
    layers = s["memory_layers"]
    if layers is not None and (not isinstance(layers, list) or not layers):
        raise not_allowed("--memory-layers", layers, "comma-separated 0-based block indices, e.g. 1,3")
    if s["memory"] and layers is None:
        raise ValueError(
            f"memory options {sorted(s['memory'])} need --memory-layers: they configure the memories it adds "
            "(a model's own memories keep the options they were saved with)"
        )
    return s


def _check_sparse(s: dict) -> None:
    top_t = s["sparse_memory"]
    if top_t is None:
        for key in ("background", "sparse_lr"):
            if s[key] is not None:
                raise ValueError(
                    f"{_flag(key)} {s[key]!r} is not allowed without --sparse-memory TOP_T: it is a setting "
                    "of sparse memory finetuning"
                )
        return
    if not isinstance(top_t, int) or top_t < 1:
        raise not_allowed("--sparse-memory", top_t, "an int >= 1 (value rows trained per table and step)")
    if s["background"] is None:
        raise ValueError(
            "--sparse-memory needs --background FILE: the slot counts of the model on background data "
            "(write them with pkmem count-slots)"
        )
    lr = s["sparse_lr"]
    if lr is None:
        raise ValueError(
            "--sparse-memory needs --sparse-lr LR: the learning rate of the rows it trains (SGD, the "
            "default --sparse-optimizer, takes much larger rates than AdamW)"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise not_allowed("--sparse-lr", lr, "a finite number > 0")
    if s["memory_layers"] is not None:
        raise ValueError(
            f"--memory-layers {','.join(map(str, s['memory_layers']))} is not allowed with --sparse-memory: "
            "sparse memory finetuning trains the memories the model has (and was counted on with "
            "pkmem count-slots); new memories would be untrained"
        )


def _new_settings(args, overrides: list[str]) -> dict:
    given = _given(args, overrides)
    if given.get("sparse_memory") is not None:
        for key in DENSE_ONLY:
            if key in given:
                raise ValueError(
                    f"{_flag(key)} {given[key]!r} is not allowed with --sparse-memory: sparse memory "
                    "finetuning trains only value rows, at --sparse-lr"
                )
    for key in ("model", "data_path", "out"):
        if getattr(args, key, None) is None:
            raise ValueError(f"pkmem finetune needs {_flag(key)} (see pkmem finetune --help)")
    s = _check({**DEFAULTS, **given})
    _check_sparse(s)
    return s


def _resumed_settings(saved: dict, args, overrides: list[str], source: str) -> dict:
    """The saved settings with the changes a resumed run may take (steps, logging, checkpoints, device)."""
    if not isinstance(saved, dict):
        raise ckpt_lib.CheckpointError(f"checkpoint file {source!r} has no 'settings' of pkmem finetune")
    s = {**DEFAULTS, **saved}
    for key, value in _given(args, overrides).items():
        if key in FIXED_ON_RESUME and value != s[key]:
            raise ValueError(
                f"--resume: {_flag(key) if key != 'memory' else 'memory.*'} {value!r} differs from the "
                f"run's {s[key]!r}; it cannot change when a run is resumed"
            )
        s[key] = value
    return _check(s)


# ---- model, tokenizer and data ------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{e}: pkmem finetune needs transformers: pip install 'pkmem[hf]'") from None
    return transformers


def _model_dir(path: str, flag: str = "--model") -> Path:
    d = Path(path)
    allowed = "a local model directory written by save_pretrained (config.json, weights, tokenizer)"
    if not d.is_dir():
        raise ValueError(f"{flag} {path!r} is not allowed: {flag} must be {allowed}; it is not a directory")
    if not (d / "config.json").is_file():
        raise ValueError(f"{flag} {path!r} is not allowed: {flag} must be {allowed}; it has no config.json")
    return d


def _config(path: Path, flag: str = "--model"):
    """The model directory's transformers config (a clear error for any other config.json)."""
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... for a foreign config
        raise ValueError(
            f"{flag} {str(path)!r} is not allowed: its config.json is not a transformers model's ({e})"
        ) from None


def _saved_memories(path: Path, flag: str = "--model") -> bool:
    """Whether the model directory's config records pkmem memories."""
    return isinstance(getattr(_config(path, flag), CONFIG_KEY, None), dict)


def _load_tokenizer(path: Path, flag: str = "--model"):
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"{flag} {str(path)!r} is not allowed: its tokenizer does not load ({type(e).__name__}: {e}); "
            "save it beside the model with tokenizer.save_pretrained(DIR)"
        ) from None


def _load_model(path: Path, device: torch.device, flag: str = "--model"):
    """The model of a local directory in float32 on ``device``: with its pkmem memories if it has any."""

    transformers = _transformers()
    try:
        if _saved_memories(path, flag):
            return from_pretrained(path, dtype=torch.float32, device=device)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    except ValueError as e:
        if str(e).startswith(flag):
            raise
        raise ValueError(f"{flag} {str(path)!r}: {e}") from None
    except (OSError, KeyError, RuntimeError) as e:  # no weights, a model class transformers lacks, ...
        raise ValueError(
            f"{flag} {str(path)!r} is not allowed: it does not load as a causal language model ({e})"
        ) from None
    return model.to(device)


def _check_layers(layers: list[int], n: int, what: str) -> None:
    if len(set(layers)) != len(layers) or not all(-n <= i < n for i in layers):
        allowed = f"distinct block indices in [{-n}, {n}) (0-based: {what})"
        raise not_allowed("--memory-layers", ",".join(map(str, layers)), allowed)


def _add_memories(model, s: dict, log) -> None:
    """``add_memory`` at ``--memory-layers`` (seeded: the new memories are a function of ``--seed``)."""
    layers = s["memory_layers"]
    if layers is None:
        if not memory_modules(model):
            raise ValueError(
                f"--model {s['model']!r} has no pkmem memories: give --memory-layers I,J (0-based block "
                "indices) to add some"
            )
        return
    path, blocks = _find_blocks(model, None)
    _check_layers(layers, len(blocks), f"{type(model).__name__} has {len(blocks)} blocks at {path}")
    torch.manual_seed(s["seed"])
    try:
        add_memory(model, layers, s["mode"], **s["memory"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"--memory-layers / memory options: {e}") from None
    log(f"added memories at blocks {layers} ({s['mode']}) with options {s['memory'] or 'the defaults'}")


def _split_tokens(source, split: str | None, tokenizer) -> np.ndarray:
    """Token ids of one split of a :func:`pkmem.train.data.open_source` source (None: all its pieces in
    order): each document followed by the EOS token (where pkmem train puts a blank line), long ones
    tokenised in pieces cut after a newline (memory use does not grow with the documents)."""

    out: list[np.ndarray] = []
    buf: list[str] = []
    size = 0

    def emit(text: str, eos: bool) -> None:
        if text or eos:
            out.append(tokenize(tokenizer, text, eos=eos).numpy() if text else _eos(tokenizer))

    for _, piece in source.pieces(only=split):
        if piece == DOC_SEP:  # between two documents
            emit("".join(buf), True)
            buf, size = [], 0
            continue
        buf.append(piece)
        size += len(piece)
        if size >= CHUNK:
            text = "".join(buf)
            cut = text.rfind("\n", 0, len(text) - 1) + 1 or len(text)
            emit(text[:cut], False)
            buf, size = [text[cut:]], len(text) - cut
    if buf:
        emit("".join(buf), True)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _eos(tokenizer) -> np.ndarray:
    eos = getattr(tokenizer, "eos_token_id", None)
    return np.asarray([] if eos is None else [eos], dtype=np.int64)


@contextlib.contextmanager
def _quiet_tokenizer():
    """Without transformers' "sequence longer than the model's maximum" note: the windows are cut later."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _no_transformers_bars():
    """Without transformers' own progress bars (loading and writing weights): the command has its own."""
    _transformers()
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _open_text(path: str, flag: str):
    """The :func:`pkmem.train.data.open_source` of the text files ``path`` names (as pkmem train's
    ``--data text``: the same documents and train / valid / test split)."""

    try:
        return open_source("text", path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag} {path!r}: {e}") from None


def _read_text(path: str, flag: str, tokenizer, splits: tuple) -> tuple[dict, object]:
    """``({split: token ids}, source)`` of the text files ``path`` names; ``splits``: which."""
    source = _open_text(path, flag)
    with _quiet_tokenizer():
        return {split: _split_tokens(source, split, tokenizer) for split in splits}, source


def _all_text(path: str, flag: str, tokenizer) -> tuple[np.ndarray, object]:
    """The token ids of all of the text, and its source: every document whole (a text of few documents,
    which pkmem train cuts by position, in its order)."""
    source = _open_text(path, flag)
    with _quiet_tokenizer():
        if not source.hashed:  # one stream cut by position: read it uncut
            return _split_tokens(source, None, tokenizer), source
        return np.concatenate([_split_tokens(source, split, tokenizer) for split in SPLITS]), source


def _load_data(data_path: str, tokenizer, valid_path: str | None = None) -> tuple[dict, dict]:
    """``({"train", "valid": int64 token ids}, info)``: the train and valid splits of ``--data-path``,
    or with ``--valid-path`` all of ``--data-path`` to train on and all of ``--valid-path`` to validate."""
    if valid_path is None:
        tokens, source = _read_text(data_path, "--data-path", tokenizer, ("train", "valid"))
        fingerprint, description = source.fingerprint, source.description
    else:
        train, source = _all_text(data_path, "--data-path", tokenizer)
        valid, vsource = _all_text(valid_path, "--valid-path", tokenizer)
        tokens = {"train": train, "valid": valid}
        fingerprint = f"{source.fingerprint}+{vsource.fingerprint}"
        description = f"{source.description}, validation on {vsource.description}"
    info = {"source": "text", "data_path": data_path, "valid_path": valid_path, "fingerprint": fingerprint}
    info.update(description=description, train_tokens=len(tokens["train"]), valid_tokens=len(tokens["valid"]))
    return tokens, info


def _check_tokens(tokens: dict, s: dict) -> None:
    n, v = len(tokens["train"]), len(tokens["valid"])
    what = "training split" if s["valid_path"] is None else "--data-path text"
    if n < s["seq_len"]:
        raise not_allowed("--seq-len", s["seq_len"], f"<= the {what}'s {n} tokens (or give more text)")
    if v < 2 and s["valid_path"] is None:
        raise ValueError(
            f"--data-path {s['data_path']!r} gives {v} validation tokens: its held-out split (about 5% of "
            "the text, as pkmem train's) needs 2 or more: give more text, or held-out text with --valid-path"
        )
    if v < 2:
        raise ValueError(f"--valid-path {s['valid_path']!r} gives {v} tokens: validation needs 2 or more")


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """What a finetuning run works with."""

    s: dict
    out: Path
    model: torch.nn.Module
    tokenizer: object
    tokens: dict  # split -> numpy int64 token ids
    data_info: dict
    device: torch.device
    autocast: torch.dtype | None
    optimizer: torch.optim.Optimizer | None = None
    sparse: SparseMemoryFinetuner | None = None
    background: SlotCounts | None = None
    pbar: object | None = None
    t_start: float = field(default_factory=time.perf_counter)
    last_record: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.s["batch_size"] * self.s["seq_len"]


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use else None


def _blocks_of(names) -> dict[str, int | None]:
    """The 0-based block index in each memory's module name (``model.layers.3.mlp.memory`` -> 3)."""
    out = {}
    for name in names:
        parts = name.split(".")
        idx = [int(p) for p in parts[:-2] if p.isdigit()]
        out[name] = idx[-1] if idx else None
    return out


def _memories(report: dict) -> list[dict]:
    blocks = _blocks_of(report)
    return [{"module": n, "block": blocks[n], "usage": r["usage"], "kl": r["kl"]} for n, r in report.items()]


def _make_sparse(job: _Job, background: SlotCounts, source: str) -> None:
    s = job.s
    try:
        job.sparse = SparseMemoryFinetuner(
            job.model, background, s["sparse_memory"], s["sparse_lr"], optimizer=s["sparse_optimizer"]
        )
    except ValueError as e:
        raise ValueError(f"--background {source!r} does not fit the model: {e}") from None
    job.background = background


def _read_background(path: str, device: torch.device) -> SlotCounts:
    if not Path(path).is_file():
        raise not_allowed("--background", path, "a file written by pkmem count-slots; it does not exist")
    try:
        return SlotCounts.load(path, device=device)
    except Exception as e:  # safetensors' own errors for a file that is not one
        raise ValueError(
            f"--background {path!r} is not allowed: --background must be a file written by pkmem count-slots "
            f"({type(e).__name__}: {e})"
        ) from None


def _describe(job: _Job, log) -> None:
    m = job.model
    mems = memory_modules(m)
    values = sum(x.values.numel() for x in {id(x.values): x for x in mems.values()}.values())
    total = sum(p.numel() for p in m.parameters())
    where = ", ".join(
        f"block {b} ({mem.num_slots:,} slots)" for b, mem in zip(_blocks_of(mems).values(), mems.values())
    )
    log(
        f"model: {type(m).__name__}, memories at {where}; {total / 1e6:.2f}M parameters "
        f"({values / 1e6:.2f}M memory values); device {job.device}"
        + (", bf16 autocast" if job.autocast is not None else "")
    )
    info = job.data_info
    log(
        f"data: {info['description']}: {info['train_tokens']:,} training tokens, "
        f"{info['valid_tokens']:,} validation tokens"
    )
    if job.sparse is not None:
        s = job.s
        log(
            f"sparse memory finetuning: the top {s['sparse_memory']} rows per value table and step by TF-IDF "
            f"against {job.background.num_batches} background batches, {s['sparse_optimizer']} at lr "
            f"{s['sparse_lr']:g}; everything else frozen"
        )


def _evaluate(job: _Job, max_tokens: int | str, progress: bool = False) -> dict:
    """Next-token loss of the model on the validation split, with every memory's usage and KL."""

    valid = job.tokens["valid"]
    seq_len = min(job.s["seq_len"], len(valid) - 1)
    tracker = UsageTracker(job.model)
    with tracker:
        res = evaluate(
            job.model,
            valid,
            seq_len,
            job.s["batch_size"],
            job.device,
            "bf16" if job.autocast is not None else "fp32",
            max_tokens=None if max_tokens == "all" else max_tokens,
            is_bytes=False,
            track_usage=False,
            forward=lambda x: job.model(input_ids=x).logits,
            progress=progress,
        )
    res["memories"] = _memories(tracker.report())
    for key in ("bpb", "words_per_s"):
        res.pop(key, None)
    return res


def save(job: _Job, step: int) -> Path:
    """A checkpoint at ``step``: a save_pretrained directory plus the optimizer (or the sparse
    finetuner's state and its background counts), the RNG states and the settings; atomic."""
    from safetensors.torch import save_file

    s = job.s
    opt_state = job.sparse.state_dict() if job.sparse is not None else job.optimizer.state_dict()
    structure, tensors = ckpt_lib.flatten_state(opt_state)
    bad = ckpt_lib._non_finite({n: p.detach() for n, p in job.model.state_dict().items()})
    bad += ckpt_lib._non_finite(tensors)
    if bad:
        raise FloatingPointError(
            f"not writing the checkpoint of step {step}: {bad[0]!r} holds NaN or infinite values; "
            "the run's previous checkpoint is kept"
        )
    root = job.out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, file_mode(directory=True))
        job.model.save_pretrained(str(tmp))
        job.tokenizer.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        if job.background is not None:
            job.background.save(tmp / BACKGROUND)
        import transformers

        state = {
            "format": ckpt_lib.FORMAT,
            "step": step,
            "layout": "hf",
            "command": "pkmem finetune",
            "settings": s,
            "rng": ckpt_lib.rng_state(),
            "data_position": {
                "step": step,
                "seed": s["seed"],
                "note": "batches are a function of (seed, step)",
            },
            "tokens": step * job.tokens_per_step,
            "metrics": {k: v for k, v in job.last_record.items() if k not in ("losses", "memories")},
            "data": job.data_info,
            "pkmem_version": __import__("pkmem").__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        (tmp / ckpt_lib.STATE).write_text(json.dumps(state, indent=1))
        ckpt_lib.sync_files(tmp)
        return ckpt_lib.publish_checkpoint(tmp, final, job.out, s["keep_checkpoints"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_model(job: _Job) -> Path:
    """``RUN/model``: the final model and tokenizer (save_pretrained), replaced atomically."""
    final = job.out / MODEL_DIR
    tmp = Path(tempfile.mkdtemp(dir=job.out, prefix=f".{MODEL_DIR}."))
    try:
        os.chmod(tmp, file_mode(directory=True))
        job.model.save_pretrained(str(tmp))
        job.tokenizer.save_pretrained(str(tmp))
        ckpt_lib.sync_files(tmp)
        old = job.out / f".{MODEL_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        ckpt_lib._fsync_dir(job.out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fit(job: _Job, start: int, log) -> int:
    """Train from step ``start`` to ``--max-steps`` with :func:`pkmem.hf.finetune`, logging, evaluating
    and checkpointing when due; returns the last step. A Ctrl-C (or SIGTERM) stops it after the step
    with a checkpoint and raises KeyboardInterrupt."""

    s, out = job.s, job.out
    losses: list[torch.Tensor] = []
    state = {"step": start, "nonfinite": 0, "skipped": 0, "t0": time.perf_counter()}
    interrupt = _GracefulInterrupt().install()

    def due(every: int, step: int) -> bool:
        return bool(every) and step % every == 0

    def on_step(step: int, loss: torch.Tensor) -> bool:
        losses.append(loss.float())
        state["step"] = step
        state["nonfinite"] = 0 if bool(torch.isfinite(loss)) else state["nonfinite"] + 1
        if state["nonfinite"] >= MAX_NONFINITE:
            raise FloatingPointError(
                f"{MAX_NONFINITE} steps in a row up to step {step} had a non-finite loss: stopping; no "
                "weight was changed by them and the last checkpoint is intact. Lower the learning rate or "
                "check the data"
            )
        if job.pbar is not None:
            job.pbar.update(1)
        return interrupt.requested or due(s["ckpt_every"], step) or due(s["eval_every"], step)

    def on_record(r: dict) -> None:
        dt = time.perf_counter() - state["t0"]
        window = torch.stack(losses).tolist() if losses else []
        rec = {
            "type": "train",
            "step": r["step"],
            "tokens": r["step"] * job.tokens_per_step,
            "loss": r["loss"],
            "losses": window,
            "skipped": r["skipped"] - state["skipped"],  # finetune counts from its start
            "lr": r["lr"],
        }
        if "slots" in r:
            rec["slots"] = r["slots"]
        else:
            rec.update(grad_norm=r["grad_norm"], value_grad_norm=r["value_grad_norm"])
        report = {n: {"usage": m["usage"], "kl": m["kl"]} for n, m in r["memory"].items()}
        rec["memories"] = _memories(report)
        rec["tokens_per_s"] = len(window) * job.tokens_per_step / max(dt, 1e-9)
        rec["elapsed_s"] = time.perf_counter() - job.t_start
        _append_jsonl(out / METRICS, rec)
        job.last_record = rec
        if rec["skipped"]:
            _say(
                job,
                log,
                f"step {r['step']}: {rec['skipped']} step(s) since the last record skipped (non-finite "
                "loss or gradients: no weight changed)",
            )
        if job.pbar is not None:
            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            post["mem"] = " ".join(f"B{m['block']}:{100 * m['usage']:.0f}%" for m in rec["memories"])
            job.pbar.set_postfix(post, refresh=False)
        losses.clear()
        state["t0"], state["skipped"] = time.perf_counter(), r["skipped"]

    try:
        step = start
        while step < s["max_steps"]:
            finetune(
                job.model,
                torch.from_numpy(job.tokens["train"]),
                steps=s["max_steps"],
                start_step=step,
                batch_size=s["batch_size"],
                seq_len=s["seq_len"],
                lr=s["lr"],
                value_lr=s["value_lr"],
                weight_decay=s["weight_decay"],
                warmup_steps=s["warmup_steps"],
                max_grad_norm=s["grad_clip"],
                seed=s["seed"],
                autocast_dtype=job.autocast,
                log_every=s["log_every"],
                callback=on_record,
                optimizer=job.optimizer,
                sparse=job.sparse,
                on_step=on_step,
            )
            step = state["step"]
            if due(s["eval_every"], step):
                res = _evaluate(job, s["eval_tokens"])
                _append_jsonl(out / METRICS, {"type": "eval", "split": "valid", "step": step, **res})
            if due(s["ckpt_every"], step) or step == s["max_steps"] or interrupt.requested:
                save(job, step)
            if interrupt.requested:
                log(
                    f"\ninterrupted at step {step}: checkpoint saved; continue with "
                    f"pkmem finetune --out {out} --resume"
                )
                raise KeyboardInterrupt
            state["t0"], state["skipped"] = time.perf_counter(), 0
    finally:
        interrupt.uninstall()
        if job.pbar is not None:
            job.pbar.close()
    return step


def _finish(job: _Job, step: int, log) -> dict:
    """The final evaluation (eval_valid.json, a metrics record) and the final model (``RUN/model``)."""
    res = _evaluate(job, job.s["eval_tokens"], progress=job.pbar is not None)
    res.update(step=step, split="valid", final=True)
    path = job.out / METRICS
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if not any(r.get("type") == "eval" and r.get("final") and r.get("step") == step for r in records):
        _append_jsonl(path, {"type": "eval", **res})
    atomic_write_bytes(job.out / "eval_valid.json", json.dumps(res, indent=1).encode())
    if job.sparse is not None:
        job.sparse.restore()
    model_dir = _publish_model(job)
    wall = time.perf_counter() - job.t_start
    log(
        f"done: step {step}, {step * job.tokens_per_step:,} tokens, {wall:.0f} s; "
        f"validation loss {res['loss']:.4f} (ppl {res['ppl']:.2f}, {res['tokens']:,} tokens)"
    )
    for m in res["memories"]:
        log(f"memory {m['module']}: usage {100 * m['usage']:.1f}%, KL {m['kl']:.3f}")
    log(f"model: {model_dir} (load it with pkmem.hf.from_pretrained({str(model_dir)!r}))")
    return res


# ---- the commands -------------------------------------------------------------------------------------
def _start_new(args, overrides: list[str], log) -> tuple[_Job, int, bool]:

    s = _new_settings(args, overrides)
    out = Path(args.out)
    _new_run_dir(None, out)  # new or empty: never a run or other files
    device = resolve_device(s["device"])
    model_dir = _model_dir(s["model"])
    config = _config(model_dir)  # a transformers model's: checked before anything else is read
    blocks = getattr(config, "num_hidden_layers", None)
    if s["memory_layers"] is not None and isinstance(blocks, int):  # before the weights load
        _check_layers(s["memory_layers"], blocks, f"the model has {blocks} blocks")
    background = _read_background(s["background"], device) if s["sparse_memory"] else None
    tokenizer = _load_tokenizer(model_dir)
    tokens, info = _load_data(s["data_path"], tokenizer, s["valid_path"])
    _check_tokens(tokens, s)
    model = _load_model(model_dir, device)
    _add_memories(model, s, log)
    job = _Job(s, out, model, tokenizer, tokens, info, device, _autocast_dtype(s["precision"], device))
    if background is not None:
        _make_sparse(job, background, s["background"])
    else:
        job.optimizer = make_optimizer(model, s["lr"], s["value_lr"], weight_decay=s["weight_decay"])
    torch.manual_seed(s["seed"])  # dropout: a function of --seed (a resumed run restores the RNG states)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return job, 0, created


def _start_resumed(args, overrides: list[str], log) -> tuple[_Job, int, bool]:

    if args.out is None:
        raise ValueError("--resume needs --out RUN: the run to continue")
    out = Path(args.out)
    ck = ckpt_lib.load_checkpoint(out)  # verifies all of itself: a clear error if it is damaged
    state, ckpt = ck["state"], ck["dir"]
    if state.get("layout") != "hf":
        raise ValueError(f"--out {str(out)!r} is a run of pkmem train: continue it with pkmem train --resume")
    s = _resumed_settings(state.get("settings"), args, overrides, str(ckpt / ckpt_lib.STATE))
    step = int(state["step"])
    device = resolve_device(s["device"])
    tokenizer = _load_tokenizer(ckpt, "checkpoint")
    tokens, info = _load_data(s["data_path"], tokenizer, s["valid_path"])
    _check_tokens(tokens, s)
    if info["fingerprint"] != state.get("data", {}).get("fingerprint"):
        warnings.warn(
            f"--data-path {s['data_path']!r}: the files changed since the run started (names, sizes or "
            "modification times): the resumed run's batches differ from the uninterrupted run's",
            stacklevel=2,
        )
    model = _load_model(ckpt, device, "checkpoint")
    job = _Job(s, out, model, tokenizer, tokens, info, device, _autocast_dtype(s["precision"], device))
    if s["sparse_memory"]:
        _make_sparse(job, _read_background(str(ckpt / BACKGROUND), device), s["background"])
        if ck["optimizer"]:
            job.sparse.load_state_dict(ck["optimizer"])
    else:
        job.optimizer = make_optimizer(model, s["lr"], s["value_lr"], weight_decay=s["weight_decay"])
        ckpt_lib.check_optimizer_state(job.optimizer, ck["optimizer"], str(ckpt / "optimizer.json"))
        job.optimizer.load_state_dict(ck["optimizer"])
    ckpt_lib.set_rng_state(state.get("rng", {}), str(ckpt / ckpt_lib.STATE))
    _truncate_metrics(out / METRICS, step)
    log(f"resuming {out} from step {step} ({ckpt.name})")
    if step >= s["max_steps"]:
        log(f"the run is already at step {step} >= --max-steps {s['max_steps']}: evaluating only")
    return job, step, False


def finetune_command(args, overrides: list[str], log=print) -> int:
    """``pkmem finetune``: a new run, or ``--resume`` of the run in ``--out``."""
    with _no_transformers_bars():
        return _finetune_command(args, overrides, log)


def _finetune_command(args, overrides: list[str], log) -> int:

    threads = getattr(args, "threads", None)
    set_threads(threads, log)
    job, start, created = (_start_resumed if args.resume else _start_new)(args, overrides, log)
    try:
        atomic_write_bytes(job.out / SETTINGS, json.dumps(job.s, indent=1).encode())
        _describe(job, log)
        if not args.no_progress:
            job.pbar = _progress_bar(job.s["max_steps"], start)
        step = fit(job, start, log) if start < job.s["max_steps"] else start
        _finish(job, step, log)
    except BaseException:
        if created and not ckpt_lib.list_checkpoints(job.out):  # nothing worth keeping
            shutil.rmtree(job.out, ignore_errors=True)
        raise
    return 0


def count_slots_command(args, log=print) -> int:
    """``pkmem count-slots``: slot reads of the model's memories on background text, to a file."""
    with _no_transformers_bars():
        return _count_slots_command(args, log)


def _count_slots_command(args, log) -> int:

    for key in ("batch_size", "seq_len"):
        if getattr(args, key) < 1:
            raise not_allowed(_flag(key), getattr(args, key), "an int >= 1")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a directory: it must be the path of a file to write")
    set_threads(args.threads, log)
    device = resolve_device(args.device)
    model_dir = _model_dir(args.model)
    if not _saved_memories(model_dir):
        raise ValueError(
            f"--model {args.model!r} has no pkmem memories: count slots on the model you will finetune "
            "(e.g. RUN/model of a pkmem finetune run)"
        )
    tokenizer = _load_tokenizer(model_dir)
    if args.split == "all":
        ids, source = _all_text(args.data_path, "--data-path", tokenizer)
    else:
        tokens, source = _read_text(args.data_path, "--data-path", tokenizer, (args.split,))
        ids = tokens[args.split]
    if len(ids) < args.seq_len + 1:
        raise not_allowed("--seq-len", args.seq_len, f"< the {args.split} split's {len(ids)} tokens")
    model = _load_model(model_dir, device)
    starts = eval_windows(len(ids), args.seq_len, args.max_tokens)
    windows = torch.from_numpy(np.asarray(ids[starts[:, None] + np.arange(args.seq_len)], dtype=np.int64))
    batches = windows.split(args.batch_size)
    dtype = _autocast_dtype(args.precision, device)

    def forward(m, batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return m(input_ids=batch.to(device))

    if not args.no_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="count", unit="batch")
    counts = slot_counts(model, batches, forward_fn=forward)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts.save(out)
    log(
        f"counted {counts.num_batches} batches of {args.batch_size} x {args.seq_len} tokens of "
        f"{source.description} ({args.split} split)"
        if args.split != "all"
        else f"{source.description}"
    )
    for name, read in counts.batches_read.items():
        used = int((read > 0).sum())
        log(f"{name}: {used:,} of {read.numel():,} slots read ({100 * used / read.numel():.1f}%)")
    log(f"wrote {out} (pkmem finetune --sparse-memory TOP_T --sparse-lr LR --background {out})")
    return 0
