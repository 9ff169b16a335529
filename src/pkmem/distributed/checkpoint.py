"""Checkpoints of runs on several ranks, with ``torch.distributed.checkpoint`` (DCP).

A distributed run's checkpoint is the same directory as a one-process run's
(``<run>/checkpoints/step_000123/`` with ``state.json`` and ``tokenizer.json``), but its tensors are
DCP files written by every rank in parallel (``.metadata`` and ``__<rank>_0.distcp``), and
``state.json`` says ``"layout": "dcp"``. A sharded value table is saved as the parts of one whole
table (DTensor views of the shards), its optimizer state too; replicated tensors are written once.
So a checkpoint saved on N ranks loads

- on M ranks (any M; the shards are read at their new offsets): :func:`load_sharded`;
- in one process, into a model whose tables are whole (``pkmem eval``, ``generate``, ``--resume``
  without torchrun): :func:`load_sharded` and :func:`load_model`.

And a one-process checkpoint (safetensors) resumes on N ranks: :func:`load_whole` gives each rank
its part. Writing is atomic as for one process: the ranks write into a temporary directory, then
rank 0 adds ``tokenizer.json``, ``state.json`` and the manifest (sizes and sha256 of every file, so the usual
verification applies) and renames the directory into place.

Optimizer state is saved per parameter name (``optimizer.state.<param name>.<key>``), so it does
not depend on how parameters are numbered; the parameter groups (learning rates, betas, ...) are
the run's config, rebuilt on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from pkmem._util import atomic_write_bytes
from pkmem.distributed.parallel import Parallel
from pkmem.distributed.values import ShardedProductKeyMemory
from pkmem.train import checkpoint as ckpt_lib

__all__ = ["LAYOUT", "is_sharded", "save_sharded", "load_sharded", "load_model", "load_whole", "restore_rng"]

LAYOUT = "dcp"


def is_sharded(ck: dict) -> bool:
    """Whether a loaded checkpoint (:func:`pkmem.train.checkpoint.load_checkpoint`) was written by
    the ranks of a distributed run."""
    return ck["state"].get("layout") == LAYOUT


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _shard_modules(model: nn.Module) -> dict[int, ShardedProductKeyMemory]:
    """``{id(shard parameter): its memory}``."""
    return {id(m.values): m for m in model.modules() if isinstance(m, ShardedProductKeyMemory)}


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _is_shard_state(t: torch.Tensor, m: ShardedProductKeyMemory) -> bool:
    """Whether an optimizer state tensor of ``m``'s shard is split as the shard is (param-shaped;
    per-row states for a row layout)."""
    local = tuple(m.values.shape)
    if m.layout == "columns":
        return tuple(t.shape) == local
    return t.dim() >= 1 and t.shape[0] == local[0] and (t.dim() == 1 or tuple(t.shape[1:]) == local[1:])


def _view(local: torch.Tensor, m: ShardedProductKeyMemory, par: Parallel):
    """A DTensor of the whole table's shape over ``local``, this rank's part (no copy, no communication)."""
    from torch.distributed.tensor import DTensor, Shard

    d = 1 if m.layout == "columns" else 0
    return DTensor.from_local(local, par.mesh(local.device.type), [Shard(d)], run_check=False)


def _model_state(model: nn.Module, par: Parallel | None) -> dict:
    """The model's tensors by name (each shared tensor once, as one-process checkpoints), the
    shards as DTensor views of their whole tables."""
    shards = _shard_modules(model)
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        m = shards.get(id(t))
        out[name] = t.detach() if m is None else _view(t.detach(), m, par)
    return out


def _optimizer_state(model: nn.Module, optimizer, par: Parallel) -> dict:
    """``{param name: {key: value}}`` of every wrapped optimizer; shard states as DTensor views."""
    names, shards = _param_names(model), _shard_modules(model)
    out = {}
    for o in _optimizers(optimizer):
        raw = o.state_dict()
        params = [p for g in o.param_groups for p in g["params"]]
        for idx, state in raw["state"].items():
            p = params[idx]
            m = shards.get(id(p))
            out[names[id(p)]] = {
                k: _view(v, m, par) if m is not None and torch.is_tensor(v) and _is_shard_state(v, m) else v
                for k, v in state.items()
            }
    return out


def save_sharded(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer,
    state: dict,
    tokenizer_json: str,
    keep: int,
    par: Parallel,
) -> Path:
    """Every rank writes its part of ``<run_dir>/checkpoints/step_<step>`` (a collective); rank 0
    completes it atomically and keeps the ``keep`` newest checkpoints. Returns its path."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:09d}"
    tmp = root / f".{final.name}.partial"

    def fresh_tmp():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    par.on_main("creating the checkpoint directory", fresh_tmp)
    payload = {
        "model": _model_state(model, par),
        "optimizer": {"state": _optimizer_state(model, optimizer, par)},
    }
    rng = par.gather_objects(ckpt_lib.rng_state(), "saving the random states")
    par.agree(
        "writing the checkpoint's shards",
        lambda: dcp.save(payload, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=par.control),
    )

    def complete() -> Path:
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        full = {
            "format": ckpt_lib.FORMAT,
            "step": step,
            **state,
            "rng": rng[0],
            "rng_ranks": rng,
            "layout": LAYOUT,
            "world_size": par.world_size,
        }
        atomic_write_bytes(tmp / ckpt_lib.STATE, json.dumps(full, indent=1).encode())
        for p in sorted(tmp.iterdir()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        return ckpt_lib.publish_checkpoint(tmp, final, run_dir, keep)

    par.on_main("completing the checkpoint", complete)
    return final


def _read_metadata(ck_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(ck_dir)).read_metadata()
    except Exception as e:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {str(ck_dir)!r}: its DCP metadata could not be read ({e})"
        ) from e


def _load(payload: dict, ck_dir: Path, par: Parallel | None) -> None:
    import torch.distributed.checkpoint as dcp

    group = par.control if par is not None and par.distributed else None
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            dcp.load(payload, checkpoint_id=str(ck_dir), process_group=group)
        except Exception as e:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {str(ck_dir)!r} does not match the model or could not be read: {e}"
            ) from e


def load_model(model: nn.Module, ck_dir: str | os.PathLike, par: Parallel | None = None) -> None:
    """Load a DCP checkpoint's model tensors into ``model`` (whole tables, or this rank's shards)."""
    _load({"model": _model_state(model, par)}, Path(ck_dir), par)


def load_sharded(ck: dict, model: nn.Module, optimizer, par: Parallel) -> None:
    """Load a DCP checkpoint (:func:`save_sharded`, any number of ranks) into ``model`` and
    ``optimizer`` on this rank (a collective when distributed; one process works too)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ck_dir = Path(ck["dir"])
    load_model(model, ck_dir, par)
    if optimizer is None:
        return
    md = _read_metadata(ck_dir)
    by_name = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    shards = _shard_modules(model)
    target: dict = {}
    for key, meta in md.state_dict_metadata.items():
        path = md.planner_data.get(key) if md.planner_data else None
        if not path or path[:2] != ("optimizer", "state") or len(path) != 4:
            continue
        _, _, pname, skey = path
        if pname not in by_name:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {str(ck_dir)!r} holds optimizer state of {pname!r}, a parameter the model lacks"
            )
        value = None  # a non-tensor value (e.g. a step count saved as a Python number): DCP sets it
        if isinstance(meta, TensorStorageMetadata):
            m = shards.get(id(by_name[pname]))
            size, dtype = tuple(meta.size), meta.properties.dtype
            local = _local_shape(size, m) if m is not None else None
            if local is not None:
                value = _view(torch.empty(local, dtype=dtype), m, par)
            else:
                value = torch.empty(size, dtype=dtype)
        target.setdefault(pname, {})[skey] = value
    payload = {"optimizer": {"state": target}}
    _load(payload, ck_dir, par)
    loaded = {
        n: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()}
        for n, s in payload["optimizer"]["state"].items()
    }
    _set_optimizer_state(model, optimizer, loaded)


def _local_shape(size: tuple, m: ShardedProductKeyMemory) -> tuple | None:
    """This rank's part of a saved state tensor of the whole table's ``size``, or None if the state
    is not split as the shard is (see :func:`_is_shard_state`)."""
    full = m.full_shape
    if m.layout == "columns":
        if size != full:
            return None
        return (full[0], full[1] // m.world)
    if len(size) >= 1 and size[0] == full[0] and (len(size) == 1 or size[1:] == full[1:]):
        return (full[0] // m.world, *size[1:])
    return None


def _set_optimizer_state(model: nn.Module, optimizer, loaded: dict) -> None:
    """``optimizer.load_state_dict`` with the per-name states ``loaded`` and the current groups."""
    names = _param_names(model)
    raws = []
    for o in _optimizers(optimizer):
        raw = o.state_dict()
        params = [p for g in o.param_groups for p in g["params"]]
        raw["state"] = {i: loaded[names[id(p)]] for i, p in enumerate(params) if names[id(p)] in loaded}
        raws.append(raw)
    if hasattr(optimizer, "optimizers"):
        optimizer.load_state_dict({"optimizers": raws})
    else:
        optimizer.load_state_dict(raws[0])


def _part(t: torch.Tensor, m: ShardedProductKeyMemory) -> torch.Tensor:
    """This rank's part of a whole-table tensor (the table, or an optimizer state split as it is)."""
    if m.layout == "columns":
        if tuple(t.shape) != m.full_shape:
            return t
        d, sl = m.shard_slice()
        return t[:, sl].clone()
    full = m.full_shape
    if t.dim() >= 1 and t.shape[0] == full[0] and (t.dim() == 1 or tuple(t.shape[1:]) == full[1:]):
        _, sl = m.shard_slice()
        return t[sl].clone()
    return t


def load_whole(ck: dict, model: nn.Module, optimizer, source: str) -> None:
    """Load a one-process checkpoint (whole tables, :func:`pkmem.train.checkpoint.load_checkpoint`)
    into a model with sharded tables: each rank keeps its part."""
    shards = _shard_modules(model)
    by_name = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    tensors = dict(ck["model"])
    for name, t in tensors.items():
        m = shards.get(id(by_name.get(name)))
        if m is not None:
            tensors[name] = _part(t, m)
    ckpt_lib.load_model_state(model, tensors, source)
    if optimizer is None or ck["optimizer"] is None:
        return
    saved = ck["optimizer"]
    raws = saved["optimizers"] if hasattr(optimizer, "optimizers") else [saved]
    for o, raw in zip(_optimizers(optimizer), raws):
        params = [p for g in o.param_groups for p in g["params"]]
        for idx, state in raw.get("state", {}).items():
            m = shards.get(id(params[idx])) if idx < len(params) else None
            if m is not None:
                raw["state"][idx] = {k: _part(v, m) if torch.is_tensor(v) else v for k, v in state.items()}
    optimizer.load_state_dict(saved)


def restore_rng(state: dict, par: Parallel) -> None:
    """Each rank's random state as saved (rank r of a run saved on fewer ranks: rank r mod N's)."""
    ranks = state.get("rng_ranks") or [state.get("rng", {})]
    ckpt_lib.set_rng_state(ranks[par.rank % len(ranks)])
