import math

import pytest
import torch

from pkmem import ProductKeyMemory
from pkmem.models import MemoryTransformer, MemoryTransformerConfig, default_memory_layers


def small(memory: dict | None = None, **kw) -> MemoryTransformerConfig:
    """A small config; ``memory`` entries are merged into the small memory section."""
    base = dict(vocab_size=50, seq_len=16, dim=32, n_layers=4, n_heads=4)
    base.update(kw)
    return MemoryTransformerConfig(
        **base, memory={**dict(heads=2, num_keys=8, topk=4, k_dim=16), **(memory or {})}
    )


@pytest.mark.parametrize(
    "layers, memories, expected",
    [
        (16, 2, (6, 12)),  # the paper's example (§4.3)
        (12, 1, (6,)),
        (24, 3, (6, 12, 18)),
        (6, 1, (3,)),
        (8, 1, (4,)),
        (4, 4, (1, 2, 3, 4)),
        (5, 3, (1, 2, 3)),  # ceil would pass layer 5: floor
        (7, 0, ()),
    ],
)
def test_default_placement(layers, memories, expected):
    assert default_memory_layers(layers, memories) == expected
    step = math.ceil(layers / (memories + 1)) if memories else 0
    if memories and step * memories <= layers:
        assert expected == tuple(step * i for i in range(1, memories + 1))


def test_placement_errors():
    with pytest.raises(ValueError, match="n_memories"):
        default_memory_layers(4, 5)
    with pytest.raises(ValueError, match="n_layers"):
        default_memory_layers(0, 1)


def test_memory_layers_resolution():
    assert small(n_memories=2, n_layers=16).memory_layers() == (6, 12)
    assert small().memory_layers() == (2,)  # one memory by default
    assert small(mem_layers=(4, 1)).memory_layers() == (1, 4)
    assert small(mem_layers=()).memory_layers() == ()
    model = MemoryTransformer(small(mem_layers=(1, 3)))
    assert [(layer, name) for layer, name, _ in model.memories()] == [
        (1, "blocks.0.memory"),
        (3, "blocks.2.memory"),
    ]
    assert all(isinstance(m, ProductKeyMemory) for _, _, m in model.memories())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_heads=5), "n_heads"),
        (dict(mem_layers=(5,)), "mem_layers"),
        (dict(mem_layers=(2, 2)), "mem_layers"),
        (dict(mem_layers=(2,), n_memories=2), "n_memories"),
        (dict(mem_mode="before"), "mem_mode"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(memory=dict(topk=9)), "memory.topk=9 is not allowed"),  # checked by the layer itself
        (dict(memory=dict(k_dim=15)), "memory.k_dim=15 is not allowed: memory.k_dim must be even"),
        (dict(memory=dict(topkk=3)), "unknown config key 'memory.topkk'"),
        (dict(memory=dict(values=None)), "unknown config key 'memory.values'"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MemoryTransformer(small(**kw))


@pytest.mark.parametrize("mode", ["replace", "parallel", "after"])
def test_memory_modes(mode):
    torch.manual_seed(0)
    model = MemoryTransformer(small(mem_layers=(2,), mem_mode=mode))
    block = model.blocks[1]
    assert isinstance(block.memory, ProductKeyMemory)
    assert (block.ffn is None) == (mode == "replace")
    assert (block.ln3 is not None) == (mode == "after")
    assert all(b.memory is None and b.ffn is not None for i, b in enumerate(model.blocks) if i != 1)
    idx = torch.randint(0, 50, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 50)
    logits.float().pow(2).mean().backward()
    assert block.memory.values.grad is not None and block.memory.values.grad.abs().sum() > 0
    if block.ffn is not None:
        assert block.ffn.fc.weight.grad.abs().sum() > 0

    # the memory's contribution: zeroing its values removes exactly memory(its input)
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 16, 32)
        a = x + block.attn(block.ln1(x))
        h = block.ln2(a)
        mem_in = block.ln3(a + block.ffn(h)) if mode == "after" else h
        expected = block.memory(mem_in)
        y = block(x)
        block.memory.values.zero_()
        y0 = block(x)
    torch.testing.assert_close(y - y0, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().sum() > 0


def test_replace_block_is_attention_plus_memory():
    torch.manual_seed(0)
    model = MemoryTransformer(small(mem_layers=(1,), mem_mode="replace")).eval()
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        a = x + block.attn(block.ln1(x))
        expected = a + block.memory(block.ln2(a))
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("pos_emb", ["learned", "rotary", "none"])
@pytest.mark.parametrize("mode", ["replace", "parallel", "after"])
def test_causal(pos_emb, mode):
    """In eval mode (BatchNorm on running statistics) a token never sees later tokens."""
    torch.manual_seed(0)
    model = MemoryTransformer(small(pos_emb=pos_emb, mem_mode=mode, n_layers=2)).eval()
    idx = torch.randint(0, 50, (2, 16))
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 7) % 50
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_mask_reaches_the_memory(monkeypatch):
    model = MemoryTransformer(small(mem_layers=(2,)))
    seen = []
    memory = model.blocks[1].memory
    original = memory.forward

    def spy(x, mask=None):
        seen.append(mask)
        return original(x, mask)

    monkeypatch.setattr(memory, "forward", spy)
    idx = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    model(idx, mask)
    assert seen[-1] is mask
    model(idx)
    assert seen[-1] is None


def test_too_long_input_and_bad_shape():
    model = MemoryTransformer(small())
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(17, dtype=torch.long))


def test_parameters_and_values():
    model = MemoryTransformer(small(mem_layers=(1, 3)))
    values = sum(m.values.numel() for _, _, m in model.memories())
    assert model.num_parameters() - model.num_parameters(values=False) == values == 2 * 64 * 32
    shared = MemoryTransformer(small(mem_layers=(1, 3), mem_share_values=True))
    a, b = (m for _, _, m in shared.memories())
    assert a.values is b.values
    assert shared.num_parameters() == model.num_parameters() - 64 * 32


def test_tied_embeddings():
    model = MemoryTransformer(small(tie_embeddings=True))
    assert model.head.weight is model.tok_emb.weight


def test_generate():
    torch.manual_seed(0)
    model = MemoryTransformer(small()).eval()
    idx = torch.randint(0, 50, (2, 5))
    out = model.generate(idx, 20, temperature=0.0)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    again = model.generate(idx, 20, temperature=0.0)
    assert torch.equal(out, again)  # greedy is deterministic, also past seq_len (the context is cropped)
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(idx, 3, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (2, 8) and int(sampled.max()) < 50


def _trained_like(cfg) -> MemoryTransformer:
    """A model in eval mode whose memories' BatchNorms have non-trivial running statistics."""
    torch.manual_seed(0)
    model = MemoryTransformer(cfg)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (4, cfg.seq_len)))  # training mode: running stats move
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos_emb="learned"),
        dict(pos_emb="rotary"),
        dict(pos_emb="none"),
        dict(pos_emb="rotary", norm_position="post", mem_mode="parallel"),
        dict(pos_emb="learned", mem_mode="after", mem_layers=(1, 3)),
    ],
)
def test_cached_logits_equal_the_full_forward_token_by_token(kw):
    model = _trained_like(small(**kw))
    idx = torch.randint(0, 50, (2, 16))
    full = model(idx)  # (2, 16, 50): every position sees all tokens before it
    cache = model.new_cache()
    steps = [model(idx[:, :5], cache=cache)]  # a 5-token prompt, then one token at a time
    for t in range(5, 16):
        steps.append(model(idx[:, t : t + 1], cache=cache))
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    cache.reset()  # several tokens after cached ones: the mask inside the new chunk is causal
    a = model(idx[:, :7], cache=cache)
    b = model(idx[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_cached_generation_equals_uncached_inside_the_window(pos_emb):
    model = _trained_like(small(pos_emb=pos_emb))
    idx = torch.randint(0, 50, (2, 4))
    fast = model.generate(idx, 12, temperature=0.0)  # 16 = seq_len tokens: no cropping
    slow = model.generate(idx, 12, temperature=0.0, use_cache=False)
    assert torch.equal(fast, slow)
    # sampling with the same seed draws the same tokens
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = model.generate(idx, 12, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(idx, 12, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a, b)


def test_cached_generation_past_the_window_restarts_from_three_quarters_of_it():
    model = _trained_like(small())  # seq_len 16: the cache restarts from the last 12 tokens
    idx = torch.randint(0, 50, (1, 10))
    out = model.generate(idx, 30, temperature=0.0)
    # the same policy, uncached: the context starts over at the last 12 tokens whenever it reaches 16
    tokens, start = idx, 0
    for _ in range(30):
        if tokens.shape[1] - start > 16:
            start = tokens.shape[1] - 12
        nxt = model(tokens[:, start:])[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(out, tokens)


def test_sampling_options():
    from pkmem.models.transformer import _sample

    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -9.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(_sample(logits, 1.0, 2, None, g).unique().tolist()) == {0, 1}
    # top-p: p(0) = 0.66, p(0) + p(1) = 0.90: top_p=0.8 keeps tokens 0 and 1, top_p=0.5 token 0
    assert set(_sample(logits, 1.0, None, 0.8, g).unique().tolist()) == {0, 1}
    assert set(_sample(logits, 1.0, None, 0.5, g).unique().tolist()) == {0}
    assert set(_sample(logits, 1.0, None, 1.0, g).unique().tolist()) >= {0, 1, 2, 3}
    assert _sample(logits[:3], 0.0, None, None, g).flatten().tolist() == [0, 0, 0]  # greedy
    # a low temperature sharpens: almost always the likeliest
    assert (_sample(logits, 0.05, None, None, g) == 0).float().mean() > 0.99
    model = MemoryTransformer(small()).eval()
    idx = torch.zeros(1, 2, dtype=torch.long)
    for kw, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(idx, 2, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    streamed = list(model.stream(idx, 5, temperature=0.0))
    assert len(streamed) == 5 and all(t.shape == (1, 1) for t in streamed)
    assert model.generate(idx, 0).shape == (1, 2)


def test_cache_errors():
    model = MemoryTransformer(small()).eval()
    cache = model.new_cache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="at most seq_len=16"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


class CountingMemory(torch.nn.Module):
    """A foreign memory: a linear map with the memory protocol of pkmem.metrics and pkmem.optim."""

    def __init__(self, dim: int, values: torch.nn.Parameter | None):
        super().__init__()
        self.values = values if values is not None else torch.nn.Parameter(torch.randn(6, dim))
        self.num_slots, self.usage_stats = 6, None
        self.calls = []

    def forward(self, x, mask=None):
        self.calls.append(mask)
        w = torch.softmax(x @ self.values.t(), -1)  # (B, T, 6)
        if self.usage_stats is not None:
            top = w.topk(2, dim=-1)
            self.usage_stats.update(top.indices.unsqueeze(-2), top.values.unsqueeze(-2))
        return w @ self.values


def test_make_memory_plugs_in_another_memory():
    from pkmem.metrics import UsageTracker
    from pkmem.optim import value_parameters

    built = []

    def make_memory(layer, dim, values):
        built.append((layer, dim, values))
        return CountingMemory(dim, values)

    model = MemoryTransformer(small(mem_layers=(1, 3), mem_share_values=True), make_memory=make_memory)
    (l1, m1), (l3, m3) = [(layer, m) for layer, _, m in model.memories()]
    assert (l1, l3) == (1, 3) and [(b[0], b[1]) for b in built] == [(1, 32), (3, 32)]
    assert built[0][2] is None and built[1][2] is m1.values and m3.values is m1.values  # shared table
    assert value_parameters(model) == [m1.values]
    assert model.num_parameters() - model.num_parameters(values=False) == 6 * 32
    mask = torch.ones(2, 16, dtype=torch.bool)
    with UsageTracker(model) as tracker:
        model(torch.randint(0, 50, (2, 16)), mask)
    assert m1.calls[-1] is mask and m3.calls[-1] is mask  # one calling convention: memory(x, mask)
    rep = tracker.report()["blocks.0.memory"]
    assert rep["tokens"] == 32 and 0 < rep["usage"] <= 1


@pytest.mark.parametrize("mode", ["replace", "parallel", "after"])
def test_post_ln_blocks(mode):
    """norm_position="post": x = ln(x + sublayer(x)) for every sublayer, no final LayerNorm."""
    torch.manual_seed(0)
    model = MemoryTransformer(small(mem_layers=(2,), mem_mode=mode, norm_position="post")).eval()
    assert isinstance(model.ln_f, torch.nn.Identity)
    assert isinstance(MemoryTransformer(small()).ln_f, torch.nn.LayerNorm)  # pre-LN by default
    plain, block = model.blocks[0], model.blocks[1]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        a = plain.ln1(x + plain.attn(x))
        torch.testing.assert_close(plain(x), plain.ln2(a + plain.ffn(a)))
        a = block.ln1(x + block.attn(x))
        if mode == "replace":
            expected = block.ln2(a + block.memory(a))
        elif mode == "parallel":
            expected = block.ln2(a + block.ffn(a) + block.memory(a))
        else:
            b = block.ln2(a + block.ffn(a))
            expected = block.ln3(b + block.memory(b))
        torch.testing.assert_close(block(x), expected)
    idx = torch.randint(0, 50, (2, 16))
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 7) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :10], model(idx2)[:, :10])  # causal
    with pytest.raises(ValueError, match="norm_position='middle' is not allowed"):
        MemoryTransformer(small(norm_position="middle"))
