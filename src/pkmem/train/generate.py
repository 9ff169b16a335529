"""Sampling text from a trained run, streamed as it is generated."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pkmem.models.transformer import check_sampling
from pkmem.train.loop import load_run

__all__ = ["generate_text", "stream_text"]


def stream_text(
    run: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    use_cache: bool = True,
) -> Iterator[str]:
    """The text that continues ``prompt``, in pieces as the tokens are sampled from the run's newest
    checkpoint (see :meth:`pkmem.models.MemoryTransformer.stream` for the options).

    A piece ends on a whole character: the bytes of a character split across tokens wait for its
    last byte. An empty prompt starts from a newline.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the checkpoint is read
    model, cfg, tok, _ = load_run(run, device)
    prompt_ids = tok.encode(prompt) or tok.encode("\n")
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    gen = torch.Generator(device=idx.device).manual_seed(seed)
    new: list[int] = []
    shown = ""
    for nxt in model.stream(idx, max_new_tokens, temperature, top_k, top_p, gen, use_cache):
        new.append(int(nxt[0, 0]))
        text = tok.decode(new)
        if text.endswith("\ufffd") and len(new) < max_new_tokens:  # maybe half a character
            continue
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
    text = tok.decode(new)
    if text != shown:  # the last piece (or a decoding that changed what came before)
        yield text[len(shown) :] if text.startswith(shown) else text


def generate_text(
    run: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    use_cache: bool = True,
) -> str:
    """``prompt`` continued by ``max_new_tokens`` tokens sampled from the run's newest checkpoint."""
    pieces = stream_text(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, device, use_cache)
    return prompt + "".join(pieces)
