"""`MemoryTransformer`: a GPT-style decoder with product-key memories in some layers (paper §4).

    tokens ─ embedding (+ learned positions) ─► L × [x += attn(ln(x)); x += ffn|memory(ln(x))] ─ ln ─ head

That is the default pre-LN block; ``norm_position="post"`` gives the post-LN blocks of the paper and
the original Transformer, ``x = ln(x + attn(x)); x = ln(x + ffn|memory(x))``, with no final LayerNorm.

A memory sits at a 1-based layer index (the paper's "layer 5 of 6") in one of three modes:

- ``"replace"``: the memory takes the FFN's place, ``x += memory(ln(x))`` (the paper, Figure 3);
- ``"parallel"``: FFN and memory read the same normed input, ``x += ffn(h) + memory(h)``;
- ``"after"``: the block keeps its FFN and an extra residual sublayer follows, ``x += memory(ln(x))``.

Without explicit ``mem_layers``, ``n_memories`` memories are spread at regular intervals (§4.3):
``step = ceil(L / (N + 1))``, layers ``step * i`` for ``i = 1..N`` (16 layers, 2 memories -> 6 and 12).

Decoding keeps the attention's keys and values in a :class:`KVCache` (the memories and FFNs read each
token on its own), so :meth:`MemoryTransformer.generate` runs one token per step instead of the
whole context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pkmem._util import not_allowed
from pkmem.config import MEM_MODES, MemoryTransformerConfig, build_memory, default_memory_layers
from pkmem.layer import _dropout
from pkmem.optim import value_parameters

__all__ = [
    "MemoryTransformerConfig",
    "MemoryTransformer",
    "KVCache",
    "MakeMemory",
    "default_memory_layers",
    "MEM_MODES",
]

MakeMemory = Callable[[int, int, "nn.Parameter | None"], nn.Module]
"""``make_memory(layer, dim, values) -> memory``: builds the memory of 1-based ``layer`` for inputs of
width ``dim``; ``values`` is the value table to share (the first memory's ``values`` Parameter when
``mem_share_values``), else None. The memory is called as ``memory(x (B, T, dim), mask (B, T) bool or
None) -> (B, T, dim)``."""


def _rotary(x: torch.Tensor, base: float, start: int = 0) -> torch.Tensor:
    """Rotary position embedding of ``x (B, heads, T, d)`` at positions ``start .. start + T - 1``
    (pairs of channels rotated by position)."""
    T, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    pos = torch.arange(start, start + T, device=x.device, dtype=torch.float32)
    angle = pos[:, None] * inv  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class KVCache:
    """The keys and values of every attention layer for decoding one token at a time.

    ``MemoryTransformer.forward(idx, cache=cache)`` reads positions ``cache.length ..
    cache.length + T - 1``, attends to the cached keys before them, stores its own and advances
    ``cache.length`` by ``T``. Buffers ``(batch, heads, max_len, head_size)`` are allocated on first
    use in the dtype of the keys (bf16 under autocast).
    """

    def __init__(self, n_layers: int, max_len: int):
        for name, v in (("n_layers", n_layers), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise not_allowed(name, v, "an int >= 1")
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept)."""
        self.length = 0

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v (B, heads, T, d)`` at ``length``; returns the keys and values of positions
        ``0 .. length + T - 1``."""
        B, H, T, d = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions: {self.length} cached + {T} new do not fit "
                "(reset() it, or build a longer one)"
            )
        buf = self.keys[layer]
        if buf is None or buf.shape[:2] != (B, H) or buf.dtype != k.dtype or buf.device != k.device:
            self.keys[layer] = k.new_empty(B, H, self.max_len, d)
            self.values[layer] = v.new_empty(B, H, self.max_len, d)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MemoryTransformerConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.rotary = cfg.rope_base if cfg.pos_emb == "rotary" else None
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        start = 0 if cache is None else cache.length  # position of x's first token
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = _rotary(q, self.rotary, start), _rotary(k, self.rotary, start)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (B, heads, start + T, d)
            if start > 0:  # query i (position start + i) sees keys 0 .. start + i
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, heads, T, d) -> (B, T, C)
        return _dropout(self.resid_dropout, self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: MemoryTransformerConfig):
        super().__init__()
        hidden = int(round(cfg.ffn_mult * cfg.dim))
        self.fc = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.dropout, self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One decoder layer, pre-LN or post-LN (``norm_position``); ``memory`` (if any) placed as
    ``mem_mode`` says."""

    def __init__(self, cfg: MemoryTransformerConfig, memory: nn.Module | None = None):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.mode = cfg.mem_mode if memory is not None else None
        self.ln1 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.ffn = FeedForward(cfg) if self.mode != "replace" else None
        self.ln3 = nn.LayerNorm(cfg.dim, bias=cfg.bias) if self.mode == "after" else None
        self.memory = memory

    def _residual(self, x: torch.Tensor, ln: nn.LayerNorm, sublayer) -> torch.Tensor:
        """``x + sublayer(ln(x))`` (pre-LN) or ``ln(x + sublayer(x))`` (post-LN)."""
        return x + sublayer(ln(x)) if self.pre else ln(x + sublayer(x))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = self._residual(x, self.ln1, lambda h: self.attn(h, cache, layer))
        if self.mode is None:
            return self._residual(x, self.ln2, self.ffn)
        if self.mode == "replace":
            return self._residual(x, self.ln2, lambda h: self.memory(h, mask))
        if self.mode == "parallel":
            return self._residual(x, self.ln2, lambda h: self.ffn(h) + self.memory(h, mask))
        x = self._residual(x, self.ln2, self.ffn)  # "after"
        return self._residual(x, self.ln3, lambda h: self.memory(h, mask))


class MemoryTransformer(nn.Module):
    """GPT-style decoder language model with product-key memories (see the module docstring).

    ``forward(idx (B, T) int, mask (B, T) bool | None) -> logits (B, T, vocab_size)``; ``mask``
    (True = real token) is passed to the memories so that padding does not reach their statistics.

    ``make_memory`` (a :data:`MakeMemory`) builds the memory of each memory layer; by default a
    :class:`pkmem.ProductKeyMemory` with the arguments of ``config.memory``. Another implementation
    plugs in there; for :mod:`pkmem.metrics` (usage, KL) it has an int ``num_slots`` and a
    ``usage_stats`` attribute, and :mod:`pkmem.optim` finds its value table as ``values``.
    """

    def __init__(self, config: MemoryTransformerConfig, make_memory: MakeMemory | None = None):
        super().__init__()
        self.config = cfg = config.validate()
        if make_memory is None:
            make_memory = lambda layer, dim, values: build_memory(cfg.memory, dim, values)  # noqa: E731
        self.mem_layer_indices = cfg.memory_layers()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.dim) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        shared = None
        blocks = []
        for layer in range(1, cfg.n_layers + 1):
            memory = None
            if layer in self.mem_layer_indices:
                memory = make_memory(layer, cfg.dim, shared)
                table = getattr(memory, "values", None)
                if cfg.mem_share_values and shared is None and isinstance(table, nn.Parameter):
                    shared = table
            blocks.append(Block(cfg, memory))
        self.blocks = nn.ModuleList(blocks)
        # post-LN blocks end normalised: no final LayerNorm (as the original Transformer)
        self.ln_f = nn.LayerNorm(cfg.dim, bias=cfg.bias) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 init for the transformer's own weights; memories keep their own initialisation."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        own = [self.tok_emb, self.pos_emb, self.head]
        for block in self.blocks:
            own += [block.attn.qkv, block.attn.proj]
            if block.ffn is not None:
                own += [block.ffn.fc, block.ffn.proj]
        for m in own:
            if m is None:
                continue
            is_out = any(m is b.attn.proj or (b.ffn is not None and m is b.ffn.proj) for b in self.blocks)
            nn.init.normal_(m.weight, std=resid_std if is_out else std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def memories(self) -> list[tuple[int, str, nn.Module]]:
        """``(layer, module_name, module)`` of every memory, layers 1-based."""
        return [
            (i + 1, f"blocks.{i}.memory", b.memory) for i, b in enumerate(self.blocks) if b.memory is not None
        ]

    def num_parameters(self, values: bool = True) -> int:
        """Number of parameters (each shared tensor once); ``values=False`` leaves out value tables."""
        seen, total = set(), 0
        skip = set() if values else {id(p) for p in value_parameters(self)}
        for p in self.parameters():
            if id(p) not in seen and id(p) not in skip:
                seen.add(id(p))
                total += p.numel()
        return total

    def forward(
        self, idx: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` of ``idx (B, T)``; with ``cache`` (a :class:`KVCache`), ``idx``
        continues the cached positions and its keys and values are added to the cache."""
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: idx must be (batch, seq) token ids")
        start = 0 if cache is None else cache.length
        T = idx.shape[1]
        if self.pos_emb is not None and start + T > self.config.seq_len:
            where = f"{T} positions" if cache is None else f"{T} positions after {start} cached ones"
            raise ValueError(f"idx has {where}: at most seq_len={self.config.seq_len} are allowed")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = _dropout(self.drop, x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.head(self.ln_f(x))

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this model (``seq_len`` positions)."""
        return KVCache(len(self.blocks), self.config.seq_len)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """``idx (B, T)`` followed by ``max_new_tokens`` sampled tokens: ``(B, T + max_new_tokens)``.

        See :meth:`stream` for the options; the model is put in eval mode while it samples.
        """
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        return torch.cat([idx, *new], dim=1)

    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` next tokens ``(B, 1)`` of ``idx (B, T)``, one at a time.

        ``temperature`` 0 is greedy; ``top_k`` keeps the k likeliest tokens, ``top_p`` the smallest
        set whose probability reaches p (nucleus sampling), both after the temperature.
        The model sees at most ``seq_len`` tokens. With ``use_cache`` (a :class:`KVCache`) each step
        runs one token; when the window is full, the last ``3/4 * seq_len`` tokens are run again
        into an empty cache, so the context is between 3/4 and all of ``seq_len`` tokens. Without it
        every step runs the last ``seq_len`` tokens (the same logits while the text fits the window,
        many times slower).
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: idx must be (batch, seq >= 1) token ids")
        window = self.config.seq_len
        was_training = self.training
        self.eval()
        cache = self.new_cache() if use_cache else None
        tokens = idx
        try:
            for i in range(max_new_tokens):
                with torch.inference_mode():  # lighter than no_grad: a decoding step is mostly host time
                    if cache is None:
                        context = tokens[:, -window:]
                    elif i == 0 or cache.length == window:  # the prompt, or a full window: start over
                        cache.reset()
                        context = tokens[:, -window:] if i == 0 else tokens[:, -(3 * window) // 4 :]
                    else:
                        context = tokens[:, -1:]
                    logits = self(context, cache=cache)[:, -1]
                    nxt = _sample(logits.float(), temperature, top_k, top_p, generator)
                    tokens = torch.cat([tokens, nxt], dim=1)
                yield nxt.clone()  # an ordinary tensor: inference tensors cannot be saved for backward
        finally:
            self.train(was_training)


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """ValueError naming the first sampling option of :meth:`MemoryTransformer.stream` that is not allowed."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise not_allowed("max_new_tokens", max_new_tokens, "an int >= 0")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise not_allowed("temperature", temperature, "a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise not_allowed("top_k", top_k, "an int >= 1 or None")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise not_allowed("top_p", top_p, "a number in (0, 1] or None")


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row of ``logits (B, V)``: ``(B, 1)``."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a limit float32 cannot tell from it
        return logits.argmax(-1, keepdim=True)
    # shifted first: a tiny temperature gives -inf, not inf - inf (a greedy pick, not NaN)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the likelier ones alone reach top_p (the likeliest always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
