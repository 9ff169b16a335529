"""Run configuration: two flat dataclasses, YAML presets and ``key=value`` overrides.

A run is a :class:`Config`: the model (:class:`pkmem.models.MemoryTransformerConfig`) and the
training (:class:`TrainConfig`). Presets are YAML files shipped in ``pkmem/configs/`` (``tiny``,
``enwik8-small``, ``paper-ablation``, ``paper-12l-1024``) with a ``model:`` and a ``train:`` section;
any YAML file of the same shape works too. Overrides name a field bare (``dim=256``, field names are
unique across the two sections) or with its section (``model.dim=256``); values are parsed by the
field's type (``mem_layers=[3,5]``, ``mem_gate=none``, ``compile=true``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pkmem.models.transformer import MemoryTransformerConfig

__all__ = [
    "TrainConfig",
    "Config",
    "PRESETS",
    "list_presets",
    "load_config",
    "apply_overrides",
    "config_from_dict",
]

PRESETS = ("tiny", "enwik8-small", "paper-ablation", "paper-12l-1024")
DATA_SOURCES = ("stdlib", "enwik8", "text")
TOKENIZERS = ("bytes", "bpe")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


@dataclass
class TrainConfig:
    """Data, optimisation, evaluation and logging of a training run (flat)."""

    # data
    data: str = "stdlib"  # "stdlib" (Python's own library sources), "enwik8" or "text"
    data_path: str | None = None  # enwik8: the file (.gz/.zip ok); text: a file, directory or glob
    tokenizer: str = "bytes"  # "bytes" (vocab 256) or "bpe" (trained on the training split)
    bpe_vocab_size: int = 4096
    cache_dir: str | None = None  # token-id memmaps; default: <run dir>/data
    # batches
    batch_size: int = 16  # sequences per micro-batch, each seq_len tokens
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    # optimisation (AdamW; memory values in their own group)
    lr: float = 3e-4
    value_lr: float = 1e-3
    schedule: str = "cosine"  # "cosine", "inverse_sqrt" (Vaswani et al., the paper) or "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine: final lr = min_lr_ratio * lr
    lr_decay_steps: int | None = None  # cosine horizon (default max_steps); set it to stop early and resume
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    value_weight_decay: float = 0.0
    grad_clip: float = 1.0
    value_grad_clip: float | None = None  # default: grad_clip
    # runtime
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model
    seed: int = 0
    max_time_s: float | None = None  # stop (and checkpoint) after this much training time
    # evaluation, logging, checkpoints
    log_every: int = 10  # steps between loss logs (the only host syncs of the loop)
    eval_every: int = 0  # steps between validation evaluations (0: at the end only)
    eval_tokens: int = 65536  # tokens of the validation split used by periodic evaluations
    final_eval_tokens: int | None = None  # tokens of the final evaluation (None: the whole split)
    eval_batch_size: int | None = None  # default: batch_size
    ckpt_every: int = 0  # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 1
    track_usage: bool = True  # memory usage in the progress bar and the logs
    tensorboard: bool = True  # also log to TensorBoard when torch.utils.tensorboard imports

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field; returns self."""
        choices = [
            ("data", DATA_SOURCES),
            ("tokenizer", TOKENIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("device", DEVICES),
        ]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise _bad(name, getattr(self, name), f"one of {allowed}")
        positive = ["batch_size", "grad_accum", "max_steps", "log_every", "eval_tokens", "keep_checkpoints"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "a positive int")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _bad(name, v, "an int >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise _bad("seed", self.seed, "an int in [0, 2**63)")
        if self.data == "stdlib" and self.data_path is not None:
            raise _bad("data_path", self.data_path, "null with data='stdlib' (pass data=text for your files)")
        for name in ("final_eval_tokens", "eval_batch_size", "lr_decay_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise _bad(name, v, "a positive int or null")
        if not 256 < self.bpe_vocab_size <= 2**20:
            raise _bad("bpe_vocab_size", self.bpe_vocab_size, "an int in (256, 2**20]")
        for name in ("lr", "value_lr", "eps", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise _bad(name, v, "a finite number > 0")
        for name in ("weight_decay", "value_weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise _bad(name, v, "a finite number >= 0")
        if self.value_grad_clip is not None and not 0 < self.value_grad_clip < math.inf:
            raise _bad("value_grad_clip", self.value_grad_clip, "a finite number > 0 or null")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise _bad("max_time_s", self.max_time_s, "a number > 0 or null")
        if not 0 <= self.min_lr_ratio <= 1:
            raise _bad("min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise _bad("betas", list(self.betas), "two numbers in [0, 1)")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class Config:
    """A whole run: ``model`` and ``train`` (and the preset or file it came from)."""

    model: MemoryTransformerConfig = field(default_factory=MemoryTransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def validate(self) -> Config:
        self.train.validate()
        self.model.validate()
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(), "train": self.train.to_dict()}


_SECTIONS = {"model": MemoryTransformerConfig, "train": TrainConfig}


def _owner(key: str) -> tuple[str, str]:
    """``(section, field)`` for an override key, bare or ``section.field``."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {key!r}: sections are model, train")
        if name not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            raise ValueError(f"unknown config key {key!r}: {section} has no field {name!r}")
        return section, name
    for section, cls in _SECTIONS.items():
        if key in {f.name for f in dataclasses.fields(cls)}:
            return section, key
    raise ValueError(f"unknown config key {key!r} (`pkmem train --help-config` lists the keys)")


def _parse_scalar(text: str):
    """A string from the command line or YAML as a Python value (YAML rules, plus 1e-3 floats)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _coerce(name: str, hint, value):
    """``value`` converted to the field type ``hint``; ValueError naming the field otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{name}={value!r} is not allowed")
    if isinstance(value, str) and hint is not str:
        value = _parse_scalar(value)
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be a list such as [1, 2]")
        item = args[0] if args else str
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            return tuple(_coerce(name, item, v) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{name}={list(value)!r} is not allowed: {name} must have {len(args)} items")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be a string")
        return value
    return value


def override_section(key: str) -> str:
    """The section ("model" or "train") an override key belongs to (ValueError if unknown)."""
    return _owner(key)[0]


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _set(cfg: Config, section: str, name: str, value) -> None:
    obj = getattr(cfg, section)
    setattr(obj, name, _coerce(name, _hints(type(obj))[name], value))


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``key=value`` strings to ``cfg`` (in place) and validate it; returns ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not allowed: overrides must be key=value")
        key, value = item.split("=", 1)
        section, name = _owner(key.strip())
        _set(cfg, section, name, value.strip())
    return cfg.validate()


def config_from_dict(d: dict, source: str = "config") -> Config:
    """A :class:`Config` from ``{"name", "model": {...}, "train": {...}}``; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ValueError(
            f"{source}: expected a mapping with 'model' and 'train' sections, got {type(d).__name__}"
        )
    unknown = set(d) - {"name", "model", "train"}
    if unknown:
        raise ValueError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}: allowed are name, model, train"
        )
    cfg = Config(name=str(d.get("name", Path(source).stem)))
    for section in ("model", "train"):
        values = d.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"{source}: unknown key {section}.{name}")
            _set(cfg, section, name, value)
    return cfg


def list_presets() -> list[str]:
    """Names of the presets shipped with pkmem."""
    from importlib import resources

    files = resources.files("pkmem").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name: str) -> tuple[str, str]:
    from importlib import resources

    if name not in list_presets():
        raise ValueError(
            f"--config {name!r} is neither a preset nor an existing YAML file: presets are {list_presets()}"
        )
    return resources.files("pkmem").joinpath("configs", f"{name}.yaml").read_text(), f"preset {name}"


def load_config(name_or_path: str | None = "tiny", overrides: Sequence[str] = ()) -> Config:
    """The preset ``name_or_path`` (or a YAML file), with ``key=value`` overrides, validated."""
    import yaml

    name_or_path = name_or_path or "tiny"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--config {name_or_path!r}: no such file")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {name_or_path!r} is not a UTF-8 text (YAML) file: {e}") from None
    else:
        text, source = _read_preset(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {e}") from None
    cfg = config_from_dict(data or {}, source)
    if "name" not in (data or {}):
        cfg.name = path.stem if source == str(path) else name_or_path
    return apply_overrides(cfg, overrides)


def describe_keys() -> str:
    """One line per config key: section, name, type and default (for ``--help-config``)."""
    lines = []
    for section, cls in _SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            hint = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            lines.append(f"{section}.{f.name:<22} {hint:<26} default {default!r}")
    return "\n".join(lines)
