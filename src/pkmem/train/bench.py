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

__all__ = ["bench_models", "environment"]


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
    tokens_per_word: float = 1.0,
    log=print,
) -> list[dict]:
    """Forward tokens/s (median of ``repeats``) of ``base`` for every (layers, dim, memories) combination.

    Memories are placed by the default placement; the number of attention heads keeps ``base``'s
    head size. ``words/s = tokens/s / tokens_per_word``.
    """
    rows = []
    head_size = base.dim // base.n_heads
    for n_layers, dim, n_mem in itertools.product(layers, dims, memories):
        cfg = dataclasses.replace(
            base,
            n_layers=n_layers,
            dim=dim,
            n_heads=max(1, dim // head_size),
            mem_layers=None,
            n_memories=n_mem,
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
            "params": model.num_parameters(),
            "params_without_values": model.num_parameters(values=False),
            "batch_size": batch_size,
            "seq_len": cfg.seq_len,
            "ms": 1000 * med,
            "ms_all": [1000 * t for t in times],
            "tokens_per_s": tps,
            "words_per_s": tps / tokens_per_word,
        }
        rows.append(row)
        log(
            f"{n_layers:>3} layers  dim {dim:>5}  {n_mem} memories {str(row['memory_layers']):<10} "
            f"{row['ms']:9.2f} ms  {tps:12,.0f} tokens/s  {row['words_per_s']:12,.0f} words/s"
        )
        del model
    return rows
