"""Run configuration: typed dataclasses, YAML presets and ``key=value`` overrides (OmegaConf).

A run is a :class:`Config`: the model (:class:`MemoryTransformerConfig`) and the training
(:class:`TrainConfig`). Presets are YAML files shipped in ``pkmem/configs/`` (``tiny``,
``enwik8-small``, ``paper-ablation``, ``paper-12l-1024``) with a ``model:`` and a ``train:`` section;
any YAML file of the same shape works too. The model's ``memory:`` section holds the arguments of
:class:`pkmem.ProductKeyMemory` under the layer's own names (all but ``dim`` and ``values``), passed
to it unchanged::

    model: {mem_layers: [3], memory: {num_keys: 128, topk: 16, k_dim: 64}}

Overrides name a field bare (``dim=256``: field names are unique across the two sections), with its
section (``model.dim=256``, ``train.lr=1e-3``) or, for the memory, ``memory.topk=16`` (or
``model.memory.topk=16``). Values are YAML (``mem_layers=[3,5]``, ``compile=true``,
``memory.gate=null``); OmegaConf checks each against its field's type. Every field's one-line
description and allowed values are in its dataclass metadata (:func:`config_keys`).

Configs written before the memory section (flat ``mem_heads``, ``mem_topk``, ... keys, in YAML
files, overrides and the ``config`` of old checkpoints) still load: their keys are read as
``memory.heads``, ``memory.topk``, ... with one ``FutureWarning`` per load.

The module imports neither torch nor OmegaConf until a config is built (``pkmem --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkmem._util import not_allowed

__all__ = [
    "MemoryTransformerConfig",
    "TrainConfig",
    "Config",
    "PRESETS",
    "MEM_MODES",
    "default_memory_layers",
    "memory_options",
    "build_memory",
    "list_presets",
    "load_config",
    "config_from_dict",
    "config_keys",
    "override_section",
    "describe_keys",
]

PRESETS = ("tiny", "enwik8-small", "paper-ablation", "paper-12l-1024")
MEM_MODES = ("replace", "parallel", "after")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def _opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with its one-line ``help`` and, if given, its allowed ``choices``."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(obj, f.name) not in choices:
            raise not_allowed(f.name, getattr(obj, f.name), f"one of {choices}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain(v):
    """``v`` with tuples as lists, for JSON."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- the memory section: ProductKeyMemory's own arguments -------------------------------------------
@functools.cache
def memory_options() -> dict[str, Any]:
    """``{name: inspect.Parameter}`` of the arguments a memory section may set: those of
    ``ProductKeyMemory.__init__`` but ``dim`` (the model's) and ``values`` (``mem_share_values``)."""
    import inspect

    from pkmem.layer import ProductKeyMemory

    params = inspect.signature(ProductKeyMemory.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "dim", "values")}


def _check_memory_keys(options: Mapping) -> None:
    unknown = sorted(set(options) - set(memory_options()))
    if unknown:
        raise ValueError(
            f"unknown config key 'memory.{unknown[0]}': the memory section takes ProductKeyMemory's "
            f"arguments: {', '.join(memory_options())}"
        )


def build_memory(options: Mapping, dim: int, values=None):
    """``ProductKeyMemory(dim, **options, values=values)``: a config's memory section made a layer.

    The layer checks its own arguments; its errors name the key as a config spells it
    (``memory.topk=9 is not allowed: ...``).
    """
    from pkmem.layer import ProductKeyMemory

    _check_memory_keys(options)
    try:
        return ProductKeyMemory(dim, **options, values=values)
    except (
        ValueError
    ) as e:  # "topk=9 is not allowed: topk must be ..." -> "memory.topk=9 ... memory.topk ..."
        msg = str(e)
        name = next((n for n in memory_options() if msg.startswith(f"{n}=")), None)
        if name is None:
            raise ValueError(f"memory: {msg}") from None
        msg = msg.replace(f"is not allowed: {name} must", f"is not allowed: memory.{name} must", 1)
        raise ValueError(f"memory.{msg}") from None


def default_memory_layers(n_layers: int, n_memories: int) -> tuple[int, ...]:
    """1-based layers of ``n_memories`` memories spread over ``n_layers`` layers (paper §4.3).

    ``step = ceil(L / (N + 1))`` and memories at ``step * i``, ``i = 1..N``; where that would pass
    layer ``L`` (e.g. 5 layers, 3 memories), ``step = floor(L / (N + 1))`` instead.
    """
    if not _is_int(n_layers) or n_layers < 1:
        raise not_allowed("n_layers", n_layers, "a positive int")
    if not _is_int(n_memories) or not 0 <= n_memories <= n_layers:
        raise not_allowed("n_memories", n_memories, f"an int in [0, n_layers={n_layers}]")
    if n_memories == 0:
        return ()
    step = math.ceil(n_layers / (n_memories + 1))
    if step * n_memories > n_layers:
        step = max(1, n_layers // (n_memories + 1))
    return tuple(step * i for i in range(1, n_memories + 1))


@dataclass
class MemoryTransformerConfig:
    """Everything that defines a :class:`pkmem.models.MemoryTransformer`."""

    vocab_size: int = _opt(256, "vocabulary size (set from the tokenizer by the trainer)")
    seq_len: int = _opt(256, "context length in tokens (learned positions cover this many)")
    dim: int = _opt(512, "model width")
    n_layers: int = _opt(8, "transformer layers")
    n_heads: int = _opt(8, "attention heads (a divisor of dim)")
    ffn_mult: float = _opt(4.0, "FFN hidden size as a multiple of dim")
    dropout: float = _opt(0.0, "dropout of embeddings, attention and FFN, in [0, 1)")
    bias: bool = _opt(True, "biases in the linear layers and LayerNorms")
    norm_position: str = _opt(
        "pre",
        "LayerNorm before each sublayer (pre) or after its residual sum (post, the paper's)",
        ("pre", "post"),
    )
    pos_emb: str = _opt("learned", "position embedding", ("learned", "rotary", "none"))
    rope_base: float = _opt(10000.0, "rotary embedding base (pos_emb=rotary)")
    tie_embeddings: bool = _opt(False, "the output head shares the token embedding")
    mem_layers: tuple[int, ...] | None = _opt(
        None, "1-based layers with a memory ([] for none; null: n_memories spread evenly)"
    )
    n_memories: int | None = _opt(None, "memories spread at regular intervals when mem_layers is null (1)")
    mem_mode: str = _opt("replace", "memory in place of the FFN, beside it, or after the block", MEM_MODES)
    mem_share_values: bool = _opt(False, "all memories read one value table (XLM mem_share_values)")
    memory: dict[str, Any] = _opt(
        {}, "ProductKeyMemory's arguments (heads, num_keys, topk, k_dim, ...), passed unchanged"
    )

    def memory_layers(self) -> tuple[int, ...]:
        """The resolved 1-based memory layers, sorted."""
        if self.mem_layers is not None:
            layers = tuple(self.mem_layers)
            if self.n_memories is not None and self.n_memories != len(layers):
                raise ValueError(
                    f"n_memories={self.n_memories} conflicts with mem_layers={list(layers)}: set only one "
                    "(mem_layers=[] for a model without memory)"
                )
            return tuple(sorted(layers))
        return default_memory_layers(self.n_layers, 1 if self.n_memories is None else self.n_memories)

    def validate(self) -> MemoryTransformerConfig:
        """Raise ValueError naming the first bad field; returns self. The memory section is checked by
        building one ``ProductKeyMemory`` on the meta device (the layer checks its own arguments)."""
        _check_choices(self)
        for name in ("vocab_size", "seq_len", "dim", "n_layers", "n_heads"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise not_allowed(name, v, "a positive int")
        if self.dim % self.n_heads:
            raise not_allowed("n_heads", self.n_heads, f"a divisor of dim={self.dim}")
        if self.pos_emb == "rotary" and (self.dim // self.n_heads) % 2:
            raise not_allowed("n_heads", self.n_heads, "such that dim / n_heads is even (rotary embeddings)")
        if not isinstance(self.ffn_mult, (int, float)) or not 0 < self.ffn_mult < math.inf:
            raise not_allowed("ffn_mult", self.ffn_mult, "a finite number > 0")
        if not isinstance(self.rope_base, (int, float)) or not 0 < self.rope_base < math.inf:
            raise not_allowed("rope_base", self.rope_base, "a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise not_allowed("dropout", self.dropout, "in [0, 1)")
        if self.mem_layers is not None:
            layers = list(self.mem_layers)
            if not all(_is_int(i) and 1 <= i <= self.n_layers for i in layers) or len(set(layers)) != len(
                layers
            ):
                raise not_allowed(
                    "mem_layers", layers, f"distinct 1-based layer indices in [1, n_layers={self.n_layers}]"
                )
        if not isinstance(self.memory, Mapping):
            raise not_allowed("memory", self.memory, "a mapping of ProductKeyMemory's arguments")
        _check_memory_keys(self.memory)
        if self.memory_layers():
            import torch

            with torch.device("meta"):
                build_memory(self.memory, self.dim)
        return self

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


@dataclass
class TrainConfig:
    """Data, optimisation, evaluation and logging of a training run (flat)."""

    # data
    data: str = _opt("stdlib", "Python's library sources, enwik8 or text files", ("stdlib", "enwik8", "text"))
    data_path: str | None = _opt(None, "enwik8: the file (.gz/.zip ok); text: a file, directory or glob")
    tokenizer: str = _opt("bytes", "bytes (vocab 256) or bpe (trained on the train split)", ("bytes", "bpe"))
    bpe_vocab_size: int = _opt(4096, "BPE vocabulary size, in (256, 2**20]")
    follow_symlinks: bool = _opt(False, "text: follow symbolic links that lead out of data_path's directory")
    cache_dir: str | None = _opt(
        None, "where token ids are cached, shared by runs (null: $XDG_CACHE_HOME/pkmem or ~/.cache/pkmem)"
    )
    # batches
    batch_size: int = _opt(16, "sequences per micro-batch, each seq_len tokens (all ranks together)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int = _opt(1000, "optimizer steps (max_time_s may stop the run earlier)")
    # optimisation (AdamW; memory values in their own group)
    lr: float = _opt(3e-4, "peak learning rate")
    value_lr: float = _opt(1e-3, "peak learning rate of the memory values")
    schedule: str = _opt(
        "cosine",
        "after warm-up: cosine, inverse_sqrt (Vaswani et al., the paper) or constant",
        ("cosine", "inverse_sqrt", "constant"),
    )
    warmup_steps: int = _opt(100, "linear warm-up steps")
    min_lr_ratio: float = _opt(0.1, "cosine: final lr = min_lr_ratio * lr, in [0, 1]")
    lr_decay_steps: int | None = _opt(None, "cosine horizon (null: max_steps): set it to stop early, resume")
    betas: tuple[float, float] = _opt((0.9, 0.98), "Adam betas")
    value_betas: tuple[float, float] | None = _opt(None, "the memory values' Adam betas (null: betas)")
    value_schedule: str = _opt(
        "same",
        "the values' lr after warm-up: same (the schedule's) or constant (value_lr, as XLM)",
        ("same", "constant"),
    )
    value_optimizer: str = _opt(
        "adamw",
        "the values' optimizer: adamw (dense, with the rest), lazy_adam (the rows read, the paper's sparse "
        "updates), exact_adam (the rows read, equal to adamw) or sparse_adam (torch's, sparse_values)",
        ("adamw", "lazy_adam", "exact_adam", "sparse_adam"),
    )
    eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.0, "AdamW weight decay of the matrices")
    value_weight_decay: float = _opt(0.0, "weight decay of the memory values")
    grad_clip: float = _opt(1.0, "gradient norm clip of everything but the values")
    value_grad_clip: float | None = _opt(None, "gradient norm clip of the values (null: grad_clip)")
    max_nonfinite_steps: int = _opt(
        5, "a step with a non-finite loss or gradient is skipped; this many in a row stop the run"
    )
    # runtime
    device: str = _opt("auto", "auto (cuda if available), cpu or cuda", ("auto", "cpu", "cuda"))
    precision: str = _opt(
        "auto", "auto (bf16 autocast on cuda, fp32 on cpu), fp32 or bf16", ("auto", "fp32", "bf16")
    )
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt(
        "default",
        "torch.compile's mode with compile=true: reduce-overhead replays the forward and backward from "
        "CUDA graphs (no host launches: the fastest for small models on a GPU)",
        COMPILE_MODES,
    )
    shard_values: bool = _opt(
        False, "on several ranks (torchrun): split each memory's value table over the ranks, not replicate it"
    )
    shard_layout: str = _opt(
        "columns",
        "how shard_values splits a table: columns (v_dim / ranks each) or rows",
        ("columns", "rows"),
    )
    seed: int = _opt(0, "random seed: initialisation and batches (a batch is a function of seed and step)")
    max_time_s: float | None = _opt(
        None, "seconds of training after which the run stops early (with a checkpoint), even before max_steps"
    )
    threads: int | None = _opt(
        None,
        "CPU threads (null: the cores other programs leave free at the start; a resumed run keeps its count)",
    )
    # evaluation, logging, checkpoints
    log_every: int = _opt(10, "steps between loss logs (the only host syncs of the loop)")
    eval_every: int = _opt(0, "steps between validation evaluations (0: at the end only)")
    eval_tokens: int = _opt(65536, "validation tokens of the periodic evaluations")
    final_eval_tokens: int | None = _opt(None, "validation tokens of the final evaluation (null: all)")
    eval_batch_size: int | None = _opt(None, "evaluation batch size (null: batch_size)")
    ckpt_every: int = _opt(0, "steps between checkpoints (0: at the end only)")
    keep_checkpoints: int = _opt(1, "checkpoints kept in the run directory")
    track_usage: bool = _opt(True, "memory usage in the progress bar and the logs")
    tensorboard: bool | None = _opt(
        None, "also log to TensorBoard (null: when it is installed; true: warn when it is not)"
    )

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field; returns self."""
        _check_choices(self)
        positive = ["batch_size", "grad_accum", "max_steps", "log_every", "eval_tokens", "keep_checkpoints"]
        positive.append("max_nonfinite_steps")
        for name in positive:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise not_allowed(name, v, "a positive int")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise not_allowed(name, v, "an int >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise not_allowed("seed", self.seed, "an int in [0, 2**63)")
        if self.data == "stdlib" and self.data_path is not None:
            raise not_allowed(
                "data_path", self.data_path, "null with data='stdlib' (pass data=text for your files)"
            )
        for name in ("final_eval_tokens", "eval_batch_size", "lr_decay_steps"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise not_allowed(name, v, "a positive int or null")
        if not 256 < self.bpe_vocab_size <= 2**20:
            raise not_allowed("bpe_vocab_size", self.bpe_vocab_size, "an int in (256, 2**20]")
        for name in ("lr", "value_lr", "eps", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise not_allowed(name, v, "a finite number > 0")
        for name in ("weight_decay", "value_weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise not_allowed(name, v, "a finite number >= 0")
        if self.value_grad_clip is not None and not 0 < self.value_grad_clip < math.inf:
            raise not_allowed("value_grad_clip", self.value_grad_clip, "a finite number > 0 or null")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise not_allowed("threads", self.threads, "a positive int or null")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise not_allowed("max_time_s", self.max_time_s, "a number > 0 or null")
        if not 0 <= self.min_lr_ratio <= 1:
            raise not_allowed("min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise not_allowed("betas", list(self.betas), "two numbers in [0, 1)")
        if self.compile_mode != "default" and not self.compile:
            raise not_allowed(
                "compile_mode",
                self.compile_mode,
                "'default' with compile=false (set compile=true, or compile_mode=default)",
            )
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum > 1:
            raise not_allowed(
                "compile_mode",
                self.compile_mode,
                f"'default' or 'max-autotune-no-cudagraphs' with grad_accum={self.grad_accum} (a CUDA-graph "
                "replay would overwrite the gradients being accumulated)",
            )
        if self.value_betas is not None and (
            len(self.value_betas) != 2 or not all(0 <= b < 1 for b in self.value_betas)
        ):
            raise not_allowed("value_betas", list(self.value_betas), "two numbers in [0, 1) or null")
        return self

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


@dataclass
class Config:
    """A whole run: ``model`` and ``train`` (and the preset or file it came from)."""

    model: MemoryTransformerConfig = field(default_factory=MemoryTransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def validate(self) -> Config:
        self.train.validate()
        self.model.validate()
        if self.model.memory.get("sparse_values") and self.train.value_weight_decay != 0:
            raise not_allowed(
                "value_weight_decay",
                self.train.value_weight_decay,
                "0.0 with memory.sparse_values=true (SparseAdam has no weight decay)",
            )
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(), "train": self.train.to_dict()}


_SECTIONS = {"model": MemoryTransformerConfig, "train": TrainConfig}
_HELP = "`pkmem train --help-config` lists the keys"


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# ---- configs from before the memory section: flat mem_* keys ----------------------------------------
def _legacy_name(key: str) -> str | None:
    """``memory.<name>`` for an old flat key (``mem_topk`` -> ``topk``); None if ``key`` is not one."""
    if key == "mem_impl":
        return key
    if key.startswith("mem_") and key not in _fields(MemoryTransformerConfig) and key[4:] in memory_options():
        return key[4:]
    return None


def _translate_legacy(model: dict, source: str, seen: list[str]) -> dict:
    """The model section with old flat ``mem_*`` keys moved into ``memory``; ``seen`` gets
    ``"<keys> in <source>"``."""
    old = [k for k in model if isinstance(k, str) and k.startswith("mem_") and _legacy_name(k)]
    if not old:
        return model
    model, memory = dict(model), dict(model.get("memory") or {})
    for key in old:
        value = model.pop(key)
        if key == "mem_impl":
            if value not in ("pkmem", None):
                raise not_allowed(
                    "mem_impl",
                    value,
                    "'pkmem' or left out: other memories plug in through "
                    "MemoryTransformer(config, make_memory=...) (see its docstring)",
                )
            continue
        if _legacy_name(key) in memory:
            raise ValueError(f"{source}: {key} and memory.{key[4:]} are both set: keep memory.{key[4:]}")
        memory[_legacy_name(key)] = value
    model["memory"] = memory
    shown = old if len(old) <= 4 else [*old[:3], f"{len(old) - 3} more"]
    seen.append(f"{', '.join(shown)} in {source}")
    return model


# ---- building a Config from mappings and key=value overrides (OmegaConf does the typing) ------------
def _resolve_key(key: str) -> list[str]:
    """The path of an override key: ``dim`` -> ``[model, dim]``, ``memory.topk`` ->
    ``[model, memory, topk]``; ValueError for a key no config has."""
    parts = key.split(".")
    if parts[0] == "memory":
        parts = ["model", *parts]
    if len(parts) == 1:
        for section, cls in _SECTIONS.items():
            if key in _fields(cls) or (section == "model" and _legacy_name(key)):
                return [section, key]
        raise ValueError(f"unknown config key {key!r} ({_HELP})")
    section, name = parts[0], parts[1]
    if section not in _SECTIONS:
        raise ValueError(f"unknown config section {section!r} in {key!r}: sections are model, train")
    known = name in _fields(_SECTIONS[section]) or (section == "model" and _legacy_name(name))
    if not known:
        raise ValueError(f"unknown config key {key!r}: {section} has no field {name!r}")
    if len(parts) > 2 and name != "memory" or len(parts) > 3:
        raise ValueError(f"unknown config key {key!r}: {section}.{name} has no fields")
    return parts


def override_section(key: str) -> str:
    """The section (``model`` or ``train``) an override key belongs to; ValueError if none has it."""
    return _resolve_key(key.strip())[0]


def _parse_value(path: list[str], text: str):
    """A command-line value: as written for a string field (a path or glob such as ``*.txt``), else
    YAML by OmegaConf's rules (``1e-3`` is a float, ``[1, 2]`` a list)."""
    from omegaconf import OmegaConf

    if len(path) == 2 and path[1] in _fields(_SECTIONS[path[0]]):
        hint = _hints(_SECTIONS[path[0]])[path[1]]
        if hint is str or (_allows_none(hint) and str in typing.get_args(hint)):
            return text.strip()
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text.strip()}"]))["v"]


def _overrides_dict(overrides: Sequence[str]) -> dict:
    """``key=value`` strings as one nested mapping ``{"model": {...}, "train": {...}}``."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise not_allowed("override", item, "key=value")
        key, value = item.split("=", 1)
        path = _resolve_key(key.strip())
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _parse_value(path, value)
    return out


def _allows_none(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _describe_type(hint) -> str:
    """What a field of type ``hint`` takes, in words (``an int``, ``a list of 2 numbers or null``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _allows_none(hint):
        return "true, false or null" if args[0] is bool else f"{_describe_type(args[0])} or null"
    if typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_type(args[0]).split(' ', 1)[1]}s such as [1, 2]"
        return f"a list of {len(args)} {_describe_type(args[0]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _normalise(hint, value):
    """The forms the old parser took that OmegaConf does not: ``none`` for null, ``1e2`` for an
    int, ``3`` for a one-item list."""
    if isinstance(value, str) and value.lower() in ("none", "null", "") and _allows_none(hint):
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typing.get_origin(base) is tuple and isinstance(value, (int, float, str)):
        return [value]
    return value


def _normalise_memory(name: str, value):
    """``none`` is null for the layer's arguments that default to None (``gate``, ``v_dim``)."""
    if isinstance(value, str) and value.lower() in ("none", "") and name in memory_options():
        if memory_options()[name].default is None:
            return None
    return value


def _leaves(data: Mapping, source: str):
    """``(path, name as the user sees it, type hint, value)`` of every value in a config mapping."""
    unknown = set(data) - {"name", "model", "train"}
    if unknown:
        raise ValueError(
            f"{source}: unknown top-level key(s) {sorted(map(str, unknown))}: allowed are name, model, train"
        )
    if "name" in data:
        yield ["name"], "name", str, data["name"]
    for section, cls in _SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        fields = _fields(cls)
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"{source}: unknown key {section}.{name}")
            if name == "memory" and isinstance(value, Mapping):
                for key, v in value.items():
                    yield [section, name, str(key)], f"memory.{key}", Any, v
            else:
                yield [section, name], name, _hints(cls)[name], value


def _set(conf, path: list[str], name: str, hint, value) -> None:
    """``conf.<path> = value``, typed by OmegaConf; the error names the key, the value and its type."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    typed = _normalise_memory(path[-1], value) if hint is Any else _normalise(hint, value)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool and typed is not None and not isinstance(typed, bool):  # OmegaConf takes 2 as True
        raise not_allowed(name, value, _describe_type(hint))
    try:
        OmegaConf.update(conf, ".".join(path), typed, merge=False)
    except OmegaConfBaseException:
        raise not_allowed(name, value, _describe_type(hint)) from None


def config_from_dict(d: Mapping, source: str = "config", overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from ``{"name", "model": {...}, "train": {...}}`` and ``key=value``
    ``overrides``; unknown keys are errors. Old flat ``mem_*`` keys are translated (one FutureWarning)."""
    from omegaconf import OmegaConf

    if not isinstance(d, Mapping):
        raise ValueError(
            f"{source}: expected a mapping with 'model' and 'train' sections, got {type(d).__name__}"
        )
    conf = OmegaConf.structured(Config)
    legacy: list[str] = []
    for where, data in ((source, d), ("overrides", _overrides_dict(overrides))):
        if isinstance(data.get("model"), Mapping):
            data = {**data, "model": _translate_legacy(data["model"], where, legacy)}
        for path, name, hint, value in _leaves(data, where):
            _set(conf, path, name, hint, value)
    if legacy:  # one notice per load
        warnings.warn(
            f"old config keys {'; '.join(legacy)}: mem_<name> is now memory.<name> (the model's memory "
            "section holds ProductKeyMemory's arguments under their own names; mem_impl is gone)",
            FutureWarning,
            stacklevel=2,
        )
    cfg = OmegaConf.to_object(conf)
    if "name" not in d:
        cfg.name = Path(source).stem
    return cfg.validate()


# ---- presets and files ------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the presets shipped with pkmem."""
    from importlib import resources

    files = resources.files("pkmem").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read(name_or_path: str) -> tuple[str, str]:
    """``(YAML text, source)`` of a preset name or a YAML file."""
    from importlib import resources

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--config {name_or_path!r}: no such file")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {name_or_path!r} is not a UTF-8 text (YAML) file: {e}") from None
    if name_or_path not in list_presets():
        raise ValueError(
            f"--config {name_or_path!r} is neither a preset nor an existing YAML file: "
            f"presets are {list_presets()}"
        )
    return resources.files("pkmem").joinpath("configs", f"{name_or_path}.yaml").read_text(), name_or_path


def read_config_file(name_or_path: str) -> tuple[dict, str]:
    """``(mapping, source)`` of a preset or YAML file, as written (not typed, not validated)."""
    from omegaconf import OmegaConf

    text, source = _read(name_or_path)
    try:  # OmegaConf's YAML loader: safe (no Python tags), 1e-3 is a float, duplicate keys are errors
        data = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    except Exception as e:  # yaml's errors and OmegaConf's
        raise ValueError(f"{source} is not valid YAML: {e}") from None
    return data, source


def load_config(name_or_path: str | None = "tiny", overrides: Sequence[str] = ()) -> Config:
    """The preset ``name_or_path`` (or a YAML file), with ``key=value`` overrides, validated."""
    data, source = read_config_file(name_or_path or "tiny")
    return config_from_dict(data, source, overrides)


# ---- description (--help-config) --------------------------------------------------------------------
def _layer_arg_docs() -> dict[str, str]:
    """ProductKeyMemory's argument descriptions, from the ``Args:`` block of its docstring."""
    from pkmem.layer import ProductKeyMemory

    doc = (ProductKeyMemory.__doc__ or "").split("Args:", 1)[-1]
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in doc.splitlines():
        text = line.strip()
        if not text:
            continue
        here = len(line) - len(line.lstrip())
        indent = here if indent is None else indent
        head, sep, rest = text.partition(": ")
        if here == indent and sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            out.update({n: rest for n in names})
        elif here > indent:
            out.update({n: f"{out[n]} {text}" for n in names})
    return out


def _memory_choices() -> dict[str, tuple]:
    """Allowed values of the memory's string options (the layer's own constants)."""
    from pkmem.layer import GATES, QUERY_NORMS
    from pkmem.ops.dispatch import BACKENDS
    from pkmem.ops.reference import SCORES

    return {"query_norm": QUERY_NORMS, "score": SCORES, "gate": GATES, "backend": BACKENDS}


def _memory_type(annotation: str) -> str:
    """A ProductKeyMemory annotation (``"int | None"``, ``"Sequence[int]"``) in the words of
    :func:`_describe_type`."""
    words = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}
    parts = [a.strip() for a in str(annotation).split("|")]
    optional = "None" in parts
    parts = [a for a in parts if a != "None"]
    base = parts[0] if parts else "any"
    if base.startswith(("Sequence[", "tuple[", "list[")):
        text = f"a list of {words.get(base[base.index('[') + 1 : -1].split(',')[0], 'value')[2:].strip()}s"
    else:
        text = words.get(base, base)
    return f"{text} or null" if optional else text


def config_keys(cfg: Config | None = None) -> list[dict]:
    """Every config key: ``{"key", "type", "default", "help", "choices"}`` (``choices`` may be None);
    the memory's keys come from ProductKeyMemory's signature and docstring. With ``cfg``,
    ``default`` is the value ``cfg`` gives the key (what a command with that config uses)."""
    rows = []
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name == "memory":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if cfg is not None:
                default = getattr(getattr(cfg, section), f.name)
            rows.append(
                {
                    "key": f"{section}.{f.name}",
                    "type": _describe_type(_hints(cls)[f.name]),
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "choices": f.metadata.get("choices"),
                }
            )
    docs = _layer_arg_docs()
    choices = _memory_choices()
    for name, p in memory_options().items():
        rows.append(
            {
                "key": f"model.memory.{name}",
                "type": _memory_type(p.annotation),
                "default": cfg.model.memory.get(name, p.default) if cfg is not None else p.default,
                "help": docs.get(name, "").replace("``", "").rstrip("."),
                "choices": choices.get(name),
            }
        )
    return rows


def _show(value) -> str:
    """A config value as YAML writes it (``null``, ``true``, ``[3]``, ``3.0e-3`` as ``0.003``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def describe_keys(cfg: Config | None = None) -> str:
    """One line per config key: its value (``cfg``'s, else the default), what it takes and what it
    does; ``*`` marks a value that ``cfg`` sets (a preset, a file or an override), not the default."""
    defaults = {r["key"]: r["default"] for r in config_keys()}
    rows = config_keys(cfg)
    width_key = max(len(r["key"]) for r in rows)
    shown = [_show(r["default"]) for r in rows]
    width_val = min(24, max(len(v) for v in shown))
    lines = []
    for row, value in zip(rows, shown):
        mark = "*" if cfg is not None and _plain(row["default"]) != _plain(defaults[row["key"]]) else " "
        allowed = f"one of {', '.join(_show(c) for c in row['choices'])}" if row["choices"] else row["type"]
        lines.append(f"{row['key']:<{width_key}} {mark}{value:<{width_val}}  {row['help']} [{allowed}]")
    return "\n".join(lines)
