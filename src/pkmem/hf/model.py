"""Product-key memories inside Hugging Face ``transformers`` decoder models.

:func:`add_memory` puts a :class:`~pkmem.ProductKeyMemory` into chosen transformer blocks, at the
block's MLP:

- ``mode="replace"``: the MLP is swapped for the memory (``block.mlp`` becomes a :class:`MemoryMLP`
  holding it), as in the paper (Lample et al. 2019, Figure 3);
- ``mode="parallel"``: the MLP stays and the memory's output is added to it,
  ``mlp(h) + memory(h)``. The memory is a child of the MLP (``block.mlp.memory``), added by a
  forward hook, so the MLP's own weights keep their names. Its values start at zero by default
  (``zero_init_values=True``): the model's outputs are unchanged until it trains.

In both modes the memory's weights are named ``<blocks>.<i>.mlp.memory.*`` (``model.layers.3.mlp.
memory.values`` in a Llama model). Layers are the 0-based indices of the blocks, as in the module
names; negative indices count from the end.

The memory reads each token on its own, so the KV cache, ``generate()``, ``Trainer``, ``peft`` and
``torch.compile`` work as for the model without memory. The ``attention_mask`` (2-D, 0/1) given to
the module that runs the blocks (``LlamaModel``, ``GPT2Model``, ...; the causal LM passes it on)
reaches the memories: padded tokens read nothing and stay out of the query BatchNorm's statistics.

:func:`add_memory` records what it did in ``model.config.pkmem``, so ``model.save_pretrained(path)``
saves it with the weights, and :func:`from_pretrained` rebuilds the model from the directory.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from pkmem.layer import ProductKeyMemory

__all__ = ["MemoryMLP", "add_memory", "memory_modules", "from_pretrained", "MODES", "CONFIG_KEY"]

MODES = ("replace", "parallel")
# model.config.pkmem = {"format": 1, "memories": [{"layers", "mode", "blocks", "options"}, ...]}
CONFIG_KEY = "pkmem"
FORMAT = 1
_KNOWN_BLOCKS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


# ---- the attention mask, from the model's forward to its memories -------------------------------
class _TokenMask:
    """Holds the ``attention_mask`` of the model's current forward for its memories.

    A forward pre-hook on the model stores it (None when the forward has none); a forward hook
    clears it, except after a training forward with gradients: gradient checkpointing runs the
    blocks again in the backward, and they must see the same mask.
    """

    def __init__(self, position: int | None):
        self.position = position  # index of ``attention_mask`` among the forward's positional args
        self.mask: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if not (module.training and torch.is_grad_enabled()):
            self.mask = None

    def for_tokens(self, h: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``h``'s tokens ``(batch, seq)`` (True = real token), or None."""
        m = self.mask
        if m is None or h.dim() != 3 or m.shape[0] != h.shape[0] or m.shape[1] < h.shape[1]:
            return None
        # with a KV cache the mask covers past and current tokens: the current ones are the last
        return m[:, m.shape[1] - h.shape[1] :].to(device=h.device, dtype=torch.bool)


def _mask_source(model: nn.Module) -> _TokenMask:
    """The :class:`_TokenMask` fed by ``model``'s forward (hooks installed once)."""
    source = getattr(model, "_pkmem_token_mask", None)
    if source is None:
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        position = params.index("attention_mask") if "attention_mask" in params else None
        source = _TokenMask(position)
        model._pkmem_token_mask = source
        model.register_forward_pre_hook(source.before, with_kwargs=True)
        model.register_forward_hook(source.after, with_kwargs=True, always_call=True)
    return source


# ---- the two placements -------------------------------------------------------------------------
class MemoryMLP(nn.Module):
    """A block's MLP replaced by a memory ("replace" mode): ``hidden_states -> memory(hidden_states)``."""

    def __init__(self, memory: ProductKeyMemory, mask: _TokenMask | None = None):
        super().__init__()
        self.memory = memory
        self._mask = mask

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = self._mask.for_tokens(hidden_states) if self._mask is not None else None
        return self.memory(hidden_states, mask)


class _ParallelMemory:
    """Forward hook of an MLP that holds a memory ("parallel" mode): ``output + mlp.memory(input)``."""

    def __init__(self, mask: _TokenMask | None = None):
        self.mask = mask

    def __call__(self, mlp: nn.Module, args: tuple, kwargs: dict, output):
        h = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        mask = self.mask.for_tokens(h) if self.mask is not None else None
        out = mlp.memory(h, mask)
        if isinstance(output, tuple):  # e.g. (hidden_states, router_logits) of a mixture of experts
            return (output[0] + out, *output[1:])
        return output + out


# ---- finding the blocks -------------------------------------------------------------------------
def _is_block_list(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.ModuleList)
        and len(m) > 0
        and all(isinstance(getattr(b, "mlp", None), nn.Module) for b in m)
    )


def _find_blocks(model: nn.Module, blocks: str | None) -> tuple[str, nn.ModuleList]:
    name = type(model).__name__
    if blocks is not None:
        if not isinstance(blocks, str):
            raise _bad("blocks", blocks, "a dotted module path such as 'model.layers', or None")
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            found = None
        if found is None or not _is_block_list(found):
            raise _bad(
                "blocks", blocks, f"the path of an nn.ModuleList of blocks with an `.mlp` submodule in {name}"
            )
        return blocks, found
    for path in _KNOWN_BLOCKS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if _is_block_list(found):
            return path, found
    candidates = [(n, m) for n, m in model.named_modules() if n and _is_block_list(m)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"add_memory cannot find the transformer blocks of {name}: it needs an nn.ModuleList of "
            "blocks that each have an `.mlp` submodule (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, ...); "
            "this model's blocks name their feed-forward part differently"
        )
    names = [n for n, _ in candidates]
    raise ValueError(
        f"add_memory finds several lists of blocks in {name}: {names}; pass blocks=<one of them>"
    )


def _resolve_layers(layers, n: int, where: str) -> list[int]:
    allowed = f"a non-empty list of distinct 0-based block indices in [{-n}, {n}) ({n} blocks at {where})"
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise _bad("layers", layers, allowed)
    out = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
            raise _bad("layers", list(layers), allowed)
        out.append(i % n)
    if len(set(out)) != len(out):
        raise _bad("layers", list(layers), allowed)
    return sorted(out)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    dim = getattr(config, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(
            f"model={type(model).__name__} is not allowed: add_memory needs a transformers model whose "
            "config has an int hidden_size"
        )
    return dim


def _json_options(options: dict) -> dict:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    try:
        json.dumps(out)
    except TypeError as e:
        raise ValueError(
            f"memory options {sorted(options)} are not allowed: every option must be a plain value "
            f"(numbers, strings, lists) to be saved in the model's config ({e})"
        ) from None
    return out


def _has_memory(mlp: nn.Module) -> bool:
    return isinstance(mlp, MemoryMLP) or isinstance(getattr(mlp, "memory", None), ProductKeyMemory)


def add_memory(
    model: nn.Module,
    layers: int | list[int],
    mode: str = "replace",
    *,
    blocks: str | None = None,
    **memory_options,
) -> nn.Module:
    """Put a :class:`~pkmem.ProductKeyMemory` into each of ``layers`` (0-based block indices) of a
    decoder-only ``transformers`` model; returns ``model`` (changed in place).

    Args:
        model: e.g. a ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` or
            ``GPT2LMHeadModel``: its blocks are found at ``model.layers`` / ``transformer.h`` / ...
        layers: 0-based indices of the blocks (as in the module names ``model.layers.<i>``);
            negative ones count from the end.
        mode: "replace" (the memory replaces the block's MLP) or "parallel" (the memory's output is
            added to the MLP's; its values start at zero unless ``zero_init_values=False`` is given,
            so the model computes the same function as before until it trains).
        blocks: the dotted path of the model's list of blocks, if it is not found by itself.
        **memory_options: :class:`~pkmem.ProductKeyMemory` arguments (``heads``, ``num_keys``,
            ``topk``, ``k_dim``, ...) except ``dim`` (the model's ``hidden_size``) and ``values``.

    Each memory is created on the device, in the dtype and in the train/eval mode of the block it
    joins (its BatchNorm uses batch statistics in training, running ones in eval). The
    placement is appended to ``model.config.pkmem`` so that ``save_pretrained`` records it.
    """
    if not isinstance(model, nn.Module):
        raise _bad("model", type(model).__name__, "a transformers model (an nn.Module)")
    if mode not in MODES:
        raise _bad("mode", mode, f"one of {MODES}")
    for key in ("dim", "values"):
        if key in memory_options:
            what = "the model's hidden_size" if key == "dim" else "not supported (each memory has its own)"
            raise ValueError(f"{key}={memory_options[key]!r} is not allowed: {key} is {what}")
    dim = _hidden_size(model)
    path, block_list = _find_blocks(model, blocks)
    idx = _resolve_layers(layers, len(block_list), f"{type(model).__name__}.{path}")
    for i in idx:
        if _has_memory(block_list[i].mlp):
            raise _bad("layers", list(idx), f"blocks without a memory: block {i} ({path}.{i}) has one")
    options = dict(memory_options)
    if mode == "parallel":
        options.setdefault("zero_init_values", True)
    saved_options = _json_options(options)
    with torch.device("meta"):  # the layer checks its own arguments before any change (no allocation)
        ProductKeyMemory(dim, **options)
    # the mask comes from the module that runs the blocks (LlamaModel, GPT2Model: called by the
    # causal LM with the attention mask, whoever calls the causal LM), else from the model itself
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    mask = _mask_source(parent)
    for i in idx:
        block = block_list[i]
        ref = next(iter(block.mlp.parameters()), None)
        with torch.device(ref.device if ref is not None else "cpu"):  # built where it will live
            memory = ProductKeyMemory(dim, **options).train(block.training)  # the model's mode, e.g. eval
        if ref is not None and ref.is_floating_point():
            memory = memory.to(dtype=ref.dtype)
        if mode == "replace":
            block.mlp = MemoryMLP(memory, mask)
        else:
            block.mlp.memory = memory
            block.mlp.register_forward_hook(_ParallelMemory(mask), with_kwargs=True)
    entry = {"layers": idx, "mode": mode, "blocks": path, "options": saved_options}
    spec = copy.deepcopy(getattr(model.config, CONFIG_KEY, None)) or {"format": FORMAT, "memories": []}
    spec["memories"].append(entry)
    setattr(model.config, CONFIG_KEY, spec)
    return model


def memory_modules(model: nn.Module) -> dict[str, ProductKeyMemory]:
    """``{module name: memory}`` of every :class:`~pkmem.ProductKeyMemory` in ``model`` (in order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ProductKeyMemory)}


# ---- loading --------------------------------------------------------------------------------------
def _plain_file(directory: Path, name) -> Path:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"{directory} names a weight file {name!r}: it must be a plain name in that directory"
        )
    return directory / name


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            state.update(load_file(str(_plain_file(directory, name))))
        return state
    raise ValueError(
        f"path={str(directory)!r} is not allowed: it holds no model.safetensors (or sharded index); "
        "save the model with save_pretrained (safetensors, the default)"
    )


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key must be used, and every missing key must be a tied
    copy of a loaded one (``save_pretrained`` saves tied weights once)."""
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(set(state) - set(own))
    loaded_ids = {id(own[k]) for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if id(own[k]) not in loaded_ids)
    if unexpected or missing:
        raise ValueError(
            f"{source} does not match the rebuilt model: {len(missing)} missing weights {missing[:8]}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}"
        )
    model.load_state_dict(state, strict=False)


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    model_class=None,
) -> nn.Module:
    """Rebuild a model saved with ``save_pretrained`` after :func:`add_memory`, from a local directory.

    The base model is built from ``config.json`` (class: the config's ``architectures``, or
    ``model_class``), the memories are added again as ``config.pkmem`` records, and every weight is
    loaded from the safetensors files (strictly: nothing missing, nothing left over). Returns the
    model in eval mode, in ``dtype`` (default: the saved config's) on ``device`` (default CPU).
    ``backend`` overrides the memories' saved ``backend`` option ("auto", "torch", "triton").
    Nothing is downloaded.
    """
    from transformers import AutoConfig

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise _bad("path", str(path), "a local directory written by save_pretrained (with a config.json)")
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    spec = getattr(config, CONFIG_KEY, None)
    if not isinstance(spec, dict) or not isinstance(spec.get("memories"), list):
        raise ValueError(
            f"path={str(path)!r} is not allowed: its config.json has no '{CONFIG_KEY}' section (a model "
            "saved without pkmem memories loads with transformers' own from_pretrained)"
        )
    if spec.get("format") != FORMAT:
        raise ValueError(
            f"{directory}/config.json has pkmem format {spec.get('format')!r}: expected {FORMAT}"
        )
    delattr(config, CONFIG_KEY)  # add_memory writes it again
    cls = _model_class(config, model_class)
    kwargs = {} if dtype is None else {"dtype": dtype}
    build = getattr(cls, "from_config", None) or cls._from_config  # an Auto class, or a model class
    model = build(config, **kwargs)
    for entry in spec["memories"]:
        options = dict(entry.get("options", {}))
        if backend is not None:
            options["backend"] = backend
        add_memory(model, entry["layers"], entry["mode"], blocks=entry.get("blocks"), **options)
    _load_strict(model, _load_weights(directory), str(directory))
    if device is not None:
        model.to(device)
    return model.eval()
