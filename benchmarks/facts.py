"""Capacity benchmark: how many random facts does a small transformer recall, with and without memory?

    python benchmarks/facts.py --out benchmarks/results/facts --jobs 6          # one H200, ~8 min
    python benchmarks/facts.py --out /tmp/facts --device cpu --tiny            # smoke test, seconds

Each run trains a fresh byte-level :class:`pkmem.models.MemoryTransformer` on the sentences of
``N`` synthetic facts (:mod:`pkmem.tasks.facts`: ``"<name> lives in <city>."`` in four phrasings,
100 cities) and measures **recall**: the fraction of facts whose city the model ranks first among
all cities by log-likelihood, on a training phrasing and on a phrasing never trained on. The table
is the number of facts recalled above chance against ``N`` for these variants, all at the same
steps, batches (a function of seed and step) and learning rates:

- ``ffn``: the base model: 2 layers, dim 64, 2 heads, 64-byte context, FFNs of 4 x dim. It is
  this small so that its capacity is spent within the budget: facts take a few hundred exposures
  to be learnt, so a base whose capacity exceeds what the steps can teach would measure learning
  speed instead (``--full`` trains 6000 steps and adds N = 256k; ``--dim``, ``--n-layers`` change
  the base);
- ``ffn-flops``: every FFN widened so that the forward FLOPs per token equal the largest memory
  model's (its parameters stay far below);
- ``ffn-params``: every FFN widened so that the parameters equal the smallest memory model's (its
  FLOPs are then far above every memory model's; matching the larger memories' parameters with
  dense FFNs would cost 4-16x more again, beyond the budget);
- ``mem-64k``, ``mem-256k``, ``mem-1M``: a product-key memory of 256^2 / 512^2 / 1024^2 slots
  (4 heads, top-32, 128-dim queries, query BatchNorm) in place of the FFN of layer 2.

Training: AdamW from ``pkmem.make_optimizer`` (value tables in their own group at a 5x higher
learning rate), linear warm-up then cosine decay, ``pkmem.clip_grad_norm``, bf16 autocast on CUDA.

Small models leave a GPU mostly idle: ``--jobs K`` runs K (variant, N) jobs at once as separate
processes on one GPU (``--gpus 0,1`` spreads them over GPUs). Resumable: a finished job writes
``runs/<variant>-<N>.json`` under ``--out`` and is not run again while its settings are unchanged.
Writes ``results.json`` (device, versions, settings, every run's recall curve over steps and final
recall on both query phrasings), ``results.md``, ``facts.png`` (facts recalled vs N) and
``curves.png`` (recall over training steps). ``--estimate`` prints the FLOPs, parameters and an
estimated H200 time per variant and exits.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

# ---- settings -----------------------------------------------------------------------------------
DEFAULT = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "seq_len": 64, "ffn_mult": 4.0, "memory_layer": 2},
    # ProductKeyMemory's own argument names; num_keys comes from memory_keys
    "memory": {"heads": 4, "topk": 32, "k_dim": 128, "query_norm": "batchnorm"},
    "memory_keys": [256, 512, 1024],
    "train": {
        "steps": 3000,
        "batch_size": 1024,
        "lr": 2e-3,
        "value_lr": 1e-2,
        "warmup_steps": 100,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        "seed": 0,
    },
    "facts": {"n_facts": [1024, 4096, 16384, 65536], "n_values": 100, "seed": 0},
    # batch_size: sequences per evaluation call (each query is n_values sequences of ~50 bytes)
    "eval": {"queries": 2048, "curve_queries": 256, "curve_points": 8, "batch_size": 2048},
}
# --full: the budget (~20 min of one H200): more steps, and 256k facts
FULL = {"train": {"steps": 6000}, "facts": {"n_facts": [1024, 4096, 16384, 65536, 262144]}}
TINY = {
    "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "seq_len": 48, "memory_layer": 2},
    "memory": {"heads": 2, "topk": 4, "k_dim": 16},
    "memory_keys": [4, 8, 16],
    "train": {"steps": 4, "batch_size": 4, "warmup_steps": 2},
    "facts": {"n_facts": [32, 64], "n_values": 6},
    "eval": {"queries": 16, "curve_queries": 8, "curve_points": 2, "batch_size": 256},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _slots_label(num_keys: int) -> str:
    slots = num_keys**2
    return (
        f"{slots // 2**20}M"
        if slots % 2**20 == 0
        else f"{slots // 2**10}k"
        if slots % 2**10 == 0
        else str(slots)
    )


def variant_names(s: dict) -> list[str]:
    """The variants of settings ``s``, in table order."""
    return ["ffn", "ffn-flops", "ffn-params"] + [f"mem-{_slots_label(k)}" for k in s["memory_keys"]]


# ---- the models ---------------------------------------------------------------------------------
def model_config(s: dict, variant: str):
    """The :class:`MemoryTransformerConfig` of ``variant`` under settings ``s`` (the one place that
    spells the config's fields)."""
    from pkmem.models import MemoryTransformerConfig

    m = s["model"]
    base = dict(
        vocab_size=256, seq_len=m["seq_len"], dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"]
    )
    if variant == "ffn":
        return MemoryTransformerConfig(**base, ffn_mult=m["ffn_mult"], mem_layers=())
    if variant in ("ffn-flops", "ffn-params"):
        return MemoryTransformerConfig(**base, ffn_mult=_matched_ffn_mult(s, variant), mem_layers=())
    keys = {f"mem-{_slots_label(k)}": k for k in s["memory_keys"]}
    if variant not in keys:
        raise ValueError(f"variant={variant!r} is not allowed: variant must be one of {variant_names(s)}")
    memory = {**s["memory"], "num_keys": keys[variant]}
    return MemoryTransformerConfig(
        **base, ffn_mult=m["ffn_mult"], mem_layers=(m["memory_layer"],), memory=memory
    )


def memory_of(cfg) -> tuple[int, dict]:
    """``(number of memories, the memory's ProductKeyMemory arguments)`` of a config made by
    :func:`model_config` (each memory replaces its layer's FFN)."""
    from pkmem.config import memory_options

    args = {**{n: p.default for n, p in memory_options().items()}, **dict(cfg.memory)}
    return len(cfg.memory_layers()), {**args, "v_dim": args.get("v_dim") or cfg.dim}


def flops_per_token(cfg) -> float:
    """Forward FLOPs per token (multiply-adds x 2) of a MemoryTransformer config: the linear layers,
    attention over an average causal context of ``seq_len / 2``, and each memory's query network,
    sub-key scores and value sum (its top-k selection is not counted)."""
    d, T = cfg.dim, cfg.seq_len
    hidden = int(round(cfg.ffn_mult * d))
    attn = 2 * d * 3 * d + 2 * d * d + 2 * 2 * (T / 2) * d
    ffn = 2 * 2 * d * hidden
    n_mem, m = memory_of(cfg)
    mem = 2 * d * m["heads"] * m["k_dim"] + 2 * m["heads"] * m["num_keys"] * m["k_dim"]
    mem += 2 * m["heads"] * m["topk"] * m["v_dim"]
    return cfg.n_layers * attn + (cfg.n_layers - n_mem) * ffn + n_mem * mem + 2 * d * cfg.vocab_size


def num_params(cfg) -> tuple[int, int]:
    """``(parameters, value-table parameters)`` of a config (built on the meta device)."""
    import torch

    from pkmem.models import MemoryTransformer

    with torch.device("meta"):
        model = MemoryTransformer(cfg)
    return model.num_parameters(), model.num_parameters() - model.num_parameters(values=False)


_MATCHED: dict[str, float] = {}


def _matched_ffn_mult(s: dict, variant: str) -> float:
    """``ffn_mult`` (all layers) matching the largest memory model's FLOPs ("ffn-flops") or the
    smallest memory model's parameters ("ffn-params"); both are linear in the hidden size."""
    import dataclasses

    key = json.dumps([s["model"], s["memory"], s["memory_keys"], variant], sort_keys=True)
    if key in _MATCHED:
        return _MATCHED[key]

    d = s["model"]["dim"]
    ks = s["memory_keys"]
    target_cfg = model_config(s, f"mem-{_slots_label(max(ks) if variant == 'ffn-flops' else min(ks))}")
    base = model_config(s, "ffn")
    at = [dataclasses.replace(base, ffn_mult=h / d) for h in (d, 2 * d)]
    if variant == "ffn-flops":
        f = [flops_per_token(c) for c in at]
        target = flops_per_token(target_cfg)
    else:
        f = [num_params(c)[0] for c in at]
        target = num_params(target_cfg)[0]
    hidden = d + (target - f[0]) * d / (f[1] - f[0])
    _MATCHED[key] = max(1, round(hidden)) / d
    return _MATCHED[key]


# ---- one run ------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    from pkmem._util import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def run_key(s: dict, variant: str, n_facts: int, device_kind: str) -> str:
    """A fingerprint of everything that determines the run's result."""
    what = {
        "config": model_config(s, variant).to_dict(),
        "train": s["train"],
        "facts": {k: v for k, v in s["facts"].items() if k != "n_facts"},
        "eval": s["eval"],
        "n_facts": n_facts,
        "device": device_kind,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _run_path(out: Path, variant: str, n_facts: int) -> Path:
    return out / "runs" / f"{variant}-{n_facts}.json"


def finished(out: Path, s: dict, variant: str, n_facts: int, device_kind: str) -> dict | None:
    """The run's saved result, if it exists and was made with the same settings."""
    p = _run_path(out, variant, n_facts)
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return r if r.get("key") == run_key(s, variant, n_facts, device_kind) else None


def run_job(s: dict, variant: str, n_facts: int, device: str, out: Path, log=print) -> dict:
    """Train ``variant`` on ``n_facts`` facts, evaluate recall, write ``runs/<variant>-<N>.json``."""
    import torch
    import torch.nn.functional as F

    import pkmem
    from pkmem.models import MemoryTransformer
    from pkmem.tasks import evaluate_recall, make_facts

    dev = torch.device(device)
    t, e = s["train"], s["eval"]
    facts = make_facts(n_facts, s["facts"]["n_values"], seed=s["facts"]["seed"])
    torch.manual_seed(t["seed"])
    cfg = model_config(s, variant)
    model = MemoryTransformer(cfg).to(dev)
    opt = pkmem.make_optimizer(model, lr=t["lr"], value_lr=t["value_lr"])
    base_lrs = [g["lr"] for g in opt.param_groups]
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else nullcontext()
    curve_ids = facts.query_ids(e["curve_queries"], seed=1)
    curve_at = {round(t["steps"] * i / e["curve_points"]) for i in range(1, e["curve_points"] + 1)}

    def recall(ids) -> dict:
        with amp:
            return {
                name: evaluate_recall(model, facts, tpl, ids=ids, batch_size=e["batch_size"]).to_dict()
                for name, tpl in (("train_template", 0), ("heldout_template", "heldout"))
            }

    curve, losses, train_s, eval_s = [], [], 0.0, 0.0
    t0 = time.perf_counter()
    for step in range(t["steps"]):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * _common().warmup_cosine(step, t)
        xy = torch.from_numpy(facts.batch(step, t["batch_size"], cfg.seq_len, seed=t["seed"])).to(dev)
        with amp:
            logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        pkmem.clip_grad_norm(model, t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step + 1 in curve_at:
            mean_loss = torch.stack(losses).mean().item()  # one sync per curve point
            losses = []
            t1 = time.perf_counter()
            train_s += t1 - t0
            r = recall(curve_ids)
            t0 = time.perf_counter()
            eval_s += t0 - t1
            point = {"step": step + 1, "loss": mean_loss}
            point.update({k: v["recall"] for k, v in r.items()})
            curve.append(point)
            log(
                f"{variant} N={n_facts} step {step + 1}/{t['steps']}: loss {mean_loss:.3f}, recall "
                f"{point['train_template']:.3f} (held-out phrasing {point['heldout_template']:.3f})"
            )
    train_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    final = recall(facts.query_ids(e["queries"], seed=2))
    eval_s += time.perf_counter() - t1
    params, values = model.num_parameters(), model.num_parameters() - model.num_parameters(values=False)
    result = {
        "key": run_key(s, variant, n_facts, dev.type),
        "variant": variant,
        "n_facts": n_facts,
        "config": cfg.to_dict(),
        "params": params,
        "value_params": values,
        "flops_per_token": flops_per_token(cfg),
        "steps": t["steps"],
        "tokens": t["steps"] * t["batch_size"] * cfg.seq_len,
        "train_s": train_s,
        "train_tokens_per_s": t["steps"] * t["batch_size"] * cfg.seq_len / train_s,
        "eval_s": eval_s,
        "device": _common().device_name(dev),
        "versions": _versions(),
        "curve": curve,
        "final": final,
    }
    _atomic_write(_run_path(out, variant, n_facts), json.dumps(result, indent=1))
    return result


# ---- the estimate -------------------------------------------------------------------------------
# An H200 on models this small: bf16 matmuls at ~25 % of the ~990 TFLOP/s peak, and host-bound
# eager PyTorch at ~12 us per dispatched op (both rough; the runs record their real times).
GPU_FLOPS = 250e12
GPU_BYTES_PER_S = 3.0e12
HOST_S_PER_OP = 12e-6


def _count_ops(s: dict, variant: str) -> int:
    """Ops dispatched by one training step (forward, backward, clip, AdamW) of ``variant`` on the
    CPU, memories shrunk to ``topk``^2 slots: the host-side cost of a step hardly depends on sizes."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    import pkmem
    from pkmem.models import MemoryTransformer

    small = _merge(
        s, {"memory_keys": [s["memory"]["topk"]] if variant.startswith("mem-") else s["memory_keys"]}
    )
    cfg = model_config(small, variant_names(small)[-1] if variant.startswith("mem-") else variant)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    model = MemoryTransformer(cfg)
    # AdamW over the same groups as make_optimizer, with the multi-tensor path it takes on CUDA
    opt = torch.optim.AdamW(pkmem.param_groups(model, lr=1e-3), foreach=True)
    x = torch.zeros(2, cfg.seq_len + 1, dtype=torch.int64)
    with Count():
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        pkmem.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Count.n


def estimate(s: dict, variants: list[str], jobs: int) -> dict:
    """Per variant: parameters, FLOPs per token, and an estimated H200 time per step and per job;
    and the whole table's estimated time with ``jobs`` processes sharing one GPU."""
    t = s["train"]
    tokens = t["batch_size"] * s["model"]["seq_len"]
    rows = {}
    for v in variants:
        cfg = model_config(s, v)
        params, values = num_params(cfg)
        flops = flops_per_token(cfg)
        device_s = 3 * flops * tokens / GPU_FLOPS  # forward + backward
        # AdamW reads and writes every parameter, gradient and moment (~28 bytes each in fp32);
        # activations, forward and backward: ~40 bf16 passes over (tokens, dim) per layer and ~10
        # over (tokens, hidden) per FFN; a memory reads and scatters heads * topk value rows a token
        hidden = int(round(cfg.ffn_mult * cfg.dim))
        n_mem, m = memory_of(cfg)
        act = 2 * tokens * (40 * cfg.dim * cfg.n_layers + 10 * hidden * (cfg.n_layers - n_mem))
        mem = n_mem * 3 * tokens * m["heads"] * m["topk"] * m["v_dim"] * 2
        device_s += (28 * params + act + mem) / GPU_BYTES_PER_S
        host_s = _count_ops(s, v) * HOST_S_PER_OP
        # evaluation: sequences of ~45 bytes, both phrasings, at a third of a training token's cost
        eval_tokens = 2 * (s["eval"]["queries"] + s["eval"]["curve_queries"] * s["eval"]["curve_points"])
        eval_tokens *= s["facts"]["n_values"] * 45
        eval_s = device_s / tokens / 3 * eval_tokens
        rows[v] = {
            "params": params,
            "value_params": values,
            "flops_per_token": flops,
            "device_s_per_step": device_s,
            "host_s_per_step": host_s,
            "eval_s": eval_s,
        }
    n_runs = len(s["facts"]["n_facts"])
    device_total = sum(n_runs * (r["device_s_per_step"] * t["steps"] + r["eval_s"]) for r in rows.values())
    host_total = sum(n_runs * r["host_s_per_step"] * t["steps"] for r in rows.values())
    # host time of K processes overlaps; the device is shared; +15 s start-up per job
    total = max(device_total, host_total / max(1, jobs), (device_total + host_total) / max(1, jobs))
    total += 15 * n_runs * len(rows) / max(1, jobs)
    return {"variants": rows, "device_s": device_total, "host_s": host_total, "jobs": jobs, "total_s": total}


# ---- the table ----------------------------------------------------------------------------------
def _common():
    """benchmarks/common.py (imports torch: only when a run or the table needs it)."""
    import common

    return common


def _versions() -> dict:
    return _common().versions()


def _matched(s: dict, variant: str) -> str:
    ks = s["memory_keys"]
    if variant == "ffn-flops":
        return f"FLOPs/token of mem-{_slots_label(max(ks))}"
    if variant == "ffn-params":
        return f"parameters of mem-{_slots_label(min(ks))}"
    return ""


def _fmt_count(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


def markdown(res: dict) -> str:
    s = res["settings"]
    ns = s["facts"]["n_facts"]
    lines = []
    for kind, title in (
        ("train_template", "Facts recalled above chance, queried in a training phrasing"),
        ("heldout_template", "Facts recalled above chance, queried in a phrasing never trained on"),
    ):
        lines += [f"**{title}** (recall in brackets; chance {100 / s['facts']['n_values']:.0f} %)", ""]
        lines.append(
            "| variant | params (values) | FLOPs/token | "
            + " | ".join(f"N = {_fmt_count(n)}" for n in ns)
            + " |"
        )
        lines.append("|---|---|---|" + "---|" * len(ns))
        for v, info in res["variants"].items():
            cells = []
            for n in ns:
                r = res["runs"].get(v, {}).get(str(n))
                if r is None:
                    cells.append("-")
                    continue
                f = r["final"][kind]
                cells.append(f"{_fmt_count(f['facts_above_chance'])} ({100 * f['recall']:.1f} %)")
            params = f"{info['params'] / 1e6:.2f}M ({info['value_params'] / 1e6:.2f}M)"
            name = v + (f" (= {info['matched']})" if info["matched"] else "")
            lines.append(
                f"| {name} | {params} | {info['flops_per_token'] / 1e6:.2f}M | " + " | ".join(cells) + " |"
            )
        lines.append("")
    t = s["train"]
    run_s = sum(r["train_s"] + r["eval_s"] for v in res["runs"].values() for r in v.values())
    lines.append(
        f"{t['steps']} steps x {t['batch_size']} x {s['model']['seq_len']} bytes "
        f"= {t['steps'] * t['batch_size'] * s['model']['seq_len']:,} training bytes per run, the same "
        f"batches for every variant; recall on {s['eval']['queries']} sampled facts (all when N is smaller); "
        f"{s['facts']['n_values']} cities; device: {res['device']}; {run_s:.0f} s of training and "
        f"evaluation in all"
        + (
            f", {res['jobs']} jobs at once."
            if res.get("jobs")
            else " (runs made earlier, jobs side by side)."
        )
    )
    missing = [
        f"{v} N={n}"
        for v in res["variants"]
        for n in s["facts"]["n_facts"]
        if str(n) not in res["runs"].get(v, {})
    ]
    if missing:
        lines.append(f"Not run ('-'): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot(res: dict, out: Path) -> list[Path]:
    """``facts.png`` (facts recalled above chance vs N, both query phrasings) and ``curves.png``
    (recall in the training phrasing over the steps, one panel per N) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = res["settings"]["facts"]["n_facts"]
    style = {v: ("--" if v.startswith("ffn") else "-") for v in res["variants"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, title in (
        (axes[0], "train_template", "queried in a training phrasing"),
        (axes[1], "heldout_template", "queried in a phrasing never trained on"),
    ):
        ax.plot(ns, ns, ls=":", c="grey", label="every fact")
        for v in res["variants"]:
            runs = res["runs"].get(v, {})
            pts = [(n, runs[str(n)]["final"][kind]["facts_above_chance"]) for n in ns if str(n) in runs]
            if pts:
                ax.plot(*zip(*pts), marker="o", ls=style[v], label=v)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=max(1, min(ns) / 10))
        ax.set_xlabel("facts in the training text, N (count)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("facts recalled above chance (count)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Facts recalled at {res['settings']['train']['steps']} steps ({res['device']})")
    fig.tight_layout()
    _save(fig, out / "facts.png")

    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns) + 1, 3.4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for v in res["variants"]:
            run = res["runs"].get(v, {}).get(str(n))
            if run:
                ax.plot(
                    [c["step"] for c in run["curve"]],
                    [c["train_template"] for c in run["curve"]],
                    ls=style[v],
                    label=v,
                )
        ax.axhline(1 / res["settings"]["facts"]["n_values"], c="grey", ls=":", label="chance")
        ax.set_title(f"N = {n:,}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall, training phrasing (fraction)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "curves.png")
    return [out / "facts.png", out / "curves.png"]


# ---- main ---------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def _settings(args) -> dict:
    s = _merge(DEFAULT, TINY) if args.tiny else _merge(DEFAULT, FULL) if args.full else copy.deepcopy(DEFAULT)
    if args.steps is not None:
        s["train"]["steps"] = args.steps
    if args.batch_size is not None:
        s["train"]["batch_size"] = args.batch_size
    for name in ("dim", "n_layers", "n_heads"):
        if getattr(args, name) is not None:
            s["model"][name] = getattr(args, name)
    if args.n_layers is not None:  # the paper's place: late, not last (layer 5 of 6)
        s["model"]["memory_layer"] = args.n_layers - 1 if args.n_layers > 2 else args.n_layers
    if args.n_facts:
        s["facts"]["n_facts"] = _ints(args.n_facts)
    if args.seed is not None:
        s["train"]["seed"] = args.seed
    return s


def _worker(args) -> int:
    s = json.loads(Path(args.settings_file).read_text())
    variant, n = args.worker.rsplit(":", 1)
    run_job(s, variant, int(n), args.device, Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/facts", help="results directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test (seconds)")
    size.add_argument("--full", action="store_true", help="more steps and queries (~20 min on one H200)")
    p.add_argument("--jobs", type=int, default=1, help="jobs run at once, each its own process")
    p.add_argument("--gpus", help="comma-separated CUDA devices to spread the jobs over (default: 0)")
    p.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    p.add_argument("--n-facts", help="comma-separated fact counts (default: the preset's)")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--dim", type=int, help="the base model's width")
    p.add_argument(
        "--n-layers",
        type=int,
        help="the base model's layers (a memory replaces the FFN of layer n_layers - 1, or the last of 1-2)",
    )
    p.add_argument("--n-heads", type=int, help="the base model's attention heads")
    p.add_argument("--seed", type=int, help="the model's and the batches' seed")
    p.add_argument("--estimate", action="store_true", help="print the estimated GPU time and exit")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the table and plots from the finished runs under --out (e.g. runs made on a "
        "GPU machine, with --device cuda)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--settings-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs} is not allowed: give at least 1")
    for name in ("steps", "batch_size", "dim", "n_layers", "n_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed: give at least 1")
    s = _settings(args)
    if not s["facts"]["n_facts"] or min(s["facts"]["n_facts"]) < 1:
        p.error(f"--n-facts {args.n_facts!r} is not allowed: give positive counts")
    variants = variant_names(s)
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in chosen if v not in variants]
        if bad or not chosen:
            p.error(f"--variants {bad or chosen} is not allowed: choose from {variants}")
        variants = [v for v in variants if v in chosen]

    if args.estimate:
        est = estimate(s, variants, args.jobs)
        print(
            f"{'variant':12} {'params':>9} {'values':>9} {'MFLOP/tok':>9} {'dev ms/st':>9} {'host ms/st':>10}"
        )
        for v, r in est["variants"].items():
            print(
                f"{v:12} {r['params'] / 1e6:8.2f}M {r['value_params'] / 1e6:8.2f}M "
                f"{r['flops_per_token'] / 1e6:9.2f} {1e3 * r['device_s_per_step']:9.2f} "
                f"{1e3 * r['host_s_per_step']:10.2f}"
            )
        print(
            f"{len(variants)} variants x {len(s['facts']['n_facts'])} fact counts x "
            f"{s['train']['steps']} steps: "
            f"device {est['device_s'] / 60:.1f} min, host {est['host_s'] / 60:.1f} min; "
            f"~{est['total_s'] / 60:.1f} min on one H200 with --jobs {args.jobs} (a rough estimate)"
        )
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() and not args.report_only:
        p.error("--device cuda: no CUDA device is available")
    gpus = [g.strip() for g in (args.gpus or "0").split(",") if g.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, n) for v in variants for n in s["facts"]["n_facts"]]
    todo = [(v, n) for v, n in jobs if finished(out, s, v, n, device) is None]
    for v, n in jobs:
        if (v, n) not in todo:
            print(f"{v} N={n}: done already ({_run_path(out, v, n)})", flush=True)
    if args.report_only:
        for v, n in todo:
            print(f"{v} N={n}: not run (no finished run with these settings)", flush=True)
        todo = []
    # the costliest variants first, so the slow ones do not start last
    cost = {v: flops_per_token(model_config(s, v)) for v in variants}
    todo.sort(key=lambda j: (-cost[j[0]], -j[1]))
    t0 = time.perf_counter()
    failed = []
    if args.jobs == 1 and len(gpus) == 1:
        for v, n in todo:
            dev = device if device == "cpu" else f"cuda:{gpus[0]}"
            run_job(s, v, n, dev, out, log=lambda *a: print(*a, flush=True))
    elif todo:
        settings_file = out / "settings.json"
        _atomic_write(settings_file, json.dumps(s, indent=1))
        (out / "logs").mkdir(exist_ok=True)

        def launch(i_job):
            i, (v, n) = i_job
            env = dict(os.environ)
            if device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{v}:{n}", "--out", str(out)]
            cmd += ["--settings-file", str(settings_file), "--device", device]
            with open(out / "logs" / f"{v}-{n}.log", "w") as logf:
                rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
            print(
                f"{v} N={n}: {'finished' if rc == 0 else f'FAILED (exit {rc}), see logs/{v}-{n}.log'}",
                flush=True,
            )
            if rc != 0:
                failed.append((v, n))

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(launch, enumerate(todo)))

    runs: dict = {}
    for v, n in jobs:
        r = finished(out, s, v, n, device)
        if r is not None:
            runs.setdefault(v, {})[str(n)] = r
    info = {}
    for v in variants:
        cfg = model_config(s, v)
        params, values = num_params(cfg)
        info[v] = {
            "params": params,
            "value_params": values,
            "flops_per_token": flops_per_token(cfg),
            "matched": _matched(s, v),
        }
    res = {
        "benchmark": "benchmarks/facts.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else "main(" + repr(argv) + ")",
        "device": ", ".join(sorted({r["device"] for rs in runs.values() for r in rs.values()}))
        if args.report_only
        else _common().device_name(torch.device(device if device == "cpu" else f"cuda:{gpus[0]}")),
        # with --report-only: the versions the table was made with; each run records its own
        "versions": _versions(),
        "settings": s,
        "jobs": None if args.report_only else args.jobs,
        "wall_s": time.perf_counter() - t0,
        "variants": info,
        "runs": runs,
    }
    _atomic_write(out / "results.json", json.dumps(res, indent=1))
    _atomic_write(out / "results.md", markdown(res))
    plot(res, out)
    print("\n" + markdown(res), flush=True)
    if failed:
        print(f"{len(failed)} job(s) failed: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
