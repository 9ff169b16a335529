"""Sampling text from a trained run."""

from __future__ import annotations

import torch

from pkmem._util import not_allowed
from pkmem.train.loop import load_run

__all__ = ["generate_text"]


def generate_text(
    run: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """``prompt`` continued by ``max_new_tokens`` tokens sampled from the run's newest checkpoint."""
    if max_new_tokens < 0:
        raise not_allowed("max_new_tokens", max_new_tokens, ">= 0")
    model, cfg, tok, _ = load_run(run, device)
    ids = tok.encode(prompt) or [tok.encode("\n")[0]]
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    gen = torch.Generator(device=idx.device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0].tolist())
