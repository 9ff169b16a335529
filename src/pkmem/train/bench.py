"""Inference speed of model configurations side by side (the paper's Figure 4: layers x dim x memories)."""

from __future__ import annotations

import dataclasses
import itertools
import platform
import statistics
import time

import torch

from pkmem.models import MemoryTransformer, MemoryTransformerConfig
from pkmem.train.evaluate import autocast

__all__ = ["bench_models", "environment", "format_table"]


def environment(device: torch.device) -> dict:
    """Device name and library versions, for benchmark JSON files."""
    import pkmem

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    env = {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pkmem": pkmem.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_forward(model, idx, device, precision, warmup: int, repeats: int) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            model(idx)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_models(
    base: MemoryTransformerConfig,
    layers: list[int],
    dims: list[int],
    memories: list[int],
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    warmup: int = 2,
    repeats: int = 5,
    tokens_per_word: float | None = None,
    log=print,
) -> list[dict]:
    """Forward tokens/s (median of ``repeats``) of ``base`` for every (layers, dim, memories) combination.

    With ``base``'s layer count and number of memories the memories sit where ``base`` puts them
    (its ``mem_layers``, its ``mem_mode``); other combinations spread them evenly
    (:func:`pkmem.config.default_memory_layers`). Attention heads keep ``base``'s head size. With
    ``tokens_per_word``, rows also have ``words_per_s = tokens_per_s / tokens_per_word``.
    ``log`` (if given) gets one line per row.
    """
    from pkmem.config import default_memory_layers

    rows = []
    head_size = base.dim // base.n_heads
    own = tuple(base.memory_layers())
    for n_layers, dim, n_mem in itertools.product(layers, dims, memories):
        same = n_layers == base.n_layers and n_mem == len(own)
        mem_layers = own if same else default_memory_layers(n_layers, n_mem)
        cfg = dataclasses.replace(
            base,
            n_layers=n_layers,
            dim=dim,
            n_heads=max(1, dim // head_size),
            mem_layers=mem_layers,
            n_memories=None,
        )
        torch.manual_seed(0)
        model = MemoryTransformer(cfg).to(device).eval()
        idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), device=device)
        times = _time_forward(model, idx, device, precision, warmup, repeats)
        med = statistics.median(times)
        tps = batch_size * cfg.seq_len / med
        row = {
            "layers": n_layers,
            "dim": dim,
            "memories": n_mem,
            "memory_layers": list(model.mem_layer_indices),
            "placement": "config" if same else "spread",
            "params": model.num_parameters(),
            "params_without_values": model.num_parameters(values=False),
            "batch_size": batch_size,
            "seq_len": cfg.seq_len,
            "ms": 1000 * med,
            "ms_all": [1000 * t for t in times],
            "tokens_per_s": tps,
        }
        if tokens_per_word is not None:
            row["words_per_s"] = tps / tokens_per_word
        rows.append(row)
        if log is not None:
            log(format_table([row], per_word=tokens_per_word is not None, header=not rows[:-1]))
        del model
    return rows


def format_table(rows: list[dict], per_word: bool = False, header: bool = True) -> str:
    """The rows of :func:`bench_models` as a text table whose columns name their units."""
    cols = [
        ("layers", 6, lambda r: f"{r['layers']}"),
        ("dim", 5, lambda r: f"{r['dim']}"),
        ("memories", 8, lambda r: f"{r['memories']}"),
        ("memory layers (1-based)", 23, lambda r: " ".join(map(str, r["memory_layers"])) or "-"),
        ("params (M)", 10, lambda r: f"{r['params'] / 1e6:.2f}"),
        ("ms per forward", 14, lambda r: f"{r['ms']:.2f}"),
        ("tokens/s", 12, lambda r: f"{r['tokens_per_s']:,.0f}"),
    ]
    if per_word:
        cols.append(("words/s", 12, lambda r: f"{r['words_per_s']:,.0f}"))
    lines = ["  ".join(f"{name:>{w}}" for name, w, _ in cols)] if header else []
    lines += ["  ".join(f"{fmt(r):>{w}}" for _, w, fmt in cols) for r in rows]
    return "\n".join(lines)
