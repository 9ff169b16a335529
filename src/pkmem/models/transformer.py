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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pkmem._util import not_allowed
from pkmem.config import MEM_MODES, MemoryTransformerConfig, build_memory, default_memory_layers
from pkmem.optim import value_parameters

__all__ = [
    "MemoryTransformerConfig",
    "MemoryTransformer",
    "MakeMemory",
    "default_memory_layers",
    "MEM_MODES",
]

MakeMemory = Callable[[int, int, "nn.Parameter | None"], nn.Module]
"""``make_memory(layer, dim, values) -> memory``: builds the memory of 1-based ``layer`` for inputs of
width ``dim``; ``values`` is the value table to share (the first memory's ``values`` Parameter when
``mem_share_values``), else None. The memory is called as ``memory(x (B, T, dim), mask (B, T) bool or
None) -> (B, T, dim)``."""


def _rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of ``x (B, heads, T, d)`` (pairs of channels rotated by position)."""
    T, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    angle = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MemoryTransformerConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.rotary = cfg.rope_base if cfg.pos_emb == "rotary" else None
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = _rotary(q, self.rotary), _rotary(k, self.rotary)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, heads, T, d)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, cfg: MemoryTransformerConfig):
        super().__init__()
        hidden = int(round(cfg.ffn_mult * cfg.dim))
        self.fc = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.ln1, self.attn)
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

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: idx must be (batch, seq) token ids")
        T = idx.shape[1]
        if self.pos_emb is not None and T > self.config.seq_len:
            raise ValueError(f"idx has {T} positions: at most seq_len={self.config.seq_len} are allowed")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx (B, T)``; returns ``(B, T + max_new_tokens)``."""
        if temperature < 0:
            raise not_allowed("temperature", temperature, ">= 0 (0 = greedy)")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.seq_len :])[:, -1].float()
            if temperature < torch.finfo(torch.float32).tiny:  # 0, or a limit float32 cannot tell from it
                nxt = logits.argmax(-1, keepdim=True)
            else:
                # shifted first: a tiny temperature gives -inf, not inf - inf (a greedy pick, not NaN)
                logits = (logits - logits.amax(-1, keepdim=True)) / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
