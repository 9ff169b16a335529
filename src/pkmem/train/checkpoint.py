"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_000123/`` holding

- ``model.safetensors``: the model's state dict (parameters and buffers);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state dict, its tensors flattened
  into the safetensors file and its structure (with placeholders) in the JSON;
- ``tokenizer.json``: the run's tokenizer;
- ``state.json``: step, config, RNG states, metrics, and the size and sha256 of every other file.

It is written into a temporary directory next to it and renamed into place; ``state.json`` is its
last file, so a directory with a valid ``state.json`` whose checksums match is complete. Older
checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pkmem._util import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "flatten_state",
    "unflatten_state",
]

STATE = "state.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt (the message names the file)."""


# ---- nested state <-> (tensors, JSON structure) -------------------------------------------------------
def flatten_state(obj, tensors: dict | None = None, prefix: str = "t"):
    """``(structure, tensors)``: ``obj`` with every tensor replaced by ``{"__tensor__": key}``.

    Dicts with non-string keys, tuples and non-finite floats survive the round trip through JSON.
    """
    tensors = {} if tensors is None else tensors

    def enc(o):
        if isinstance(o, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v) for v in o]}
        if isinstance(o, list):
            return [enc(v) for v in o]
        if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
            return {"__float__": repr(o)}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store a {type(o).__name__} in a checkpoint")

    return enc(obj), tensors


def unflatten_state(structure, tensors: dict):
    """Inverse of :func:`flatten_state`."""

    def dec(o):
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__dict__" in o:
                return {dec(k): dec(v) for k, v in o["__dict__"]}
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            if "__float__" in o:
                return float(o["__float__"])
        return o

    return dec(structure)


# ---- RNG states -------------------------------------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU and CUDA) RNG states as base64 strings."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict) -> None:
    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    if "torch" in state:
        torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# ---- saving -----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _model_tensors(model: torch.nn.Module) -> dict:
    """The state dict with each shared tensor once (safetensors refuses aliases)."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer,
    state: dict,
    tokenizer_json: str,
    keep: int = 1,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` atomically and keep the ``keep`` newest; returns it."""
    from safetensors.torch import save_file

    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}."))
    try:
        save_file(_model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        structure, tensors = flatten_state(optimizer.state_dict() if optimizer is not None else {})
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        files = {}
        for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "tokenizer.json"):
            p = tmp / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        full = {"format": FORMAT, "step": step, **state, "files": files}
        atomic_write_bytes(tmp / STATE, json.dumps(full, indent=1).encode())
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again: move the old copy aside first
            old = ckpt_root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in ckpt_root.glob(".step_*"):  # temporary directories of interrupted saves
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


# ---- loading ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run (those with a state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE).is_file())


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory (its newest) or a checkpoint directory."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    if p.is_file() and p.name == STATE:
        return p.parent
    if not p.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: give a run directory or a checkpoint directory"
        )
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} holds no checkpoint (expected {str(p / 'checkpoints' / 'step_*' / STATE)!r})"
        )
    return found[-1]


def read_state(ckpt: str | os.PathLike, verify: bool = True) -> dict:
    """The checkpoint's ``state.json``; with ``verify``, every file's size and sha256 are checked."""
    ckpt = Path(ckpt)
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "files" not in state:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is not a pkmem checkpoint state (format {FORMAT})"
        )
    if verify:
        for name, info in state["files"].items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(
                    f"checkpoint file {str(f)!r} is truncated or corrupt: "
                    f"{size} bytes, expected {info['bytes']}"
                )
            if _sha256(f) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: its sha256 does not match")
    return state


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint file {str(path)!r} could not be read: {e}") from None


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """``{"dir", "state", "model" (tensors), "optimizer" (a state dict or None)}`` of a checkpoint
    (``model`` and ``optimizer`` None for a distributed run's: :mod:`pkmem.distributed.checkpoint`)."""
    ckpt = find_checkpoint(path)
    state = read_state(ckpt, verify)
    if state.get("layout") == "dcp":  # written by the ranks of a distributed run: pkmem.distributed reads it
        return {"dir": ckpt, "state": state, "model": None, "optimizer": None}
    model = _load_safetensors(ckpt / "model.safetensors")
    optimizer = None
    if (ckpt / "optimizer.json").is_file():
        try:
            structure = json.loads((ckpt / "optimizer.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"checkpoint file {str(ckpt / 'optimizer.json')!r} is corrupt ({e})"
            ) from None
        optimizer = unflatten_state(structure, _load_safetensors(ckpt / "optimizer.safetensors"))
    return {"dir": ckpt, "state": state, "model": model, "optimizer": optimizer}


def load_model_state(model: torch.nn.Module, tensors: dict, source: str = "checkpoint") -> None:
    """Load ``tensors`` into ``model`` (shared tensors may appear once); mismatches raise CheckpointError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    aliases = {}
    ptrs = {}
    for k, t in expected.items():
        ptrs.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else k, k)
        aliases[k] = ptrs[(t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else k]
    missing = [k for k in missing if aliases[k] not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    full = {k: tensors[k] if k in tensors else tensors[aliases[k]] for k in expected}
    for k, t in full.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(t.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(full)
