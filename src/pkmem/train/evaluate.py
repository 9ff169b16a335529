"""Evaluation: loss, perplexity, bits per byte / token, speed, and usage and KL of every memory (§4.2)."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from pkmem._util import not_allowed
from pkmem.train.data import eval_windows

__all__ = ["evaluate", "autocast", "resolve_device", "memory_report", "choose_threads", "set_threads"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise not_allowed("device", name, "auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is not available: this machine has no CUDA GPU (use --device cpu)")
    return torch.device(name)


def _others_running(samples: int = 10, interval: float = 0.02) -> float | None:
    """Runnable tasks of other programs now: the median of a few reads of /proc/loadavg's running
    count, less this process (None where there is no /proc)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i < samples - 1:
            time.sleep(interval)
    return max(0.0, statistics.median(counts) - 1)


def choose_threads(requested: int | None = None, source: str = "asked for") -> tuple[int, str]:
    """``(threads, why)``: the CPU threads torch should use.

    ``requested`` if given (``source`` says by whom), else ``OMP_NUM_THREADS`` if set, else torch's
    default (the cores) less the cores other programs keep busy when the command starts, at least 1:
    on a shared, busy machine fewer threads are faster (the threads of one operation wait for the
    slowest, and a thread that shares its core with another program is slow): the tiny preset trained
    4,700 tokens/s with 1 thread and 960 with 2 on a 2-core machine running other jobs (load average
    3-6), and evaluated 12,500 vs 3,300.
    """
    import torch

    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise not_allowed("threads", requested, "an int >= 1 (or null: chosen from the free cores)")
        return requested, source
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    default = torch.get_num_threads()
    try:  # only where this process may use every core of the machine (not in a slice of a larger one)
        whole = len(os.sched_getaffinity(0)) == os.cpu_count()
    except AttributeError:
        whole = False
    others = _others_running() if whole and sys.platform.startswith("linux") else None
    if others is None:
        return default, "torch's default"
    free = max(1, min(default, round((os.cpu_count() or default) - others)))
    if free == default:
        return default, f"{os.cpu_count()} cores, idle"
    return free, f"{os.cpu_count()} cores, {others:g} busy with other programs"


def set_threads(requested: int | None = None, log=None, source: str = "asked for") -> int:
    """``torch.set_num_threads`` of :func:`choose_threads`; returns the number (``log`` gets a line)."""
    import torch

    n, why = choose_threads(requested, source)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if log is not None:
        log(f"cpu threads: {n} ({why}; --threads N to choose)")
    return n


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA with ``precision`` "auto" or "bf16"; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def memory_report(tracker, layer_of: dict[str, int]) -> list[dict]:
    """The tracker's report as a list of ``{"layer", "usage", "kl", ...}`` sorted by layer.

    ``layer`` is 1-based, as configs number memory layers (``mem_layers``, the paper's "layer 5 of
    6"); a memory outside a numbered layer (``layer_of`` does not know it) is named by ``module``,
    its module path in the model, instead.
    """
    if tracker is None:
        return []
    out = []
    for name, vals in tracker.report().items():
        where = {"layer": layer_of[name]} if name in layer_of else {"layer": None, "module": name}
        out.append({**where, **vals})
    return sorted(out, key=lambda d: (d["layer"] is None, d["layer"] or 0))


def _layers(model) -> dict[str, int]:
    return {name: layer for layer, name, _ in model.memories()} if hasattr(model, "memories") else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    max_tokens: int | None = None,
    is_bytes: bool = True,
    words_per_token: float | None = None,
    track_usage: bool = True,
    forward=None,
    progress: bool = False,
    parallel=None,
) -> dict:
    """Next-token loss of ``model`` on windows of ``tokens`` (see :func:`eval_windows`).

    Returns ``loss`` (nats per token), ``ppl``, ``bits_per_token``, ``bpb`` (bits per byte, None for
    a non-byte tokenizer), ``tokens``, ``seconds``, ``tokens_per_s``, ``words_per_s`` (if
    ``words_per_token`` is known) and ``memories``: ``[{"layer", "name", "usage", "kl", ...}]``.
    ``forward`` (default ``model``) is the callable that computes logits (e.g. a compiled model).
    ``seconds`` and the speeds leave out the first batch when there are several (it compiles kernels).
    ``progress``: a tqdm bar on stderr (tokens evaluated).
    ``parallel`` (a :class:`pkmem.distributed.Parallel` of several ranks): every rank calls this and
    evaluates its share of the windows; the results are those of all windows, on every rank.
    """
    forward = model if forward is None else forward
    starts = eval_windows(len(tokens), seq_len, max_tokens)
    real = None  # on several ranks: which of this rank's windows count (the last rank's are padded)
    if parallel is not None and parallel.distributed:
        starts, real = parallel.windows(starts)
    offsets = np.arange(seq_len + 1)
    tracker = None
    if track_usage and hasattr(model, "memories") and model.memories():
        from pkmem.metrics import UsageTracker

        tracker = UsageTracker(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = timed = 0
    _sync(device)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total_tokens = len(starts) * seq_len
        every = 0.2 if sys.stderr.isatty() else 15.0  # a log file gets a line every 15 s, not a flood
        bar = tqdm(
            total=total_tokens,
            desc="eval",
            unit="tok",
            unit_scale=True,
            file=sys.stderr,
            leave=False,
            mininterval=every,
        )
    try:
        if tracker is not None:
            tracker.start()
        for i in range(0, len(starts), batch_size):
            if i == batch_size:  # speed: time from the second batch on (the first compiles kernels)
                _sync(device)
                t0, timed = time.perf_counter(), count
            chunk = np.asarray(tokens[starts[i : i + batch_size, None] + offsets], dtype=np.int64)
            xy = torch.from_numpy(chunk).to(device, non_blocking=True)
            if real is None:
                with autocast(device, precision):
                    logits = forward(xy[:, :-1])
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1), reduction="sum"
                )
                count += xy[:, 1:].numel()
            else:  # padded windows run (every rank makes the same calls) but are masked and not counted
                keep = torch.from_numpy(real[i : i + batch_size]).to(device)
                mask = keep[:, None].expand(-1, seq_len)
                with autocast(device, precision):
                    logits = forward(xy[:, :-1], mask)
                per_token = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1), reduction="none"
                )
                loss = torch.where(mask.reshape(-1), per_token, 0.0).sum()
                count += int(real[i : i + batch_size].sum()) * seq_len
            total += loss.double()
            if bar is not None:
                bar.update(xy[:, 1:].numel())
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.stop()
        model.train(was_training)
    rate = (count - timed) / max(seconds, 1e-9)
    if real is not None:  # the sums (and the speeds) of all ranks
        local = torch.tensor([count, rate], dtype=total.dtype, device=device)
        sums = parallel.sum(torch.cat([total.reshape(1), local]))
        total, count, rate = sums[0], int(sums[1].item()), float(sums[2].item())
        if tracker is not None:
            tracker.all_reduce_(parallel.group)
    loss = total.item() / count
    bits = loss / math.log(2)
    out = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bits_per_token": bits,
        "bpb": bits if is_bytes else None,
        "tokens": count,
        "seconds": seconds,
        "tokens_per_s": rate,
        "words_per_s": rate * words_per_token if words_per_token else None,
        "memories": memory_report(tracker, _layers(model)),
    }
    return out
