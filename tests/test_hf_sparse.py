"""Sparse memory finetuning (pkmem.hf.sparse): background counts, TF-IDF ranking, row-only updates."""

import copy
import math

import pytest
import torch
from torch import nn

import pkmem
from pkmem.hf import SlotCounts, SparseMemoryFinetuner, finetune, slot_counts, tfidf_scores, top_slots

MEM = dict(heads=2, num_keys=8, topk=4, k_dim=16)  # 64 slots
VOCAB = 50


class TinyLM(nn.Module):
    """Embedding -> memory (or two, sharing one value table) -> head: a model without transformers."""

    def __init__(self, shared: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 32)
        self.mem = pkmem.ProductKeyMemory(32, **MEM)
        self.mem2 = pkmem.ProductKeyMemory(32, values=self.mem.values, **MEM) if shared else None
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids, mask=None):
        h = self.embed(ids)
        h = h + self.mem(h, mask)
        if self.mem2 is not None:
            h = h + self.mem2(h, mask)
        return self.head(h)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batch(seed, n=2, t=12):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def reads_by_hand(model, memory, ids_list):
    """Per batch, the reads per slot of ``memory`` (its inputs captured, then ``lookup``)."""
    out = []
    for ids in ids_list:
        seen = []
        hook = memory.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach()))
        with torch.no_grad():
            model(ids)
        hook.remove()
        _, idx = memory.lookup(seen[0])
        out.append(torch.bincount(idx.flatten(), minlength=memory.num_slots))
    return out


# ---- ranking ----------------------------------------------------------------------------------------
def test_tfidf_matches_a_hand_computation():
    counts = torch.tensor([3, 0, 1, 2, 0, 2])
    batches_read = torch.tensor([0, 1, 4, 2, 3, 2])
    n = 4  # background batches
    total = 8
    expected = [
        3 / total * math.log(4 / 1),
        -math.inf,  # not read by the batch
        1 / total * math.log(4 / 5),  # read by every background batch: negative
        2 / total * math.log(4 / 3),
        -math.inf,
        2 / total * math.log(4 / 3),
    ]
    scores = tfidf_scores(counts, batches_read, n)
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx(expected)
    assert top_slots(counts, batches_read, n, 3).tolist() == [0, 3, 5]  # tie 3/5: lower slot first
    assert top_slots(counts, batches_read, n, 10).tolist() == [0, 3, 5, 2]  # only slots the batch read
    assert top_slots(counts, batches_read, n, 1).tolist() == [0]
    with pytest.raises(ValueError, match="top_t=0 is not allowed"):
        top_slots(counts, batches_read, n, 0)
    with pytest.raises(ValueError, match="num_batches=0 is not allowed"):
        tfidf_scores(counts, batches_read, 0)


def test_slot_counts_counts_batches_and_reads_per_slot():
    model = TinyLM()
    model.train()  # slot_counts runs in eval mode and restores the mode
    batches = [batch(s) for s in range(5)]
    counts = slot_counts(model, batches)
    assert model.training
    model.eval()
    per_batch = reads_by_hand(model, model.mem, batches)
    assert counts.num_batches == 5 and list(counts.reads) == ["mem"]
    assert torch.equal(counts.reads["mem"], sum(per_batch))
    assert torch.equal(counts.batches_read["mem"], sum((r > 0).long() for r in per_batch))
    assert counts.batches_read["mem"].dtype == torch.int64
    idf = counts.idf("mem")
    assert idf[0].item() == pytest.approx(math.log(5 / (1 + counts.batches_read["mem"][0].item())))


def test_slot_counts_of_a_shared_table_sum_its_memories():
    model = TinyLM(shared=True).eval()
    batches = [batch(s) for s in range(3)]
    counts = slot_counts(model, batches)
    assert list(counts.reads) == ["mem"]  # one table, named after its first memory
    a = reads_by_hand(model, model.mem, batches)
    b = reads_by_hand(model, model.mem2, batches)
    assert torch.equal(counts.reads["mem"], sum(a) + sum(b))
    assert torch.equal(counts.batches_read["mem"], sum(((x + y) > 0).long() for x, y in zip(a, b)))


def test_slot_counts_save_and_load(tmp_path):
    counts = slot_counts(TinyLM(), [batch(s) for s in range(3)])
    counts.save(tmp_path / "bg.safetensors")
    loaded = SlotCounts.load(tmp_path / "bg.safetensors")
    assert loaded.num_batches == 3
    for name in counts.reads:
        assert torch.equal(loaded.reads[name], counts.reads[name])
        assert torch.equal(loaded.batches_read[name], counts.batches_read[name])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="a file written by SlotCounts.save"):
        SlotCounts.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="batches=.* is not allowed"):
        slot_counts(TinyLM(), [])


# ---- the finetuner ----------------------------------------------------------------------------------
def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_rows(before, after):
    return sorted((before != after).any(dim=1).nonzero().flatten().tolist())


def test_sgd_step_updates_exactly_the_top_t_rows_and_nothing_else():
    model = TinyLM()
    background = slot_counts(model, [batch(s) for s in range(6)])
    new = batch(100)
    model.eval()
    counts = reads_by_hand(model, model.mem, [new[:, :-1]])[0]
    expected_rows = top_slots(counts, background.batches_read["mem"], 6, 5)
    assert len(expected_rows) == 5
    # the gradient of the loss w.r.t. the values, computed apart on a copy
    ref = copy.deepcopy(model)
    lm_loss(ref, new).backward()
    grad = ref.mem.values.grad

    flags = [p.requires_grad for p in model.parameters()]
    before = state_copy(model)
    smf = SparseMemoryFinetuner(model, background, top_t=5, lr=0.5, loss_fn=lm_loss)
    out = smf.step(new)
    assert torch.equal(out["slots"]["mem"], expected_rows)
    after = model.state_dict()
    for k in before:  # every other parameter and buffer is bitwise unchanged
        if k != "mem.values":
            assert torch.equal(before[k], after[k]), k
    rows = expected_rows.sort().values.tolist()
    assert changed_rows(before["mem.values"], after["mem.values"]) == rows
    torch.testing.assert_close(after["mem.values"][rows], before["mem.values"][rows] - 0.5 * grad[rows])
    # frozen during finetuning, restored after
    assert [p.requires_grad for p in model.parameters()] == [
        p is model.mem.values for p in model.parameters()
    ]
    smf.restore()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_adamw_updates_only_each_steps_rows_and_counts_steps_per_row():
    model = TinyLM()
    background = slot_counts(model, [batch(s) for s in range(6)])
    smf = SparseMemoryFinetuner(model, background, top_t=6, lr=1e-2, optimizer="adamw", loss_fn=lm_loss)
    smf.step(batch(200))
    mid = model.mem.values.detach().clone()
    rows2 = smf.step(batch(201))["slots"]["mem"]
    # rows chosen at step 1 but not at step 2 keep their value: no momentum reaches them
    assert changed_rows(mid, model.mem.values.detach()) == rows2.sort().values.tolist()
    step = smf.state_dict()["mem"]["step"]
    assert step[rows2].min() >= 1 and int(step.sum()) == 12
    # Adam's first step moves each coordinate by lr (sign of the gradient), bias-corrected per row
    fresh = TinyLM()
    smf = SparseMemoryFinetuner(fresh, background, top_t=3, lr=1e-2, optimizer="adamw", loss_fn=lm_loss)
    before = fresh.mem.values.detach().clone()
    rows = smf.step(batch(300))["slots"]["mem"]
    delta = (fresh.mem.values.detach() - before)[rows].abs()
    torch.testing.assert_close(delta, torch.full_like(delta, 1e-2), rtol=1e-3, atol=1e-6)


def test_finetuner_on_a_transformers_model_with_padding():
    transformers = pytest.importorskip("transformers")
    import pkmem.hf as H

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    model = transformers.LlamaForCausalLM(cfg)
    H.add_memory(model, [0, 1], "replace", **MEM)
    ids = batch(5, t=8)
    padded = torch.cat([ids, batch(6, t=4)], dim=1)
    mask = torch.cat([torch.ones(2, 8), torch.zeros(2, 4)], dim=1).long()
    plain = slot_counts(model, [ids])
    with_pad = slot_counts(model, [{"input_ids": padded, "attention_mask": mask}])
    for name in plain.reads:  # padded tokens read nothing
        assert torch.equal(plain.reads[name], with_pad.reads[name])
    background = slot_counts(model, [batch(s, t=8) for s in range(4)])
    before = state_copy(model)
    smf = SparseMemoryFinetuner(model, background, top_t=4, lr=1.0)
    out = smf.step({"input_ids": padded, "attention_mask": mask})
    smf.restore()
    assert set(out["slots"]) == set(H.memory_modules(model))
    after = model.state_dict()
    for k in before:
        if k.endswith("memory.values"):
            name = k[: -len(".values")]
            assert set(changed_rows(before[k], after[k])) <= set(out["slots"][name].tolist())
        else:
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("values"))


def test_finetune_in_sparse_mode():
    transformers = pytest.importorskip("transformers")
    import pkmem.hf as H

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    H.add_memory(model, [1], "parallel", **MEM)
    tokens = torch.arange(300) % 13
    background = slot_counts(model, [batch(s, t=16) for s in range(4)])
    before = state_copy(model)
    smf = SparseMemoryFinetuner(model, background, top_t=5, lr=1.0)
    records = finetune(
        model, tokens, steps=2, batch_size=2, seq_len=16, log_every=1, warmup_steps=2, sparse=smf
    )
    assert [r["step"] for r in records] == [1, 2] and [r["lr"] for r in records] == [0.5, 1.0]
    assert records[0]["slots"] == {"transformer.h.1.mlp.memory": 5} and "grad_norm" not in records[0]
    assert 0 < records[0]["memory"]["transformer.h.1.mlp.memory"]["usage"] <= 1
    assert smf.lr == 1.0 and records[-1]["skipped"] == 0
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["transformer.h.1.mlp.memory.values"]
    assert len(changed_rows(before[changed[0]], after[changed[0]])) <= 10
    assert sum(p.requires_grad for p in model.parameters()) == 1  # frozen until the finetuner restores
    smf.restore()
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_a_non_finite_step_changes_nothing():
    model = TinyLM()
    background = slot_counts(model, [batch(0)])
    ok = SparseMemoryFinetuner(copy.deepcopy(model), background, top_t=4, lr=1.0, loss_fn=lm_loss)
    assert not ok.step(batch(1))["skipped"]
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    before = state_copy(model)
    smf = SparseMemoryFinetuner(model, background, top_t=4, lr=1.0, loss_fn=lm_loss)
    out = smf.step(batch(1))
    assert out["skipped"] and len(out["slots"]["mem"]) == 4
    assert torch.equal(model.mem.values, before["mem.values"])


def test_finetuner_checks_its_arguments():
    model = TinyLM()
    background = slot_counts(model, [batch(0)])
    with pytest.raises(ValueError, match="top_t=0 is not allowed"):
        SparseMemoryFinetuner(model, background, top_t=0, lr=1.0)
    with pytest.raises(ValueError, match="optimizer='adam' is not allowed"):
        SparseMemoryFinetuner(model, background, top_t=1, lr=1.0, optimizer="adam")
    with pytest.raises(ValueError, match="lr=0 is not allowed"):
        SparseMemoryFinetuner(model, background, top_t=1, lr=0)
    with pytest.raises(ValueError, match="background='dict' is not allowed"):
        SparseMemoryFinetuner(model, {}, top_t=1, lr=1.0)
    other = slot_counts(TinyLM(shared=True), [batch(0)])
    other.batches_read["mem"] = other.batches_read["mem"][:10]
    with pytest.raises(ValueError, match="it must count the model's table 'mem'"):
        SparseMemoryFinetuner(model, other, top_t=1, lr=1.0)
    with pytest.raises(ValueError, match="holds no pkmem.ProductKeyMemory"):
        slot_counts(nn.Linear(2, 2), [torch.zeros(1, 2)])
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen by a failed constructor
