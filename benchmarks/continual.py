"""Continual learning: teach a pretrained model new facts, and measure what it forgets.

    python benchmarks/continual.py --device cuda --data-path enwik8.gz --out benchmarks/results/continual
    python benchmarks/continual.py --cpu-small --device cpu --data-path enwik8.gz \\
        --out benchmarks/results/continual-cpu                                   # ~8 min on 2 cores
    python benchmarks/continual.py --tiny --device cpu --out /tmp/continual     # smoke test, seconds

The setting of Lin et al. 2025 ("Continual Learning via Sparse Memory Finetuning") on the synthetic
facts of :mod:`pkmem.tasks` (``"<name> lives in <city>."``, four phrasings, bytes as tokens):

1. **Pretrain** a small byte-level Llama (``transformers.LlamaConfig``, built in-process, nothing
   downloaded) whose middle block's MLP is a product-key memory (:func:`pkmem.hf.add_memory`,
   ``mode="replace"``) on *old* data: every batch is half sentences of ``N_old`` old facts and half
   windows of background text (the enwik8 training split with ``--data-path``; otherwise a seeded
   generated text of made-up words, so that tests need no data).
2. **Count** how many background documents read each memory slot (:func:`pkmem.hf.slot_counts`);
   a document is one window of the pretraining data (see :func:`background_docs` for why not a
   whole batch).
3. **Teach** ``N_new`` new facts (names never seen in pretraining), from the same pretrained
   checkpoint and with the same batches of new-fact sentences only (no replay of old data), for the
   same number of steps, by three methods:

   - ``full``: AdamW on every parameter;
   - ``lora``: LoRA (``peft``) on the attention and MLP projections of every block, AdamW;
   - ``sparse``: sparse memory finetuning (:class:`pkmem.hf.SparseMemoryFinetuner`): each step
     updates only the ``top_t`` value rows that the batch reads most relative to the background
     (TF-IDF), by SGD; every other parameter is frozen.

   The model runs in eval mode in all three (no dropout; the memory's query BatchNorm keeps its
   pretraining statistics), so that what changes is only what each method trains. Each method's
   learning rate is chosen on a grid by its recall of a *validation* set of new facts (another
   ``N_new`` new names, taught alone, first seed only): the smallest rate within ``select_within``
   of the grid's best recall. The old-fact and text metrics that measure forgetting are recorded
   for the grid but never used to choose.
4. **Report** per method (mean ± sd over seeds; each seed pretrains its own model): new-fact recall
   queried in a training phrasing and in a phrasing never trained on, old-fact recall before and
   after (the forgetting), bits per byte on background text never trained on (the enwik8 validation
   split, or another sample of the generated text) before and after, parameters trained and
   changed, and wall time.

Resumable: each finished part (a pretrained checkpoint, its slot counts, a grid point, a final run)
is a file under ``--out`` with a fingerprint of its settings, and is not redone while they are
unchanged (the model checkpoints are listed in ``--out``'s ``.gitignore``). Writes
``results.json`` (settings, versions, device, command, every part), ``results.md`` (the table) and
``continual.png`` (forgetting against new-fact recall). ``--stop-after S`` starts no new part after
S seconds and exits with status 3: run the command again to continue.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

METHODS = ("full", "lora", "sparse")
LN2 = math.log(2)
GITIGNORE = "*.safetensors\npretrain-s*/*\n!pretrain-s*/pretrain.json\n"

# ---- settings -----------------------------------------------------------------------------------
# The default: one H200 (802 s of parts for 3 seeds, measured; resumable, --stop-after splits it)
DEFAULT = {
    "model": {"dim": 256, "n_layers": 4, "n_heads": 4, "ffn_mult": 4.0, "seq_len": 128, "memory_layer": 2},
    # ProductKeyMemory's own argument names
    "memory": {"heads": 4, "num_keys": 256, "topk": 32, "k_dim": 128, "query_norm": "batchnorm"},
    "facts": {"n_old": 2048, "n_new": 256, "n_values": 100, "seed": 0},
    "text": {"train_bytes": 16_000_000, "heldout_windows": 512},
    "pretrain": {
        "steps": 4000,
        "batch_size": 128,
        "fact_fraction": 0.5,
        "lr": 2e-3,
        "value_lr": 1e-2,
        "warmup_steps": 200,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        # documents of the background counts: windows of the pretraining data (see background_docs)
        "background_docs": 2048,
        "background_rows": 1,
    },
    "finetune": {
        "steps": 300,
        "batch_size": 64,
        "warmup_steps": 10,  # then cosine decay to min_lr_ratio, every method alike
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,  # full and lora (the sparse finetuner's SGD is not clipped)
        "top_t": 2048,
        "lora_rank": 16,
        # the smallest learning rate whose validation new-fact recall is within this of the grid's best
        "select_within": 0.05,
        "grid": {
            "full": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
            "lora": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
            # SGD on the gradient of the mean loss over batch_size x seq_len tokens: a row read by a
            # few of them gets a tiny gradient, so the rates are large
            "sparse": [1024, 4096, 16384, 65536, 262144],
        },
    },
    "eval": {"queries": 512, "batch_size": 8192},
    "seeds": [0, 1, 2],
}
# --cpu-small: the same experiment, sized for a 2-core CPU (8 min measured, 3 seeds)
CPU_SMALL = {
    "model": {"dim": 64, "n_layers": 3, "n_heads": 4, "ffn_mult": 2.0, "seq_len": 64, "memory_layer": 1},
    "memory": {"heads": 4, "num_keys": 128, "topk": 16, "k_dim": 64},
    "facts": {"n_old": 128, "n_new": 32, "n_values": 16},
    "text": {"train_bytes": 4_000_000, "heldout_windows": 256},
    "pretrain": {
        "steps": 900,
        "batch_size": 32,
        "fact_fraction": 0.75,
        "lr": 3e-3,
        "value_lr": 1e-1,
        "warmup_steps": 50,
        "background_docs": 512,
    },
    "finetune": {
        "steps": 200,
        "batch_size": 16,
        "top_t": 512,
        "lora_rank": 8,
        "grid": {"full": [3e-4, 1e-3, 3e-3], "lora": [1e-3, 3e-3, 1e-2], "sparse": [4096, 16384, 65536]},
    },
    "eval": {"queries": 128, "batch_size": 2048},
}
# --tiny: a smoke test (seconds on a CPU)
TINY = {
    "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_mult": 2.0, "seq_len": 32, "memory_layer": 1},
    "memory": {"heads": 2, "num_keys": 8, "topk": 4, "k_dim": 16},
    "facts": {"n_old": 16, "n_new": 4, "n_values": 4},
    "text": {"train_bytes": 20_000, "heldout_windows": 8},
    "pretrain": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "background_docs": 6},
    "finetune": {
        "steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "top_t": 4,
        "lora_rank": 2,
        "grid": {"full": [1e-3, 3e-3], "lora": [1e-3], "sparse": [100.0, 1000.0]},
    },
    "eval": {"queries": 8, "batch_size": 256},
    "seeds": [0],
}


def _common():
    """benchmarks/common.py (imports torch: only when a part runs or the table is written)."""
    import common

    return common


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _atomic_write(path: Path, text: str) -> None:
    from pkmem._util import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def settings_of(args) -> dict:
    """The settings of the command line ``args`` (a preset, then the flags)."""
    s = copy.deepcopy(DEFAULT)
    if args.tiny:
        s = _merge(s, TINY)
    elif args.cpu_small:
        s = _merge(s, CPU_SMALL)
    if args.seeds is not None:
        s["seeds"] = args.seeds
    if args.pretrain_steps is not None:
        s["pretrain"]["steps"] = args.pretrain_steps
    if args.steps is not None:
        s["finetune"]["steps"] = args.steps
    if args.top_t is not None:
        s["finetune"]["top_t"] = args.top_t
    if args.lora_rank is not None:
        s["finetune"]["lora_rank"] = args.lora_rank
    for m in METHODS:
        grid = getattr(args, f"lr_{m}")
        if grid is not None:
            s["finetune"]["grid"][m] = grid
    if args.n_old is not None:
        s["facts"]["n_old"] = args.n_old
    if args.n_new is not None:
        s["facts"]["n_new"] = args.n_new
    s["methods"] = list(args.methods) if args.methods else list(METHODS)
    return s


# ---- data ---------------------------------------------------------------------------------------
def fact_sets(s: dict):
    """``(old, new_valid, new_test)``: disjoint sets of names (one stream, cut in three), same cities."""
    from pkmem.tasks import make_facts

    f = s["facts"]
    every = make_facts(f["n_old"] + 2 * f["n_new"], f["n_values"], seed=f["seed"])
    a, b = f["n_old"], f["n_old"] + f["n_new"]
    return (
        every.subset(np.arange(0, a)),
        every.subset(np.arange(a, b)),
        every.subset(np.arange(b, b + f["n_new"])),
    )


_ONSETS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def generated_text(n_bytes: int, seed: int, words: int = 512, successors: int = 6) -> bytes:
    """``n_bytes`` of a made-up language: lower-case words of 1-3 syllables, each followed by one of
    ``successors`` words drawn for it (a fixed random bigram grammar, the same for every ``seed``),
    in sentences of 4-12 words. ``seed`` draws the sample; the grammar is fixed."""
    g = np.random.default_rng([0, 11])
    syl = [o + v for o in _ONSETS for v in _VOWELS]
    vocab = sorted(
        {"".join(syl[j] for j in g.integers(0, len(syl), size=g.integers(1, 4))) for _ in range(words)}
    )
    nxt = g.integers(0, len(vocab), size=(len(vocab), successors))
    probs = g.dirichlet(np.ones(successors), size=len(vocab))
    cum = np.cumsum(probs, 1)
    rng = np.random.default_rng([seed, 12])
    out, size = [], 0
    while size < n_bytes:
        k = int(rng.integers(4, 13))
        w = int(rng.integers(0, len(vocab)))
        sentence = [vocab[w]]
        for u in rng.random(k - 1):
            w = int(nxt[w, min(int(np.searchsorted(cum[w], u)), successors - 1)])
            sentence.append(vocab[w])
        line = " ".join(sentence).capitalize() + ". "
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n_bytes]


def _enwik8_bytes(path: str, start: int, count: int) -> bytes:
    """``count`` bytes of enwik8 (plain, .gz or .zip) from offset ``start``."""
    name = path.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            member = next(m for m in z.namelist() if not m.endswith("/"))
            f = z.open(member)
    else:
        f = gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    with f:
        left = start
        while left > 0:  # gzip streams cannot seek fast: read and drop
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            left -= len(chunk)
        data = f.read(count)
    if len(data) < count:
        raise ValueError(f"--data-path {path!r} holds fewer than {start + count:,} bytes: is it enwik8?")
    return data


def background_text(s: dict, data_path: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train bytes, held-out bytes, description)``: enwik8's training split's first bytes and its
    validation split (from byte 90,000,000), or two samples of :func:`generated_text`."""
    t = s["text"]
    heldout_bytes = t["heldout_windows"] * (s["model"]["seq_len"] + 1) * 4
    if data_path:
        train = _enwik8_bytes(data_path, 0, t["train_bytes"])
        heldout = _enwik8_bytes(data_path, 90_000_000, heldout_bytes)
        info = {"source": "enwik8", "path": os.path.abspath(data_path), "heldout_from": 90_000_000}
    else:
        train = generated_text(t["train_bytes"], seed=1)
        heldout = generated_text(heldout_bytes, seed=2)
        info = {"source": "generated (benchmarks/continual.py:generated_text)"}
    info.update(train_bytes=len(train), heldout_bytes=len(heldout))
    return np.frombuffer(train, np.uint8), np.frombuffer(heldout, np.uint8), info


def text_windows(data: np.ndarray, n: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """``n`` windows of ``seq_len + 1`` bytes at random starts drawn from ``(seed, step)``: int64."""
    starts = np.random.default_rng([seed, step, 13]).integers(0, len(data) - seq_len - 1, size=n)
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)


def pretrain_batch(s: dict, old, text: np.ndarray, seed: int, step: int) -> np.ndarray:
    """Step ``step``'s pretraining rows: old-fact sentences, then background text windows."""
    p, T = s["pretrain"], s["model"]["seq_len"]
    n_facts = max(1, round(p["batch_size"] * p["fact_fraction"]))
    rows = [old.batch(step, n_facts, T, seed=seed)]
    if p["batch_size"] > n_facts:
        rows.append(text_windows(text, p["batch_size"] - n_facts, T, seed, step))
    return np.concatenate(rows)


def background_docs(s: dict, old, text: np.ndarray, seed: int) -> list[np.ndarray]:
    """The documents of the background slot counts: ``background_docs`` groups of ``background_rows``
    windows, cut from the first pretraining batches in order.

    A document must be small beside the memory: the inverse document frequency
    ``log(N / (1 + df))`` only tells slots apart if most documents leave most slots unread. A whole
    pretraining batch of the CPU size (32 windows of 65 bytes, 4 heads x top-16 reads per byte) read
    9,240 of the 16,384 slots in every one of 32 batches: those slots' idf was below zero, TF-IDF
    chose rarely read rows, and sparse finetuning learnt nothing at any learning rate tried.
    """
    p = s["pretrain"]
    rows, n = p.get("background_rows", 1), p["background_docs"]
    need = rows * n
    batches = [pretrain_batch(s, old, text, seed, i) for i in range(-(-need // p["batch_size"]))]
    # interleave facts and text: each batch is fact rows, then text rows
    every = np.concatenate(batches)[:need]
    order = np.random.default_rng([seed, 14]).permutation(need)
    every = every[order]
    return [every[i * rows : (i + 1) * rows] for i in range(n)]


# ---- the model ----------------------------------------------------------------------------------
def build_model(s: dict, seed: int):
    """A fresh byte-level Llama with a memory in place of block ``memory_layer``'s MLP."""
    import torch
    import transformers

    import pkmem.hf

    m = s["model"]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=m["dim"],
        intermediate_size=int(round(m["ffn_mult"] * m["dim"])),
        num_hidden_layers=m["n_layers"],
        num_attention_heads=m["n_heads"],
        num_key_value_heads=m["n_heads"],
        max_position_embeddings=m["seq_len"] + 64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    pkmem.hf.add_memory(model, [m["memory_layer"]], "replace", **s["memory"])
    return model


def _amp(device):
    import torch

    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def _loss(model, xy, device):
    import torch

    xy = torch.as_tensor(xy).to(device)
    with _amp(device):
        return model(input_ids=xy, labels=xy).loss


def evaluate(model, s: dict, sets: dict, heldout: np.ndarray, device) -> dict:
    """Recall of each fact set (``{name: (facts, templates)}``) and held-out text bits per byte."""
    import torch

    from pkmem.tasks import evaluate_recall

    e, T = s["eval"], s["model"]["seq_len"]
    model.eval()

    def logits(x):
        return model(x).logits

    out = {}
    with torch.no_grad(), _amp(device):
        for name, (facts, templates) in sets.items():
            ids = facts.query_ids(e["queries"], seed=2)
            for tpl in templates:
                r = evaluate_recall(logits, facts, tpl, ids=ids, batch_size=e["batch_size"], device=device)
                key = f"{name}_recall" + ("_heldout_phrasing" if tpl == "heldout" else "")
                out[key] = r.recall
        n = s["text"]["heldout_windows"]
        starts = np.arange(n) * (len(heldout) // n)
        windows = heldout[starts[:, None] + np.arange(T + 1)].astype(np.int64)
        losses = []
        chunk = max(1, e["batch_size"] // (T + 1))
        for i in range(0, n, chunk):
            part = windows[i : i + chunk]
            losses.append(float(_loss(model, part, device)) * len(part))
        out["heldout_text_bpb"] = sum(losses) / n / LN2
    return out


# ---- parts and their fingerprints ---------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


BACKGROUND_KEYS = ("background_docs", "background_rows")


def pretrain_key(s: dict, seed: int, data: dict, device_type: str) -> str:
    """The fingerprint of the pretrained model and its metrics (not of its background counts)."""
    what = {k: s[k] for k in ("model", "memory", "facts", "text", "eval")}
    what["pretrain"] = {k: v for k, v in s["pretrain"].items() if k not in BACKGROUND_KEYS}
    return _key(what, seed, {k: v for k, v in data.items() if k != "path"}, device_type)


def background_key(s: dict, seed: int, data: dict, device_type: str) -> str:
    bg = {k: s["pretrain"].get(k) for k in BACKGROUND_KEYS}
    return _key(pretrain_key(s, seed, data, device_type), bg)


def _read_part(path: Path, key: str) -> dict | None:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return r if r.get("key") == key else None


def pretrain(s: dict, seed: int, out: Path, data, device, log) -> dict:
    """Pretrain seed ``seed``'s model, unless done already: ``out/pretrain-s<seed>/`` holds the model
    (``save_pretrained``) and ``pretrain.json`` (its metrics before any new fact is taught)."""
    import torch

    import pkmem
    import pkmem.hf

    text, heldout, info, old, valid, test = data
    key = pretrain_key(s, seed, info, device.type)
    folder = out / f"pretrain-s{seed}"
    done = _read_part(folder / "pretrain.json", key)
    if done is not None:
        log(f"seed {seed}: pretrained model done already ({folder})")
        return done
    p = s["pretrain"]
    model = build_model(s, seed).to(device)
    opt = pkmem.make_optimizer(model, lr=p["lr"], value_lr=p["value_lr"])
    base = [g["lr"] for g in opt.param_groups]
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(p["steps"]):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * _common().warmup_cosine(step, p)
        loss = _loss(model, pretrain_batch(s, old, text, seed, step), device)
        loss.backward()
        pkmem.clip_grad_norm(model, p["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % max(1, p["steps"] // 5) == 0 or step + 1 == p["steps"]:
            mean = torch.stack(losses).mean()
            log(f"seed {seed}: pretraining step {step + 1}/{p['steps']}, loss {mean:.3f}")
            losses = []
    train_s = time.perf_counter() - t0
    sets = {"old": (old, [0]), "new": (test, [0, "heldout"]), "new_valid": (valid, [0])}
    t0 = time.perf_counter()
    metrics = evaluate(model, s, sets, heldout, device)
    eval_s = time.perf_counter() - t0
    result = {
        "key": key,
        "seed": seed,
        "params": sum(w.numel() for w in model.parameters()),
        "value_params": sum(m.values.numel() for m in pkmem.hf.memory_modules(model).values()),
        "slots": sum(m.num_slots for m in pkmem.hf.memory_modules(model).values()),
        "train_s": train_s,
        "eval_s": eval_s,
        "metrics": metrics,
    }
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".pretrain-s{seed}."))
    model.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(result, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # the folder appears whole, with its pretrain.json, or not at all
    log(f"seed {seed}: pretrained in {train_s:.0f} s: {_fmt_metrics(metrics)}")
    return result


def count_background(s: dict, seed: int, out: Path, data, device, log) -> dict:
    """Count the background slot reads of seed ``seed``'s pretrained model, unless done already:
    ``out/background-s<seed>.safetensors`` (:class:`pkmem.hf.SlotCounts`) and ``.json``."""
    import torch

    import pkmem.hf

    text, heldout, info, old, valid, test = data
    key = background_key(s, seed, info, device.type)
    path = out / f"background-s{seed}.json"
    done = _read_part(path, key)
    if done is not None and (out / f"background-s{seed}.safetensors").is_file():
        log(f"seed {seed}: background counts done already")
        return done
    model = copy.deepcopy(_pretrained(out / f"pretrain-s{seed}", device))

    def forward(m, batch):
        with _amp(device):
            return m(input_ids=torch.as_tensor(batch).to(device))

    t0 = time.perf_counter()
    background = pkmem.hf.slot_counts(model, background_docs(s, old, text, seed), forward_fn=forward)
    table = next(iter(background.batches_read.values()))
    background.save(out / f"background-s{seed}.safetensors")
    result = {
        "key": key,
        "seed": seed,
        "documents": background.num_batches,
        "slots_read": int((table > 0).sum()),
        "slots_read_by_every_document": int((table == background.num_batches).sum()),
        "median_documents_per_slot": float(table.double().median()),
        "counts_s": time.perf_counter() - t0,
    }
    _atomic_write(path, json.dumps(result, indent=1))
    log(f"seed {seed}: background counts: {_fmt_metrics(result)}")
    return result


def _fmt_metrics(m: dict) -> str:
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if k != "key"
    )


# ---- finetuning ---------------------------------------------------------------------------------
_LOADED: dict = {}


def _pretrained(folder: Path, device):
    """The model saved in ``folder`` (loaded once per process; callers copy it)."""
    import pkmem.hf

    key = (str(folder.resolve()), str(device), (folder / "pretrain.json").stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = pkmem.hf.from_pretrained(folder, device=device)
    return _LOADED[key]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def finetune(s: dict, method: str, lr: float, facts, seed: int, out: Path, device) -> tuple:
    """Teach ``facts`` to seed ``seed``'s pretrained model by ``method`` at ``lr``; returns
    ``(model, info)``: a plain LlamaForCausalLM (LoRA merged in) and the time, parameters trained
    and changed."""
    import torch

    import pkmem.hf

    f, T = s["finetune"], s["model"]["seq_len"]
    model = copy.deepcopy(_pretrained(out / f"pretrain-s{seed}", device))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()  # in every method: no dropout, the memory's BatchNorm keeps its statistics
    rows_updated: dict[str, torch.Tensor] = {}
    sparse = None
    if method == "full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        trained = sum(p.numel() for p in params)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        r = f["lora_rank"]
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        trained = sum(p.numel() for p in params)
    elif method == "sparse":
        background = pkmem.hf.SlotCounts.load(out / f"background-s{seed}.safetensors", device=device)

        def loss_fn(m, batch):
            with _amp(device):
                return pkmem.hf.causal_lm_loss(m, batch)

        sparse = pkmem.hf.SparseMemoryFinetuner(model, background, f["top_t"], lr, loss_fn=loss_fn)
        rows_updated = {
            n: torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
            for n, (t, _) in sparse.tables.items()
        }
        trained = None  # counted below: the rows updated at least once
    else:
        raise ValueError(f"method={method!r} is not allowed: method must be one of {METHODS}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = []
    for step in range(f["steps"]):
        factor = _common().warmup_cosine(step, f)
        if sparse is not None:
            sparse.lr = lr * factor
        else:
            for g in opt.param_groups:
                g["lr"] = lr * factor
        xy = torch.from_numpy(facts.batch(step, f["batch_size"], T, seed=seed)).to(device)
        if sparse is not None:
            res = sparse.step({"input_ids": xy, "labels": xy})
            for n, rows in res["slots"].items():
                rows_updated[n][rows] = True
            losses.append(res["loss"])
        else:
            loss = _loss(model, xy, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, f["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    if sparse is not None:
        sparse.restore()
        v_dim = {n: t.shape[1] for n, (t, _) in sparse.tables.items()}
        trained = sum(int(r.sum()) * v_dim[n] for n, r in rows_updated.items())
    if method == "lora":
        model = model.merge_and_unload()
    info = {
        "train_s": train_s,
        "trained_params": trained,
        "loss_first": float(losses[0]),
        "loss_last": float(torch.stack(losses[-max(1, len(losses) // 10) :]).mean()),
        "changed": _changes(model, before, rows_updated),
    }
    return model, info


def _changes(model, before: dict, rows_updated: dict) -> dict:
    """What finetuning changed, against ``before`` (the state dict it started from): parameter
    tensors and elements, the value rows, the elements outside the value tables, (sparse) the
    changed rows that TF-IDF never chose, and the buffers (the query BatchNorm's statistics)."""
    import pkmem.hf

    after = model.state_dict()
    params = dict(model.named_parameters())
    tables = {f"{n}.values": n for n in pkmem.hf.memory_modules(model)}
    out = dict.fromkeys(("tensors", "elements", "outside_value_tables", "value_rows"), 0)
    out.update(value_rows_not_chosen=0, buffers_changed=0, of_tensors=len(params))
    for k, v0 in before.items():
        diff = after[k].detach() != v0
        n = int(diff.sum())
        if k not in params:
            out["buffers_changed"] += n > 0
            continue
        out["tensors"] += n > 0
        out["elements"] += n
        if k in tables:
            row = diff.any(1)
            out["value_rows"] += int(row.sum())
            chosen = rows_updated.get(tables[k])
            if chosen is not None:
                out["value_rows_not_chosen"] += int((row & ~chosen.to(row.device)).sum())
        else:
            out["outside_value_tables"] += n
    return out


def run_part(s, method, lr, facts_name, seed, out: Path, path: Path, data, device, log) -> dict:
    """One finetuning run (a grid point or a final run), unless done already."""
    text, heldout, info, old, valid, test = data
    new = valid if facts_name == "new_valid" else test
    key = _key(background_key(s, seed, info, device.type), s["finetune"], method, lr, facts_name)
    done = _read_part(path, key)
    if done is not None:
        log(f"{path.stem}: done already")
        return done
    model, fit = finetune(s, method, lr, new, seed, out, device)
    sets = {"new": (new, [0, "heldout"]), "old": (old, [0])}
    t0 = time.perf_counter()
    metrics = evaluate(model, s, sets, heldout, device)
    result = {
        "key": key,
        "method": method,
        "lr": lr,
        "facts": facts_name,
        "seed": seed,
        **fit,
        "eval_s": time.perf_counter() - t0,
        "metrics": metrics,
    }
    _atomic_write(path, json.dumps(result, indent=1))
    log(f"{path.stem}: {fit['train_s']:.1f} s, {_fmt_metrics(metrics)}")
    return result


def choose_lr(grid_runs: list[dict], within: float) -> float:
    """The smallest learning rate whose new-fact recall on the validation facts is within ``within``
    of the grid's best (the gentlest rate that learns the facts); nothing about old facts or text is
    looked at."""
    best = max(r["metrics"]["new_recall"] for r in grid_runs)
    return min(r["lr"] for r in grid_runs if r["metrics"]["new_recall"] >= best - within - 1e-12)


# ---- the report ---------------------------------------------------------------------------------
def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(res: dict) -> dict:
    """Per method: mean and sd over seeds of every metric and of its change from the pretrained model."""
    out = {}
    before = {int(k): v["metrics"] for k, v in res["pretrained"].items()}
    for method, runs in res["runs"].items():
        rows = list(runs.values())
        if not rows:
            continue
        row = {"lr": rows[0]["lr"], "seeds": [r["seed"] for r in rows]}
        for k in rows[0]["metrics"]:
            row[k] = _mean_sd([r["metrics"][k] for r in rows])
            row[f"{k}_change"] = _mean_sd([r["metrics"][k] - before[r["seed"]][k] for r in rows])
        for k in ("train_s", "trained_params"):
            row[k] = _mean_sd([r[k] for r in rows])
        row["changed_elements"] = _mean_sd([r["changed"]["elements"] for r in rows])
        out[method] = row
    # paired by seed: each other method minus sparse memory finetuning
    sparse = res["runs"].get("sparse", {})
    for method, runs in res["runs"].items():
        pairs = [(runs[k], sparse[k]) for k in runs if k in sparse and method != "sparse"]
        if pairs:
            out[method]["minus_sparse"] = {
                k: _mean_sd([a["metrics"][k] - b["metrics"][k] for a, b in pairs])
                for k in pairs[0][0]["metrics"]
            }
    b = list(before.values())
    out["pretrained"] = {k: _mean_sd([m[k] for m in b]) for k in b[0]} if b else {}
    return out


def _pm(ms: tuple[float, float], fmt: str = "{:.3f}", pct: bool = False) -> str:
    m, sd = ms
    if math.isnan(m):
        return "-"
    if pct:
        return f"{100 * m:.1f} ± {100 * sd:.1f} %"
    return f"{fmt.format(m)} ± {fmt.replace('+', '').format(sd)}"


def _x100(ms: tuple[float, float]) -> tuple[float, float]:
    return 100 * ms[0], 100 * ms[1]


def _count(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:,.0f}"


NAMES = {"full": "full finetuning (AdamW)", "lora": "LoRA (AdamW)", "sparse": "sparse memory (SGD)"}


def markdown(res: dict) -> str:
    s, sm = res["settings"], res["summary"]
    f, fin, m = s["facts"], s["finetune"], s["model"]
    pre = sm.get("pretrained", {})
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [
        f"**Teaching {f['n_new']} new facts to a model pretrained on {f['n_old']} old facts and "
        f"{res['data']['source'].split(' ')[0]} text** ({fin['steps']} finetuning steps of "
        f"{fin['batch_size']} × {m['seq_len'] + 1} bytes of new-fact sentences only; mean ± sd over "
        f"seeds {seeds}; chance recall {100 / f['n_values']:.1f} %)",
        "",
        "| method | lr | new facts, recall | new facts, unseen phrasing | old facts, recall (change, points) "
        "| held-out text, bits/byte (change) | params trained | params changed | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if pre:
        lines.append(
            f"| pretrained model | - | {_pm(pre['new_recall'], pct=True)} | "
            f"{_pm(pre['new_recall_heldout_phrasing'], pct=True)} | {_pm(pre['old_recall'], pct=True)} | "
            f"{_pm(pre['heldout_text_bpb'])} | - | - | - |"
        )
    for method in s["methods"]:
        r = sm.get(method)
        if r is None:
            lines.append(f"| {NAMES[method]} | not run |" + " |" * 7)
            continue
        lines.append(
            f"| {NAMES[method]} | {r['lr']:g} | {_pm(r['new_recall'], pct=True)} | "
            f"{_pm(r['new_recall_heldout_phrasing'], pct=True)} | {_pm(r['old_recall'], pct=True)} "
            f"({_pm(_x100(r['old_recall_change']), '{:+.1f}')}) | {_pm(r['heldout_text_bpb'])} "
            f"({_pm(r['heldout_text_bpb_change'], '{:+.3f}')}) | {_count(r['trained_params'][0])} | "
            f"{_count(r['changed_elements'][0])} | {r['train_s'][0]:.1f} s |"
        )
    diffs = [(mt, sm[mt]["minus_sparse"]) for mt in s["methods"] if "minus_sparse" in sm.get(mt, {})]
    if diffs:
        lines += ["", "**Paired by seed, minus sparse memory finetuning** (mean ± sd of the difference):", ""]
        lines.append(
            "| method | new facts, recall (points) | old facts, recall (points) | held-out text, bits/byte |"
        )
        lines.append("|---|---|---|---|")
        for mt, d in diffs:
            lines.append(
                f"| {NAMES[mt]} | {_pm(_x100(d['new_recall']), '{:+.1f}')} | "
                f"{_pm(_x100(d['old_recall']), '{:+.1f}')} | {_pm(d['heldout_text_bpb'], '{:+.3f}')} |"
            )
    lines += [
        "",
        f"**Learning-rate grid** (first seed, validation new facts; the smallest rate within "
        f"{100 * fin['select_within']:.0f} points of the best new-fact recall, nothing else looked at):",
        "",
    ]
    lines.append("| method | lr | new (valid) recall | old recall | held-out text bits/byte | chosen |")
    lines.append("|---|---|---|---|---|---|")
    for method in s["methods"]:
        for r in res["grid"].get(method, []):
            mt = r["metrics"]
            chosen = "yes" if r["lr"] == res["chosen_lr"].get(method) else ""
            lines.append(
                f"| {method} | {r['lr']:g} | {100 * mt['new_recall']:.1f} % | "
                f"{100 * mt['old_recall']:.1f} % | {mt['heldout_text_bpb']:.3f} | {chosen} |"
            )
    p0 = next(iter(res["pretrained"].values()), {})
    lines += [
        "",
        f"Model: byte-level Llama, {m['n_layers']} blocks, dim {m['dim']}, {m['n_heads']} heads, "
        f"{m['seq_len'] + 1}-byte windows; block {m['memory_layer']}'s MLP replaced by a product-key memory "
        f"({s['memory']['num_keys'] ** 2:,} slots, {s['memory']['heads']} heads, top-{s['memory']['topk']}); "
        f"{_count(p0.get('params', 0))} parameters ({_count(p0.get('value_params', 0))} in the values). "
        f"Pretraining: {s['pretrain']['steps']} steps of {s['pretrain']['batch_size']} windows "
        f"({100 * s['pretrain']['fact_fraction']:.0f} % old-fact sentences, the rest text). "
        f"Sparse: top-{fin['top_t']} rows per step by TF-IDF against "
        f"{s['pretrain']['background_docs']} pretraining windows. LoRA: rank {fin['lora_rank']} on "
        f"{', '.join(LORA_TARGETS)}. Recall on {s['eval']['queries']} facts at most per set; "
        f"device: {res['device']}, {res['threads']} threads; {res['compute_s']:.0f} s of training, "
        f"counting and evaluation in all parts.",
        "",
        "The paper (Lin et al. 2025, a pretrained memory-layer language model taught TriviaQA facts, "
        "NaturalQuestions F1 as what is forgotten): F1 fell by 89 % after full finetuning, 71 % after LoRA "
        "and 11 % after sparse memory finetuning, at the same level of new knowledge.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> Path | None:
    """``continual.png``: old-fact recall and held-out text bits per byte against new-fact recall,
    the grid (validation facts, open markers) and the final runs (test facts, filled)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"full": "C0", "lora": "C1", "sparse": "C2"}
    pre = res["summary"].get("pretrained", {})
    for ax, key, label in (
        (axes[0], "old_recall", "old-fact recall (fraction)"),
        (axes[1], "heldout_text_bpb", "held-out text (bits per byte)"),
    ):
        for method in res["settings"]["methods"]:
            g = res["grid"].get(method, [])
            ax.scatter(
                [r["metrics"]["new_recall"] for r in g],
                [r["metrics"][key] for r in g],
                facecolors="none",
                edgecolors=colors[method],
                label=f"{method}, lr grid (validation facts)",
            )
            runs = list(res["runs"].get(method, {}).values())
            ax.scatter(
                [r["metrics"]["new_recall"] for r in runs],
                [r["metrics"][key] for r in runs],
                c=colors[method],
                label=f"{method}, chosen lr (test facts, each seed)",
            )
        if key in pre:
            ax.axhline(pre[key][0], c="grey", ls=":", label="pretrained model")
        ax.set_xlabel("new-fact recall, training phrasing (fraction)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Teaching new facts: what is forgotten")
    fig.tight_layout()
    path = out / "continual.png"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".continual.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- main ---------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not xs or any(not (x > 0 and math.isfinite(x)) for x in xs):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give positive learning rates")
    return xs


def _seeds(text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not xs or min(xs) < 0 or len(set(xs)) != len(xs):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give distinct seeds >= 0")
    return xs


def _methods(text: str) -> list[str]:
    xs = [x.strip() for x in text.split(",") if x.strip()]
    if not xs or any(x not in METHODS for x in xs):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: choose from {','.join(METHODS)}")
    return [m for m in METHODS if m in xs]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/continual", help="results directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test (seconds)")
    size.add_argument("--cpu-small", action="store_true", help="sizes for a 2-core CPU (about 8 minutes)")
    p.add_argument(
        "--data-path", help="enwik8 (plain, .gz or .zip) for the background text; default: generated"
    )
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the preset's, 0,1,2)")
    p.add_argument("--methods", type=_methods, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, help="finetuning steps (every method)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps")
    p.add_argument("--top-t", type=int, help="sparse memory finetuning: value rows updated per step")
    p.add_argument("--lora-rank", type=int, help="LoRA rank")
    p.add_argument("--n-old", type=int, help="old facts (pretraining)")
    p.add_argument("--n-new", type=int, help="new facts taught (and as many validation facts)")
    for m in METHODS:
        p.add_argument(f"--lr-{m}", type=_floats, help=f"learning-rate grid of {m} (comma-separated)")
    p.add_argument(
        "--stop-after",
        type=float,
        help="start no new part after this many seconds (exit 3; run the command again to continue)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "pretrain_steps", "top_t", "lora_rank", "n_old", "n_new", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} {v} is not allowed: give at least 1")
    if args.stop_after is not None and not args.stop_after > 0:
        p.error(f"--stop-after {args.stop_after} is not allowed: give a positive number of seconds")
    if args.data_path and not os.path.isfile(args.data_path):
        p.error(f"--data-path {args.data_path!r} is not allowed: it is not a file (enwik8, .gz or .zip)")
    s = settings_of(args)

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda is not allowed: no CUDA device is available")
    device = torch.device(device)
    if "lora" in s["methods"]:
        try:
            import peft  # noqa: F401
        except ImportError:
            p.error("--methods includes lora, which needs peft (pip install 'pkmem[hf]')")

    def log(*a):
        print(*a, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():  # the checkpoints stay out of a commit of the results
        _atomic_write(out / ".gitignore", GITIGNORE)
    t_start = time.perf_counter()

    def out_of_time() -> bool:
        return args.stop_after is not None and time.perf_counter() - t_start > args.stop_after

    text, heldout, info = background_text(s, args.data_path)
    old, valid, test = fact_sets(s)
    data = (text, heldout, info, old, valid, test)
    res = {
        "benchmark": "benchmarks/continual.py",
        "command": " ".join(["python", "benchmarks/continual.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": _common().device_name(device),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "settings": s,
        "data": info,
        "pretrained": {},
        "background": {},
        "grid": {},
        "chosen_lr": {},
        "runs": {},
    }
    unfinished = False
    for seed in s["seeds"]:
        if out_of_time():
            unfinished = True
            break
        res["pretrained"][str(seed)] = pretrain(s, seed, out, data, device, log)
        res["background"][str(seed)] = count_background(s, seed, out, data, device, log)
        if seed == s["seeds"][0]:  # the grid: first seed, validation facts
            for method in s["methods"]:
                runs = []
                for lr in s["finetune"]["grid"][method]:
                    if out_of_time():
                        unfinished = True
                        break
                    path = out / "grid" / f"{method}-lr{lr:g}.json"
                    runs.append(run_part(s, method, lr, "new_valid", seed, out, path, data, device, log))
                res["grid"][method] = runs
                if len(runs) == len(s["finetune"]["grid"][method]):
                    res["chosen_lr"][method] = choose_lr(runs, s["finetune"]["select_within"])
        for method in s["methods"]:
            lr = res["chosen_lr"].get(method)
            if lr is None or out_of_time():
                unfinished = True
                continue
            path = out / "runs" / f"{method}-s{seed}.json"
            r = run_part(s, method, lr, "new_test", seed, out, path, data, device, log)
            res["runs"].setdefault(method, {})[str(seed)] = r
    res["wall_s"] = time.perf_counter() - t_start  # this call's (parts done already cost nothing)
    parts = [*res["pretrained"].values(), *res["background"].values()]
    parts += [r for g in res["grid"].values() for r in g] + [
        r for v in res["runs"].values() for r in v.values()
    ]
    res["compute_s"] = sum(r.get(k, 0.0) for r in parts for k in ("train_s", "eval_s", "counts_s"))
    res["finished"] = not unfinished
    res["summary"] = summarize(res)
    _common().write_json(str(out / "results.json"), res)
    _atomic_write(out / "results.md", markdown(res))
    plot(res, out)
    print("\n" + markdown(res), flush=True)
    if unfinished:
        print("not finished (--stop-after): run the same command again to continue", flush=True)
        return 3
    return 0


def _versions() -> dict:
    """benchmarks/common.versions(), with transformers' and peft's."""
    import importlib.metadata as md

    out = _common().versions()
    for name in ("transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
