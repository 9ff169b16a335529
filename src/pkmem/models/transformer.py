"""`MemoryTransformer`: a GPT-style decoder with product-key memories in some layers (paper §4).

    tokens ─ embedding (+ learned positions) ─► L × [x += attn(ln(x)); x += ffn|memory(ln(x))] ─ ln ─ head

A memory sits at a 1-based layer index (the paper's "layer 5 of 6") in one of three modes:

- ``"replace"``: the memory takes the FFN's place, ``x += memory(ln(x))`` (the paper, Figure 3);
- ``"parallel"``: FFN and memory read the same normed input, ``x += ffn(h) + memory(h)``;
- ``"after"``: the block keeps its FFN and an extra residual sublayer follows, ``x += memory(ln(x))``.

Without explicit ``mem_layers``, ``n_memories`` memories are spread at regular intervals (§4.3):
``step = ceil(L / (N + 1))``, layers ``step * i`` for ``i = 1..N`` (16 layers, 2 memories -> 6 and 12).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pkmem.layer import ProductKeyMemory

__all__ = ["MemoryTransformerConfig", "MemoryTransformer", "default_memory_layers", "MEM_MODES"]

MEM_MODES = ("replace", "parallel", "after")
MEM_IMPLS = ("pkmem", "product-key-memory")
POS_EMBS = ("learned", "rotary", "none")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


def default_memory_layers(n_layers: int, n_memories: int) -> tuple[int, ...]:
    """1-based layers of ``n_memories`` memories spread over ``n_layers`` layers (paper §4.3).

    ``step = ceil(L / (N + 1))`` and memories at ``step * i``, ``i = 1..N``; where that would pass
    layer ``L`` (e.g. 5 layers, 3 memories), ``step = floor(L / (N + 1))`` instead.
    """
    if not isinstance(n_layers, int) or n_layers < 1:
        raise _bad("n_layers", n_layers, "a positive int")
    if not isinstance(n_memories, int) or not 0 <= n_memories <= n_layers:
        raise _bad("n_memories", n_memories, f"an int in [0, n_layers={n_layers}]")
    if n_memories == 0:
        return ()
    step = math.ceil(n_layers / (n_memories + 1))
    if step * n_memories > n_layers:
        step = max(1, n_layers // (n_memories + 1))
    return tuple(step * i for i in range(1, n_memories + 1))


@dataclass
class MemoryTransformerConfig:
    """Everything that defines a :class:`MemoryTransformer` (flat; ``mem_*`` fields are the memory's)."""

    vocab_size: int = 256  # set from the tokenizer by the trainer
    seq_len: int = 256  # context length (learned positions cover this many tokens)
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    ffn_mult: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    pos_emb: str = "learned"  # "learned" (paper), "rotary" or "none"
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    # memories: explicit 1-based layers, or n_memories spread by default_memory_layers (1 if both unset)
    mem_layers: tuple[int, ...] | None = None
    n_memories: int | None = None
    mem_mode: str = "replace"  # "replace" (paper), "parallel" or "after"
    mem_impl: str = "pkmem"  # "pkmem", or "product-key-memory" (its 0.3.0 PKM, for comparisons)
    mem_heads: int = 4
    mem_num_keys: int = 512
    mem_topk: int = 32
    mem_k_dim: int = 512
    mem_v_dim: int | None = None
    mem_query_hidden: tuple[int, ...] = ()
    mem_query_bias: bool = True
    mem_query_norm: str = "batchnorm"
    mem_normalize_query: bool = False
    mem_product_keys: bool = True
    mem_score: str = "softmax"
    mem_temperature: float = 1.0
    mem_gate: str | None = None
    mem_input_dropout: float = 0.0
    mem_query_dropout: float = 0.0
    mem_value_dropout: float = 0.0
    mem_score_dropout: float = 0.0
    mem_sparse_values: bool = False
    mem_share_values: bool = False  # all memories read one value table (XLM mem_share_values)
    mem_zero_init_values: bool = False
    mem_backend: str = "auto"

    def memory_layers(self) -> tuple[int, ...]:
        """The resolved 1-based memory layers, sorted."""
        if self.mem_layers is not None:
            layers = tuple(self.mem_layers)
            if self.n_memories is not None and self.n_memories != len(layers):
                raise ValueError(
                    f"n_memories={self.n_memories} conflicts with mem_layers={list(layers)}: set only one "
                    "(mem_layers=[] for a model without memory)"
                )
            return tuple(sorted(layers))
        return default_memory_layers(self.n_layers, 1 if self.n_memories is None else self.n_memories)

    def validate(self) -> MemoryTransformerConfig:
        """Raise ValueError naming the first bad field; returns self."""
        for name in ("vocab_size", "seq_len", "dim", "n_layers", "n_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "a positive int")
        if self.dim % self.n_heads:
            raise _bad("n_heads", self.n_heads, f"a divisor of dim={self.dim}")
        if self.pos_emb == "rotary" and (self.dim // self.n_heads) % 2:
            raise _bad("n_heads", self.n_heads, "such that dim / n_heads is even with rotary embeddings")
        if not isinstance(self.ffn_mult, (int, float)) or self.ffn_mult <= 0:
            raise _bad("ffn_mult", self.ffn_mult, "> 0")
        for name in ("dropout",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise _bad(name, v, "in [0, 1)")
        if self.pos_emb not in POS_EMBS:
            raise _bad("pos_emb", self.pos_emb, f"one of {POS_EMBS}")
        if self.mem_mode not in MEM_MODES:
            raise _bad("mem_mode", self.mem_mode, f"one of {MEM_MODES}")
        if self.mem_impl not in MEM_IMPLS:
            raise _bad("mem_impl", self.mem_impl, f"one of {MEM_IMPLS}")
        if self.mem_layers is not None:
            layers = list(self.mem_layers)
            ok = all(
                isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= self.n_layers for i in layers
            )
            if not ok or len(set(layers)) != len(layers):
                raise _bad(
                    "mem_layers", layers, f"distinct 1-based layer indices in [1, n_layers={self.n_layers}]"
                )
        layers = self.memory_layers()
        if layers:  # build one memory on the meta device: the layer checks its own arguments
            with torch.device("meta"):
                _make_memory(self, self.dim)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _make_memory(cfg: MemoryTransformerConfig, dim: int, values: nn.Parameter | None = None) -> nn.Module:
    if cfg.mem_impl == "product-key-memory":
        try:
            from product_key_memory import PKM
        except ImportError as e:
            raise ValueError(
                "mem_impl='product-key-memory' needs the product-key-memory package: "
                "pip install product-key-memory==0.3.0"
            ) from e
        if cfg.mem_query_norm != "layernorm":  # its BatchNorm path normalises the wrong axis (0.3.0)
            raise _bad("mem_query_norm", cfg.mem_query_norm, "'layernorm' with mem_impl='product-key-memory'")
        pkm = PKM(
            dim,
            heads=cfg.mem_heads,
            num_keys=cfg.mem_num_keys,
            topk=cfg.mem_topk,
            dim_head=cfg.mem_k_dim // 2,
            input_dropout=cfg.mem_input_dropout,
            query_dropout=cfg.mem_query_dropout,
            value_dropout=cfg.mem_value_dropout,
            attn_dropout=cfg.mem_score_dropout,
            use_layernorm=True,
            non_competitive_gates=cfg.mem_score == "relu",
        )
        _make_trackable(pkm, cfg.mem_heads, cfg.mem_topk)
        return pkm
    try:
        return _pkmem_memory(cfg, dim, values)
    except ValueError as e:  # name the config keys the user sets (mem_topk), not the layer's (topk)
        raise ValueError(_MEM_ARG.sub(r"mem_\1", str(e))) from None


_MEM_ARGS = [f.name[4:] for f in dataclasses.fields(MemoryTransformerConfig) if f.name.startswith("mem_")]
_MEM_ARG = re.compile(r"(?<![\w.])(" + "|".join(sorted(_MEM_ARGS, key=len, reverse=True)) + r")\b")


def _pkmem_memory(cfg: MemoryTransformerConfig, dim: int, values: nn.Parameter | None) -> nn.Module:
    return ProductKeyMemory(
        dim,
        heads=cfg.mem_heads,
        num_keys=cfg.mem_num_keys,
        topk=cfg.mem_topk,
        k_dim=cfg.mem_k_dim,
        v_dim=cfg.mem_v_dim,
        query_hidden=tuple(cfg.mem_query_hidden),
        query_bias=cfg.mem_query_bias,
        query_norm=cfg.mem_query_norm,
        normalize_query=cfg.mem_normalize_query,
        product_keys=cfg.mem_product_keys,
        score=cfg.mem_score,
        temperature=cfg.mem_temperature,
        gate=cfg.mem_gate,
        input_dropout=cfg.mem_input_dropout,
        query_dropout=cfg.mem_query_dropout,
        value_dropout=cfg.mem_value_dropout,
        score_dropout=cfg.mem_score_dropout,
        sparse_values=cfg.mem_sparse_values,
        values=values,
        zero_init_values=cfg.mem_zero_init_values,
        backend=cfg.mem_backend,
    )


def _make_trackable(pkm: nn.Module, heads: int, topk: int) -> None:
    """Give a product-key-memory ``PKM`` the memory protocol of :mod:`pkmem.metrics` and
    :mod:`pkmem.optim` (``num_slots``, ``usage_stats``): a hook on its value bag reports the reads."""
    pkm.num_slots = pkm.num_keys**2
    pkm.usage_stats = None

    def hook(module, args, kwargs, output):
        if pkm.usage_stats is not None:
            idx, w = args[0], kwargs.get("per_sample_weights")
            if w is None:
                w = torch.ones_like(idx, dtype=torch.float32)
            pkm.usage_stats.update(idx.reshape(-1, heads, topk), w.reshape(-1, heads, topk))

    pkm.values.register_forward_hook(hook, with_kwargs=True)


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
    """One pre-LN decoder layer; ``memory`` (if any) placed as ``mem_mode`` says."""

    def __init__(self, cfg: MemoryTransformerConfig, memory: nn.Module | None = None):
        super().__init__()
        self.mode = cfg.mem_mode if memory is not None else None
        self.ln1 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.ffn = FeedForward(cfg) if self.mode != "replace" else None
        self.ln3 = nn.LayerNorm(cfg.dim, bias=cfg.bias) if self.mode == "after" else None
        self.memory = memory
        self._pass_mask = isinstance(memory, ProductKeyMemory)

    def _mem(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self._pass_mask:
            return self.memory(h, mask)
        return self.memory(h) if mask is None else self.memory(h, input_mask=mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        if self.mode is None:
            return x + self.ffn(h)
        if self.mode == "replace":
            return x + self._mem(h, mask)
        if self.mode == "parallel":
            return x + self.ffn(h) + self._mem(h, mask)
        x = x + self.ffn(h)  # "after"
        return x + self._mem(self.ln3(x), mask)


class MemoryTransformer(nn.Module):
    """GPT-style decoder language model with product-key memories (see the module docstring).

    ``forward(idx (B, T) int, mask (B, T) bool | None) -> logits (B, T, vocab_size)``; ``mask``
    (True = real token) is passed to the memories so that padding does not reach their statistics.
    """

    def __init__(self, config: MemoryTransformerConfig):
        super().__init__()
        self.config = cfg = config.validate()
        self.mem_layer_indices = cfg.memory_layers()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.dim) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        shared = None
        blocks = []
        for layer in range(1, cfg.n_layers + 1):
            memory = None
            if layer in self.mem_layer_indices:
                memory = _make_memory(cfg, cfg.dim, shared)
                if cfg.mem_share_values and shared is None and cfg.mem_impl == "pkmem":
                    shared = memory.values
            blocks.append(Block(cfg, memory))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(cfg.dim, bias=cfg.bias)
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
        skip = set()
        if not values:
            for _, _, m in self.memories():
                w = m.values if isinstance(m.values, torch.Tensor) else m.values.weight
                skip.add(id(w))
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
            raise _bad("temperature", temperature, ">= 0 (0 = greedy)")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.seq_len :])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
