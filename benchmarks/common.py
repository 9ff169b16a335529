"""Timing and environment helpers shared by the GPU benchmarks (CUDA events, medians, ceilings)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable

import torch


def cuda_time(
    fn: Callable[[], object], iters: int = 20, warmup: int = 3, min_ms: float = 0.0, calls: int = 1
) -> dict:
    """Median / min / max milliseconds of ``fn()`` over ``iters`` samples, each timed by CUDA events.

    ``calls > 1``: a sample is ``calls`` back-to-back calls between the two events, divided by
    ``calls``. The host then queues the next call while the device runs the current one, so the
    sample is the device time per call; with ``calls=1`` it also holds whatever host time the call
    spends before its first kernel starts (the device idles meanwhile)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < iters or sum(times) < min_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
        if len(times) >= 10 * iters:
            break
    med = statistics.median(times)
    return {"median_ms": med, "min_ms": min(times), "max_ms": max(times), "n": len(times), "calls": calls}


def graph_time(fn: Callable[[], object], iters: int = 50, calls: int = 10) -> dict:
    """:func:`cuda_time` of ``fn`` captured once in a CUDA graph (after warm-up on a side stream)
    and replayed ``calls`` times back to back per sample: the device time per replay, without the
    host's launch overhead or the graph's launch latency."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, iters=iters, calls=calls)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, device="cuda", dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), iters=20)["median_ms"]
    return 2 * n * 4 / (t * 1e-3)


def matmul_rate(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Dense matrix-product rate in FLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = cuda_time(lambda: a @ b, iters=10)["median_ms"]
    return 2 * n**3 / (t * 1e-3)


def environment() -> dict:
    import triton

    commit = git_commit() or ""
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": commit,
    }


def versions() -> dict:
    """Python's and the packages' versions, and the commit of the code (``PKMEM_COMMIT`` where the
    tree is a copy without its git history, as on a lent GPU machine); needs no GPU."""
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for name in ("pkmem", "torch", "triton", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["git"] = git_commit()
    return out


def git_commit(where: str | None = None) -> str | None:
    """The short commit of the code: ``PKMEM_COMMIT`` where the tree is a copy without its git
    history (as on a lent GPU machine), else ``git rev-parse`` in ``where`` (default: benchmarks/)."""
    commit = os.environ.get("PKMEM_COMMIT")
    if commit:
        return commit
    where = where or os.path.dirname(os.path.abspath(__file__))
    try:
        git = ["git", "-C", where, "rev-parse", "--short", "HEAD"]
        return subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_slug() -> str:
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def write_json(path: str, data: dict) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def warmup_cosine(step: int, t: dict) -> float:
    """Learning-rate factor at 0-based ``step``: linear warm-up over ``t["warmup_steps"]``, then cosine
    decay to ``t["min_lr_ratio"]`` at ``t["steps"]`` (the small benchmarks' own training loops)."""
    if step < t["warmup_steps"]:
        return (step + 1) / t["warmup_steps"]
    p = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (processor, else machine)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"
