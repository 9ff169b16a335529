"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically, verified whole.

A checkpoint is a directory ``<run>/checkpoints/step_000123/`` holding

- ``model.safetensors``: the model's state dict (parameters and buffers);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state dict, its tensors flattened
  into the safetensors file and its structure (with placeholders) in the JSON;
- ``tokenizer.json``: the run's tokenizer;
- ``state.json``: step, config, RNG states, metrics;
- ``manifest.json``, written last: the size and sha256 of every other file (``state.json``
  included) and a sha256 of the manifest itself.

What pkmem promises about a checkpoint:

- It is complete or absent: it is written into a temporary directory next to it, fsynced and
  renamed into place; older checkpoints are deleted only after the new one is in place.
- It never holds a non-finite weight or optimizer value: :func:`save_checkpoint` checks before it
  writes anything (``FloatingPointError``).
- Reading it verifies all of it before a tensor reaches a model: the manifest's own checksum, every
  file's size and sha256, every field of ``state.json`` (types, ranges, RNG states), every tensor
  reference of ``optimizer.json`` and the finiteness of every tensor. Any damage is a
  :class:`CheckpointError` naming the file (and the field).
- It reads only its own files: the names it lists are plain names inside its directory; absolute
  paths, ``..`` and symbolic links are refused.

Checkpoints written before the manifest (``state.json`` format 1, which listed the other files'
checksums itself) still load, with those checks and the same field validation.

Two other layouts share the manifest, the state file and the verification: a distributed run's
(DCP shards, ``.metadata``, instead of ``model.safetensors``: :mod:`pkmem.distributed.checkpoint`)
and a Hugging Face model's (``pkmem finetune``: a ``save_pretrained`` directory, ``config.json`` and
its weights and tokenizer files, plus the optimizer and state files; :mod:`pkmem.hf.cli` loads its
model).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch

from pkmem._util import atomic_write_bytes, file_mode

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "read_state",
    "write_manifest",
    "check_optimizer_state",
    "load_model_state",
    "saved_config",
    "flatten_state",
    "unflatten_state",
    "sync_files",
    "publish_checkpoint",
]

STATE = "state.json"
MANIFEST = "manifest.json"
FORMAT = 2  # state.json of a checkpoint with a manifest; 1: the other files' checksums in state.json
REQUIRED = (STATE, "model.safetensors", "tokenizer.json")
HF_REQUIRED = (STATE, "config.json")  # a save_pretrained directory: its weights may be sharded
OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")
MAX_JSON_BYTES = 1 << 30  # a state, manifest or optimizer structure larger than this is not one of ours


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


def unflatten_state(structure, tensors: dict, source: str = "optimizer.json"):
    """Inverse of :func:`flatten_state`. A structure it could not have written (a reference to a
    tensor that ``tensors`` lacks, a malformed entry) is a :class:`CheckpointError` naming ``source``."""

    def bad(what: str):
        return CheckpointError(f"checkpoint file {source!r} is corrupt: {what}")

    def dec(o, depth: int = 0):
        if depth > 100:
            raise bad("its structure is nested too deeply")
        if isinstance(o, list):
            return [dec(v, depth + 1) for v in o]
        if not isinstance(o, dict):
            if o is None or isinstance(o, (bool, int, float, str)):
                return o
            raise bad(f"an entry of type {type(o).__name__}")
        if len(o) != 1:
            raise bad(f"an entry with keys {sorted(o)[:4]} (expected one of __tensor__, __dict__, ...)")
        ((kind, v),) = o.items()
        if kind == "__tensor__":
            if not isinstance(v, str) or v not in tensors:
                raise bad(f"it refers to the tensor {v!r}, which the safetensors file does not hold")
            return tensors[v]
        if kind == "__dict__":
            if not isinstance(v, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in v):
                raise bad("a __dict__ entry that is not a list of [key, value] pairs")
            out = {}
            for k, val in v:
                key = dec(k, depth + 1)
                if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                    raise bad(f"a dict key of type {type(key).__name__}")
                out[key] = dec(val, depth + 1)
            return out
        if kind == "__tuple__":
            if not isinstance(v, list):
                raise bad("a __tuple__ entry that is not a list")
            return tuple(dec(x, depth + 1) for x in v)
        if kind == "__float__":
            if v not in ("nan", "inf", "-inf"):
                raise bad(f"a __float__ entry {v!r} (expected nan, inf or -inf)")
            return float(v)
        raise bad(f"an entry with the key {kind!r}")

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


def _rng_bytes(text, field: str, source: str, size: int | None = None) -> torch.Tensor:
    """A base64 RNG state as a uint8 tensor (CheckpointError naming ``source`` and ``field`` if not)."""
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or not raw or (size is not None and len(raw) != size):
        want = f"{size} bytes" if size is not None else "bytes"
        raise CheckpointError(
            f"checkpoint file {source!r}: field {field!r} is not an RNG state (base64 of {want})"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _check_rng(state, source: str) -> None:
    if not isinstance(state, dict) or not set(state) <= {"torch", "cuda"}:
        raise CheckpointError(
            f"checkpoint file {source!r}: field 'rng' must be a mapping with 'torch' (and 'cuda') RNG states"
        )
    if "torch" in state:
        _rng_bytes(state["torch"], "rng.torch", source, len(torch.get_rng_state()))
    if "cuda" in state:
        if not isinstance(state["cuda"], list):
            raise CheckpointError(
                f"checkpoint file {source!r}: field 'rng.cuda' must be a list of RNG states"
            )
        for i, s in enumerate(state["cuda"]):
            _rng_bytes(s, f"rng.cuda[{i}]", source)


def set_rng_state(state: dict, source: str = STATE) -> None:
    """Restore what :func:`rng_state` returned (checked first: CheckpointError naming ``source``)."""
    _check_rng(state, source)
    if "torch" in state:
        torch.set_rng_state(_rng_bytes(state["torch"], "rng.torch", source))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_rng_bytes(s, "rng.cuda", source) for s in state["cuda"]])


# ---- files inside a checkpoint ----------------------------------------------------------------------
def _plain_name(name, source: str) -> str:
    """``name`` if it is a plain file name (no directory part, not ``.`` or ``..``), else CheckpointError."""
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
        and len(name) <= 255
    )
    if not ok:
        raise CheckpointError(
            f"checkpoint file {source!r} lists the file {name!r}: a checkpoint's files must be plain "
            "names inside its directory (no absolute path, no '..', no directory part)"
        )
    return name


def _member(ckpt: Path, name: str, source: str) -> Path:
    """The path of file ``name`` of checkpoint ``ckpt``: a plain name, a regular file, no symbolic link."""
    path = ckpt / _plain_name(name, source)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is a symbolic link: a checkpoint reads only its own files"
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a regular file")
    return path


def _open(path: Path):
    """Open for reading without following a symbolic link (one swapped in after the check too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    return os.fdopen(fd, "rb")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with _open(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(ckpt: Path, name: str, source: str | None = None):
    path = _member(ckpt, name, source or str(ckpt))
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {path.stat().st_size} bytes")
    try:
        with _open(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated ({e})") from None


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _check_entries(files, source: str) -> dict:
    """A ``{name: {"bytes", "sha256"}}`` listing with plain names, else CheckpointError naming ``source``."""
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint file {source!r}: field 'files' must be a mapping of file names")
    for name, info in files.items():
        _plain_name(name, source)
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and not isinstance(info.get("bytes"), bool)
            and info["bytes"] >= 0
            and isinstance(info.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", info["sha256"]) is not None
        )
        if not ok:
            raise CheckpointError(
                f'checkpoint file {source!r}: field \'files.{name}\' must be {{"bytes": int, "sha256": hex}}'
            )
    return files


def _verify_files(ckpt: Path, files: dict, source: str, listed_in: str) -> None:
    """Every listed file exists (a plain regular file) with its size and sha256."""
    for name, info in files.items():
        path = _member(ckpt, name, source)
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is truncated or corrupt: {size} bytes, {listed_in} says "
                f"{info['bytes']}"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is corrupt: its sha256 does not match {listed_in} "
                "(the file was changed, or one of the two was swapped in from another checkpoint)"
            )


# ---- the manifest -----------------------------------------------------------------------------------
def _manifest_digest(files: dict) -> str:
    body = json.dumps({"format": FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def write_manifest(ckpt: str | os.PathLike) -> Path:
    """(Re)write ``manifest.json`` of checkpoint directory ``ckpt`` for the files it holds now.

    :func:`save_checkpoint` calls it last. Call it yourself only after changing a checkpoint's files
    on purpose: it makes whatever the directory holds the checkpoint's verified content.
    """
    ckpt = Path(ckpt)
    names = sorted(
        p.name
        for p in ckpt.iterdir()
        # hidden names are leftovers of atomic writes, except DCP's own ".metadata" (distributed runs)
        if p.name != MANIFEST and (not p.name.startswith(".") or p.name == ".metadata") and p.is_file()
    )
    files = {name: _file_entry(_member(ckpt, name, str(ckpt))) for name in names}
    manifest = {"format": FORMAT, "files": files, "sha256": _manifest_digest(files)}
    atomic_write_bytes(ckpt / MANIFEST, json.dumps(manifest, indent=1).encode())
    return ckpt / MANIFEST


def read_manifest(ckpt: str | os.PathLike, verify: bool = True) -> dict:
    """The checkpoint's manifest (its own checksum checked); with ``verify``, every file it lists too."""
    ckpt = Path(ckpt)
    source = str(ckpt / MANIFEST)
    manifest = _read_json(ckpt, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "sha256" not in manifest:
        raise CheckpointError(
            f"checkpoint file {source!r} is not a pkmem checkpoint manifest (format {FORMAT})"
        )
    files = _check_entries(manifest.get("files"), source)
    if manifest["sha256"] != _manifest_digest(files):
        raise CheckpointError(f"checkpoint file {source!r} is corrupt: its own sha256 does not match")
    # a distributed run's checkpoint holds DCP shards (".metadata", "*.distcp") instead of the model file;
    # a Hugging Face model's (config.json) its save_pretrained files (pkmem.hf.from_pretrained reads them)
    sharded = ".metadata" in files
    if "config.json" in files:
        required = list(HF_REQUIRED)
    else:
        required = [n for n in REQUIRED if not (sharded and n == "model.safetensors")]
    for name in required:
        if name not in files:
            raise CheckpointError(
                f"checkpoint file {source!r} does not list {name}: the checkpoint is incomplete"
            )
    if sum(name in files for name in OPTIMIZER_FILES) == 1:
        raise CheckpointError(f"checkpoint file {source!r} lists only one of {' and '.join(OPTIMIZER_FILES)}")
    if verify:
        _verify_files(ckpt, files, source, MANIFEST)
    return manifest


# ---- state.json -------------------------------------------------------------------------------------
def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_state(state, ckpt: str | os.PathLike) -> dict:
    """Validate the fields of a checkpoint's ``state.json`` (types, ranges, RNG states); returns it.

    Errors name the file and the field. ``config`` is checked where it is read
    (:func:`pkmem.config.config_from_dict`).
    """
    ckpt = Path(ckpt)
    source = str(ckpt / STATE)

    def fail(field: str, allowed: str):
        return CheckpointError(
            f"checkpoint file {source!r}: field {field!r}={_short(state.get(field))} is not allowed: "
            f"it must be {allowed}"
        )

    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {source!r} is not a pkmem checkpoint state (not a mapping)")
    if state.get("format") not in (1, FORMAT) or isinstance(state.get("format"), bool):
        raise CheckpointError(
            f"checkpoint file {source!r} is not a pkmem checkpoint state (format {state.get('format')!r}; "
            f"this pkmem reads formats 1 and {FORMAT})"
        )
    if not _is_int(state.get("step")) or state["step"] < 0:
        raise fail("step", "an int >= 0")
    named = re.fullmatch(r"step_(\d+)", ckpt.name)
    if named and int(named.group(1)) != state["step"]:
        raise fail("step", f"{int(named.group(1))}, the step in the directory's name {ckpt.name!r}")
    for field in ("config", "metrics", "data", "data_position"):
        if field in state and not isinstance(state[field], dict):
            raise fail(field, "a mapping")
    if "tokens" in state and (not _is_int(state["tokens"]) or state["tokens"] < 0):
        raise fail("tokens", "an int >= 0")
    position = state.get("data_position", {})
    if "step" in position and position["step"] != state["step"]:
        raise CheckpointError(
            f"checkpoint file {source!r}: field 'data_position.step'={_short(position['step'])} is not "
            f"allowed: it must be the checkpoint's step {state['step']}"
        )
    if "seed" in position and (not _is_int(position["seed"]) or position["seed"] < 0):
        raise CheckpointError(
            f"checkpoint file {source!r}: field 'data_position.seed'={_short(position['seed'])} is not "
            "allowed: it must be an int >= 0"
        )
    for field in ("pkmem_version", "torch_version"):
        if field in state and not isinstance(state[field], str):
            raise fail(field, "a string")
    if "rng" in state:
        _check_rng(state["rng"], source)
    if state["format"] == 1:
        _check_entries(state.get("files"), source)
    return state


def read_state(ckpt: str | os.PathLike, verify: bool = True) -> dict:
    """The checkpoint's ``state.json``, its fields validated; with ``verify``, the manifest and every
    file's size and sha256 are checked first (for a checkpoint of format 1, the files it lists)."""
    ckpt = Path(ckpt)
    has_manifest = os.path.lexists(ckpt / MANIFEST)
    if has_manifest:
        read_manifest(ckpt, verify)
    state = check_state(_read_json(ckpt, STATE), ckpt)
    if state["format"] == FORMAT and not has_manifest:
        raise CheckpointError(f"checkpoint file {str(ckpt / MANIFEST)!r} is missing")
    if state["format"] == 1 and not has_manifest:
        for name in ("model.safetensors", "tokenizer.json"):
            if name not in state["files"]:
                raise CheckpointError(f"checkpoint file {str(ckpt / STATE)!r} does not list {name}")
        if verify:
            _verify_files(ckpt, state["files"], str(ckpt / STATE), STATE)
    return state


def saved_config(ck: dict) -> dict:
    """The run config stored in a loaded checkpoint's state (CheckpointError if it has none)."""
    config = ck["state"].get("config")
    if ck["state"].get("layout") == "hf":
        raise CheckpointError(
            f"checkpoint {str(ck['dir'])!r} is a Hugging Face model's (pkmem finetune): load it with "
            "pkmem.hf.from_pretrained(<run>/model) and transformers; pkmem eval, generate and plot read "
            "pkmem train's runs"
        )
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {str(Path(ck['dir']) / STATE)!r} has no 'config' field")
    return config


# ---- saving -----------------------------------------------------------------------------------------
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


def _non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k
        for k, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer,
    state: dict,
    tokenizer_json: str,
    keep: int = 1,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` atomically and keep the ``keep`` newest; returns it.

    A model or optimizer holding a non-finite value is a FloatingPointError and nothing is written.
    """
    from safetensors.torch import save_file

    model_tensors = _model_tensors(model)
    structure, tensors = flatten_state(optimizer.state_dict() if optimizer is not None else {})
    for what, found in (
        ("the model's", _non_finite(model_tensors)),
        ("the optimizer's", _non_finite(tensors)),
    ):
        if found:
            raise FloatingPointError(
                f"not writing the checkpoint of step {step}: {what} {found[0]!r} holds NaN or infinite "
                f"values ({len(found)} tensor(s)); the run's previous checkpoint is kept"
            )
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp's 0700 -> the user's umask
        save_file(model_tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        full = {**state, "format": FORMAT, "step": step}
        full.pop("files", None)
        (tmp / STATE).write_text(json.dumps(full, indent=1))
        sync_files(tmp)
        return publish_checkpoint(tmp, final, run_dir, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_files(directory: Path) -> None:
    """Give every file of ``directory`` the mode of a new file under the user's umask (safetensors
    writes 0600) and flush it to disk: the step before :func:`publish_checkpoint`."""
    for p in sorted(Path(directory).iterdir()):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, file_mode())
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def publish_checkpoint(tmp: Path, final: Path, run_dir: str | os.PathLike, keep: int) -> Path:
    """Seal the written checkpoint directory ``tmp`` (its manifest last: a directory whose manifest
    verifies is complete) and move it to ``final`` atomically (an older copy of the same step is moved
    aside first); then drop all but the newest ``keep`` checkpoints of the run and the temporary
    directories of interrupted saves. Returns ``final``."""
    write_manifest(tmp)
    _fsync_dir(tmp)
    root = final.parent
    old = None
    if final.exists():  # the same step saved again: move the old copy aside first
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".step_*"):  # temporary directories of interrupted saves
        shutil.rmtree(leftover, ignore_errors=True)
    return final


# ---- loading ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run (those with a state.json or a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and _is_checkpoint(p))


def _is_checkpoint(path: Path) -> bool:
    return os.path.lexists(path / STATE) or os.path.lexists(path / MANIFEST)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory (its newest) or a checkpoint directory."""
    p = Path(path)
    if _is_checkpoint(p):
        return p
    if p.name in (STATE, MANIFEST) and os.path.lexists(p):
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


def _load_safetensors(ckpt: Path, name: str) -> dict:
    from safetensors.torch import load_file

    path = _member(ckpt, name, str(ckpt))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint file {str(path)!r} could not be read: {e}") from None


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """``{"dir", "state", "model" (tensors), "optimizer" (a state dict or None)}`` of a checkpoint
    (``model`` and ``optimizer`` None for a distributed run's: :mod:`pkmem.distributed.checkpoint`;
    ``model`` None for a Hugging Face model's, ``state["layout"] == "hf"``: :mod:`pkmem.hf.cli`).

    With ``verify`` (the default) the whole checkpoint is checked first (see the module's docstring)
    and a tensor holding NaN or infinity is a CheckpointError.
    """
    ckpt = find_checkpoint(path)
    state = read_state(ckpt, verify)
    if state.get("layout") == "dcp":  # written by the ranks of a distributed run: pkmem.distributed reads it
        return {"dir": ckpt, "state": state, "model": None, "optimizer": None}
    if state.get("layout") == "hf":  # a save_pretrained directory: pkmem.hf.from_pretrained reads the model
        model = None
    else:
        model = _load_safetensors(ckpt, "model.safetensors")
    bad = _non_finite(model) if verify and model is not None else []
    if bad:
        raise CheckpointError(
            f"checkpoint file {str(ckpt / 'model.safetensors')!r} holds non-finite weights (NaN or "
            f"infinity) in {bad[0]!r} ({len(bad)} tensor(s)): pkmem never writes such a checkpoint"
        )
    optimizer = None
    present = [name for name in OPTIMIZER_FILES if os.path.lexists(ckpt / name)]
    if len(present) == 1:
        missing = next(n for n in OPTIMIZER_FILES if n not in present)
        raise CheckpointError(f"checkpoint file {str(ckpt / missing)!r} is missing")
    if present:
        source = str(ckpt / "optimizer.json")
        structure = _read_json(ckpt, "optimizer.json")
        tensors = _load_safetensors(ckpt, "optimizer.safetensors")
        optimizer = unflatten_state(structure, tensors, source)
        if verify and _non_finite(tensors):
            raise CheckpointError(
                f"checkpoint file {str(ckpt / 'optimizer.safetensors')!r} holds non-finite values (NaN or "
                "infinity): pkmem never writes such a checkpoint"
            )
    return {"dir": ckpt, "state": state, "model": model, "optimizer": optimizer}


def match_model_state(model: torch.nn.Module, tensors: dict, source: str = "checkpoint") -> dict:
    """The full state dict of ``model`` from ``tensors`` (shared tensors may appear once); names and
    shapes that do not match the model raise CheckpointError naming ``source``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    aliases = {}
    ptrs = {}
    for k, t in expected.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() and t.device.type != "meta" else k
        ptrs.setdefault(key, k)
        aliases[k] = ptrs[key]
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
        if t.is_floating_point() != expected[k].is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {t.dtype}, the model expects {expected[k].dtype}")
    return full


def load_model_state(model: torch.nn.Module, tensors: dict, source: str = "checkpoint") -> None:
    """Load ``tensors`` into ``model`` (shared tensors may appear once); mismatches raise CheckpointError."""
    model.load_state_dict(match_model_state(model, tensors, source))


# ---- the optimizer state against the run's optimizer ------------------------------------------------
PER_PARAMETER = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check_optimizer_state(optimizer, state_dict, source: str = "optimizer.json") -> None:
    """``state_dict`` (a loaded checkpoint's optimizer state) fits ``optimizer``: the same groups
    (names, parameter counts), per-parameter moments of their parameter's shape, finite
    hyperparameters and steps. A mismatch (a checkpoint of another configuration) is a
    CheckpointError naming ``source``; nothing is loaded."""

    def fail(what: str):
        return CheckpointError(
            f"checkpoint file {source!r} does not match the run's optimizer: {what} (a checkpoint written "
            "by another configuration?)"
        )

    inner = getattr(optimizer, "optimizers", None)
    if inner is not None:  # pkmem.optim.MultiOptimizer
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(inner):
            got = len(saved) if isinstance(saved, list) else "no list of"
            raise fail(f"it holds {got} optimizer states, the run has {len(inner)} optimizers")
        for i, (o, s) in enumerate(zip(inner, saved)):
            check_optimizer_state(o, s, f"{source} (optimizer {i}: {type(o).__name__})")
        return
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise fail("it has no 'param_groups' list")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise fail(f"{len(saved_groups)} parameter groups, the run's optimizer has {len(groups)}")
    params = {}
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        name = g.get("name", i)
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), list):
            raise fail(f"group {name!r} has no 'params' list")
        if sg.get("name", i) != name:
            raise fail(f"group {i} is named {sg.get('name')!r}, the run's is {name!r}")
        if len(sg["params"]) != len(g["params"]):
            raise fail(f"group {name!r} has {len(sg['params'])} parameters, the run's has {len(g['params'])}")
        for key in ("lr", "eps", "weight_decay"):
            v = sg.get(key)
            if key in sg and not (
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
            ):
                raise fail(f"group {name!r} has {key}={_short(v)}")
        if "betas" in sg:
            b = sg["betas"]
            if not (
                isinstance(b, (list, tuple))
                and len(b) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)
            ):
                raise fail(f"group {name!r} has betas={_short(b)}")
        for pid, p in zip(sg["params"], g["params"]):
            if not _is_int(pid) or pid in params:
                raise fail(f"group {name!r} lists the parameter id {_short(pid)} (not a new int)")
            params[pid] = p
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise fail("its 'state' is not a mapping")
    for pid, entry in state.items():
        if pid not in params:
            raise fail(f"state for parameter {_short(pid)}, which no group lists")
        if not isinstance(entry, dict):
            raise fail(f"the state of parameter {pid} is not a mapping")
        p = params[pid]
        for key, v in entry.items():
            if key in PER_PARAMETER:
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise fail(f"{key} of parameter {pid} has shape {shape}, the parameter {tuple(p.shape)}")
            elif key == "step":
                ok = (isinstance(v, torch.Tensor) and v.numel() == 1) or (
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                )
                step = float(v) if ok else None
                if not ok or not 0 <= step < math.inf:
                    raise fail(f"the step of parameter {pid} is {_short(v)}")
