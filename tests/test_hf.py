"""pkmem.hf: memories in Hugging Face transformers models (tiny random configs built here; nothing
is downloaded)."""

import json
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import pkmem  # noqa: E402
import pkmem.hf as H  # noqa: E402

MEM = dict(heads=2, num_keys=8, topk=4, k_dim=16)  # 64 slots
VOCAB = 128


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(cfg)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, n_positions=64
    )
    return transformers.GPT2LMHeadModel(cfg)


def qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def mistral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.MistralForCausalLM(cfg)


BUILDERS = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2, "mistral": mistral}


def ids(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_a_little(model, steps=2):
    """A few AdamW steps (values move, BatchNorm statistics too), then eval mode."""
    model.train()
    opt = pkmem.make_optimizer(model, lr=1e-2, value_lr=1e-1)
    for s in range(steps):
        x = ids(seed=10 + s).to(model.device)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ---- import ----------------------------------------------------------------------------------------
def test_pkmem_and_pkmem_hf_do_not_import_transformers():
    code = (
        "import sys, pkmem, pkmem.hf; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- add_memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_parallel_memory_leaves_the_outputs_unchanged_at_step_0(arch):
    model = BUILDERS[arch]().eval()
    x = ids()
    before = model(x).logits
    keys = set(model.state_dict())
    H.add_memory(model, [0, 1], "parallel", **MEM)
    after = model(x).logits
    assert torch.equal(before, after)
    # the MLPs keep their weights' names; the memories sit at <block>.mlp.memory
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert list(H.memory_modules(model)) == [n for n, _ in model.named_modules() if n.endswith("mlp.memory")]
    assert all(".mlp.memory." in k for k in new) and len(H.memory_modules(model)) == 2
    # and it trains: the memory's values get a gradient, the outputs move after a step
    model.train()
    train_a_little(model, steps=1)
    assert not torch.equal(model(x).logits, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replace_swaps_the_mlp_for_a_memory(arch):
    model = BUILDERS[arch]().eval()
    x = ids()
    before = model(x).logits
    H.add_memory(model, [-1], "replace", **MEM)  # the last block
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    assert isinstance(blocks[1].mlp, H.MemoryMLP) and not isinstance(blocks[0].mlp, H.MemoryMLP)
    assert isinstance(blocks[1].mlp.memory, pkmem.ProductKeyMemory) and blocks[1].mlp.memory.dim == 64
    prefix = "model.layers.1.mlp." if arch == "llama" else "transformer.h.1.mlp."
    assert all(k.startswith(prefix + "memory.") for k in model.state_dict() if k.startswith(prefix))
    assert not torch.equal(model(x).logits, before)
    # the paper's value init (not zero) in "replace" mode, the model's train/eval mode
    assert blocks[1].mlp.memory.values.abs().sum() > 0 and not blocks[1].mlp.memory.training
    assert model.config.pkmem["memories"] == [
        {"layers": [1], "mode": "replace", "blocks": prefix.split(".1.")[0], "options": MEM}
    ]


def test_memory_follows_the_models_dtype_and_options_reach_the_layer():
    model = llama().to(torch.bfloat16)
    H.add_memory(model, [0], "parallel", query_hidden=(32,), score="relu", **MEM)
    mem = model.model.layers[0].mlp.memory
    assert mem.values.dtype == torch.bfloat16 and mem.score == "relu"
    assert len(mem.query_net.linears) == 2 and mem.values.abs().sum() == 0
    assert model.config.pkmem["memories"][0]["options"]["query_hidden"] == [32]  # JSON-ready
    # zero_init_values=False is honoured in parallel mode (the outputs then change at once)
    H.add_memory(model, [1], "parallel", zero_init_values=False, **MEM)
    assert model.model.layers[1].mlp.memory.values.abs().sum() > 0


def test_add_memory_errors_name_the_argument():
    model = llama()
    with pytest.raises(
        ValueError, match=r"layers=\[2\] is not allowed: .*0-based block indices in \[-2, 2\)"
    ):
        H.add_memory(model, [2], **MEM)
    with pytest.raises(ValueError, match="layers=.*distinct"):
        H.add_memory(model, [0, -2], **MEM)
    with pytest.raises(ValueError, match="mode='after' is not allowed"):
        H.add_memory(model, [0], "after", **MEM)
    with pytest.raises(ValueError, match="dim=64 is not allowed: dim is the model's hidden_size"):
        H.add_memory(model, [0], dim=64, **MEM)
    with pytest.raises(
        ValueError, match="topk=99 is not allowed"
    ):  # the layer's own checks, before any change
        H.add_memory(model, [0], **{**MEM, "topk": 99})
    assert not H.memory_modules(model) and not hasattr(model.config, "pkmem")
    H.add_memory(model, [0], **MEM)
    with pytest.raises(ValueError, match=r"block 0 \(model.layers.0\) has one"):
        H.add_memory(model, [0], "parallel", **MEM)
    with pytest.raises(ValueError, match="blocks='model.nope' is not allowed"):
        H.add_memory(model, [1], blocks="model.nope", **MEM)


def test_add_memory_names_the_model_class_when_it_finds_no_blocks():
    class NoMLPModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    with pytest.raises(ValueError, match="cannot find the transformer blocks of NoMLPModel"):
        H.add_memory(NoMLPModel(), [0], **MEM)


def test_blocks_found_generically_and_by_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(16, 16)

        def forward(self, x):
            return x + self.mlp(x)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=16)
            self.stack = nn.Module()
            self.stack.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.stack.blocks:
                x = b(x)
            return x

    model = Custom().eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    H.add_memory(model, [1], "parallel", **{**MEM, "k_dim": 8})
    assert torch.equal(model(x), before)
    assert model.config.pkmem["memories"][0]["blocks"] == "stack.blocks"
    H.add_memory(model, [2], blocks="stack.blocks", **{**MEM, "k_dim": 8})
    assert isinstance(model.stack.blocks[2].mlp, H.MemoryMLP)


# ---- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,mode", [("llama", "replace"), ("llama", "parallel"), ("gpt2", "replace")])
def test_greedy_generate_with_kv_cache_equals_a_manual_loop(arch, mode):
    model = BUILDERS[arch]()
    H.add_memory(model, [0], mode, **MEM)
    train_a_little(model)  # parallel values are no longer zero
    prompt = ids(batch=2, seq=5)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    x = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole sequence each time
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


# ---- the attention mask reaches the memories -----------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_is_invisible_to_the_memory_in_training(arch):
    """In train mode the query BatchNorm uses batch statistics: the real tokens' outputs and the
    running statistics are the same with and without padding only if the memory sees the mask."""
    model = BUILDERS[arch]()
    if arch == "gpt2":
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    H.add_memory(model, [0, 1], "replace", **MEM)
    model.train()
    x = ids(batch=2, seq=8)
    padded = torch.cat([x, ids(batch=2, seq=4, seed=7)], dim=1)
    mask = torch.cat([torch.ones(2, 8), torch.zeros(2, 4)], dim=1).long()
    bn = list(H.memory_modules(model).values())[0].query_net.norms[0]
    bn.running_mean.zero_()
    plain = model(input_ids=x).logits
    ref = bn.running_mean.clone()
    bn.running_mean.zero_()
    with_pad = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(with_pad[:, :8], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref, rtol=1e-5, atol=1e-6)
    # the mask is not kept for later calls in eval mode
    model.eval()
    model(input_ids=padded, attention_mask=mask)
    decoder = model.model if arch == "llama" else model.transformer
    assert decoder._pkmem_token_mask.mask is None


# ---- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_and_from_pretrained_round_trip(arch, tmp_path):
    model = BUILDERS[arch]()
    H.add_memory(model, [0], "replace", **MEM)
    H.add_memory(model, [1], "parallel", **{**MEM, "query_hidden": (8,)})
    train_a_little(model)
    x = ids()
    ref = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["pkmem"]
    assert saved["format"] == 1 and [m["mode"] for m in saved["memories"]] == ["replace", "parallel"]
    assert (tmp_path / "model.safetensors").is_file()
    loaded = H.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded(x).logits, ref)
    assert loaded.config.pkmem == model.config.pkmem
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # and it still generates and saves again
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(H.from_pretrained(tmp_path / "again")(x).logits, ref)


def test_from_pretrained_dtype_and_backend(tmp_path):
    model = llama()
    H.add_memory(model, [0], "parallel", **MEM)
    model.save_pretrained(tmp_path)
    loaded = H.from_pretrained(tmp_path, dtype=torch.bfloat16, backend="torch")
    mem = loaded.model.layers[0].mlp.memory
    assert mem.values.dtype == torch.bfloat16 and mem.backend == "torch"
    assert loaded(ids()).logits.dtype == torch.bfloat16


def test_from_pretrained_is_strict_and_rejects_plain_models(tmp_path):
    from safetensors.torch import load_file, save_file

    plain = llama()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="has no 'pkmem' section"):
        H.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="a local directory written by save_pretrained"):
        H.from_pretrained(tmp_path / "missing")
    model = llama()
    H.add_memory(model, [0], **MEM)
    model.save_pretrained(tmp_path / "mem")
    weights = tmp_path / "mem" / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"1 unexpected \['extra.weight'\]"):
        H.from_pretrained(tmp_path / "mem")
    del state["model.layers.0.mlp.memory.values"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"1 missing weights \['model.layers.0.mlp.memory.values'\]"):
        H.from_pretrained(tmp_path / "mem")


# ---- training stacks ---------------------------------------------------------------------------------
def test_trainer_runs_a_few_steps_with_pkmem_optimizer(tmp_path):
    model = llama()
    H.add_memory(model, [1], "replace", **MEM)
    data = []
    for i in range(8):
        x = ids(batch=1, seq=16, seed=i)[0]
        data.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    values = model.model.layers[1].mlp.memory.values
    before = values.detach().clone()
    optimizer = pkmem.make_optimizer(model, lr=1e-3, value_lr=1e-2)  # the values in their own group
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(values, before)


@pytest.mark.parametrize("train_memory", [False, True])
def test_peft_lora_on_attention_with_the_memory_frozen_or_trained(train_memory):
    peft = pytest.importorskip("peft")
    model = llama()
    H.add_memory(model, [1], "replace", **MEM)
    values = model.model.layers[1].mlp.memory.values
    before = values.detach().clone()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if train_memory:
        for mem in H.memory_modules(lora).values():
            mem.requires_grad_(True)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    assert any(".memory." in n for n in trainable) == train_memory
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora_b = next(p for n, p in lora.named_parameters() if "lora_B" in n)
    for s in range(2):
        x = ids(seed=s)
        lora(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert lora_b.abs().sum() > 0
    assert torch.equal(values, before) != train_memory
    lora.eval()
    assert lora.generate(input_ids=ids(batch=1, seq=4), max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_bf16_autocast_and_bf16_weights():
    model = llama()
    H.add_memory(model, [0], "parallel", **MEM)
    H.add_memory(model, [1], "replace", **MEM)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for mem in H.memory_modules(model).values():
        assert mem.values.grad is not None and torch.isfinite(mem.values.grad).all()
        assert mem.values.grad.abs().sum() > 0
    model = train_a_little(model).to(torch.bfloat16)
    assert model(x).logits.dtype == torch.bfloat16
    out = model.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_torch_compile_runs_in_one_graph():
    model = llama()
    H.add_memory(model, [0], "replace", **MEM)
    H.add_memory(model, [1], "parallel", **MEM)
    model.train()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    ref = model(input_ids=x, attention_mask=mask, labels=x).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss = compiled(input_ids=x, attention_mask=mask, labels=x).loss
    loss.backward()
    torch.testing.assert_close(loss, ref)
    assert model.model.layers[0].mlp.memory.values.grad is not None
    torch._dynamo.reset()


# ---- finetune -----------------------------------------------------------------------------------------
def test_finetune_logs_trains_and_resumes_exactly():
    tokens = torch.arange(400) % 17  # a periodic stream: easy to learn
    kw = dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, value_lr=1e-2, log_every=2, warmup_steps=2)

    def fresh():
        model = llama()
        H.add_memory(model, [1], "replace", **MEM)
        return model

    full = fresh()
    seen = []
    records = H.finetune(full, tokens, callback=seen.append, **kw)
    assert seen == records and [r["step"] for r in records] == [2, 4]
    r = records[-1]
    assert set(r) == {"step", "loss", "skipped", "lr", "grad_norm", "value_grad_norm", "memory"}
    assert r["skipped"] == 0 and r["lr"] == 3e-3 and records[0]["lr"] == 3e-3
    assert (
        set(r["memory"]) == {"model.layers.1.mlp.memory"}
        and 0 < r["memory"]["model.layers.1.mlp.memory"]["usage"]
    )
    # resumed: 2 steps, then 2 more from step 2 with the same optimizer -> the same weights
    half = fresh()
    opt = pkmem.make_optimizer(half, 3e-3, 1e-2)
    H.finetune(half, tokens, optimizer=opt, **{**kw, "steps": 2})
    H.finetune(half, tokens, optimizer=opt, start_step=2, **kw)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(half.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # and it learns the stream
    model = fresh()
    recs = H.finetune(model, tokens, **{**kw, "steps": 40, "log_every": 20, "lr": 1e-2})
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0


def test_finetune_skips_a_non_finite_step_and_checks_arguments():
    model = llama()
    H.add_memory(model, [1], "replace", **MEM)
    tokens = torch.arange(200) % 11
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = H.finetune(model, tokens, steps=1, batch_size=2, seq_len=8)
    assert recs[0]["skipped"] == 1
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]) or torch.isnan(v).any(), k
    with pytest.raises(ValueError, match="steps=0 is not allowed"):
        H.finetune(model, tokens, steps=0)
    with pytest.raises(
        ValueError, match=r"seq_len=999 is not allowed: seq_len must be <= the number of tokens"
    ):
        H.finetune(model, tokens, steps=1, seq_len=999)
    with pytest.raises(ValueError, match="data=.* is not allowed"):
        H.finetune(model, torch.zeros(2, 3, dtype=torch.long), steps=1)
    background = H.slot_counts(model, [tokens[:16].view(2, 8)])
    with pytest.raises(ValueError, match="sparse='dict' is not allowed"):
        H.finetune(model, tokens, steps=1, sparse={})
    other = llama()
    H.add_memory(other, [1], "replace", **MEM)
    with pytest.raises(ValueError, match="SparseMemoryFinetuner of this model"):
        H.finetune(model, tokens, steps=1, sparse=H.SparseMemoryFinetuner(other, background, 4, 1.0))
    smf = H.SparseMemoryFinetuner(model, background, 4, 1.0)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(
        ValueError, match="optimizer='AdamW' is not allowed: optimizer must be None with sparse"
    ):
        H.finetune(model, tokens, steps=1, sparse=smf, optimizer=adamw)
    smf.restore()


def test_tokenize_and_window_batch():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 + 1 for c in text]}

    t = H.tokenize(Tok(), ["ab", "c"])
    assert t.tolist() == [98, 99, 0, 100, 0] and t.dtype == torch.int64
    tokens = torch.arange(100)
    a = H.window_batch(tokens, 3, 10, seed=1, step=5)
    assert torch.equal(a["input_ids"], H.window_batch(tokens.numpy(), 3, 10, seed=1, step=5)["input_ids"])
    assert not torch.equal(a["input_ids"], H.window_batch(tokens, 3, 10, seed=1, step=6)["input_ids"])
    assert torch.equal(a["labels"], a["input_ids"]) and a["input_ids"].shape == (3, 10)
    assert ((a["input_ids"][:, 1:] - a["input_ids"][:, :-1]) == 1).all()  # contiguous windows


# ---- on a GPU (the Triton kernels inside a transformers model) -----------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_kernels_bf16_generate_round_trip_and_sparse_finetuning(tmp_path):
    model = llama().cuda()
    H.add_memory(model, [0], "replace", **MEM)
    H.add_memory(model, [1], "parallel", **MEM)
    assert all(m.values.is_cuda for m in H.memory_modules(model).values())
    x = ids().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].mlp.memory.values.grad.abs().sum() > 0
    train_a_little(model)
    prompt = x[:, :5]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    y = prompt
    with torch.no_grad():
        for _ in range(6):
            y = torch.cat([y, model(y).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, y)
    model.save_pretrained(tmp_path)
    loaded = H.from_pretrained(tmp_path, device="cuda")
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    background = H.slot_counts(model, [ids(seed=s).cuda() for s in range(4)])
    before = model.model.layers[0].mlp.memory.values.detach().clone()
    smf = H.SparseMemoryFinetuner(model, background, top_t=4, lr=1.0)
    rows = smf.step(x)["slots"]["model.layers.0.mlp.memory"]
    smf.restore()
    after = model.model.layers[0].mlp.memory.values.detach()
    assert set((after != before).any(1).nonzero().flatten().tolist()) <= set(rows.tolist())
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
