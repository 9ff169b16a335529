"""Small helpers shared across pkmem: the "is not allowed" error, atomic file writes and the error of a
distributed run.

Torch-free: the ``pkmem`` command imports it before it knows whether torch is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["not_allowed", "atomic_write_bytes", "file_mode", "DistributedError"]


class DistributedError(RuntimeError):
    """Another rank of a distributed run failed (the text names it and its error), or the ranks
    stopped answering (:mod:`pkmem.distributed`)."""


def not_allowed(name: str, value, allowed: str) -> ValueError:
    """The ValueError for a bad input: ``name=value is not allowed: name must be <allowed>``.

    ``name`` is what the user wrote (an argument, a config key such as ``memory.topk``, or a
    command-line flag: ``--seq-len 0 is not allowed: --seq-len must be >= 1``). Returned, not
    raised: ``raise not_allowed("topk", topk, "an int in [1, num_keys]")``.
    """
    shown = f"{name} {value!r}" if name.startswith("-") else f"{name}={value!r}"
    return ValueError(f"{shown} is not allowed: {name} must be {allowed}")


def _umask() -> int:
    """The process's umask (read from /proc where it can be, so that it is never changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode a new file (or ``directory``) gets from ``open``/``mkdir`` under the user's umask.

    ``tempfile.mkstemp`` creates 0600 files (``mkdtemp`` 0700 directories) whatever the umask:
    a file written through one gets this mode before it is renamed into place.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``;
    the file gets the mode of any new file (the user's umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
