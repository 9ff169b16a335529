"""enwik8-small with and without the memory: same steps, same tokens, same batches; one JSON + plots.

    python benchmarks/enwik8_small.py --data-path /path/to/enwik8.gz --out benchmarks/results/enwik8_small

Variants (``--variants``, default ``memory,baseline``):

- ``memory``: the ``enwik8-small`` preset (8 layers, dim 512, seq 512, a product-key memory with
  512^2 slots, 4 heads, top-32 in place of the FFN of layer 5);
- ``baseline``: the same model without memory (layer 5 keeps its FFN);
- ``product-key-memory``: product-key-memory 0.3.0's ``PKM`` in place of our layer (same sizes;
  query LayerNorm, as its own enwik8 script: its BatchNorm path normalises the wrong axis).

Unless ``--steps`` is given, the number of steps is chosen so that the training of ``memory`` and
``baseline`` fits in ``--time-budget-s`` (whole script, default 480 s): a short calibration run
measures each variant's step time, and the evaluation time is estimated from it. Every variant runs
the same number of steps on the same batches (a function of seed and step). When ``--out`` already
holds a ``results.json``, its step count is reused (so a later ``--variants product-key-memory``
matches the earlier runs) unless ``--steps`` says otherwise.

Writes under ``--out``: ``results.json`` (validation bits per byte, usage, KL, tokens/s, steps,
tokens, device, versions, per variant), ``results.md`` (the table for docs/results.md), ``plots/``
(loss curves, usage and KL, speed vs perplexity) and ``runs/<variant>/`` (metrics.jsonl,
eval_valid.json, config.json). Checkpoints and the token cache stay in ``--work-dir`` (temporary).

On a CPU, for a smoke test: add ``--device cpu --steps 3`` and small overrides such as
``dim=64 n_heads=2 n_layers=2 seq_len=64 mem_layers=[2] batch_size=2 final_eval_tokens=2048``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "memory": [],
    "baseline": ["mem_layers=[]"],
    # its query BatchNorm is broken in 0.3.0 (wrong axis): LayerNorm, as its own enwik8 script
    "product-key-memory": ["memory.query_norm=layernorm"],
}
CALIBRATION_STEPS = 30
CALIBRATION_SKIP = 10  # steps excluded from the timing (allocation, autotuning, compilation)


def _log(*a) -> None:
    print(*a, flush=True)


def _make_trackable(pkm, heads: int, topk: int) -> None:
    """Give a product-key-memory ``PKM`` the memory protocol of :mod:`pkmem.metrics` and
    :mod:`pkmem.optim` (``num_slots``, ``usage_stats``): a hook on its value bag reports the reads."""
    import torch

    pkm.num_slots = pkm.num_keys**2
    pkm.usage_stats = None

    def hook(module, args, kwargs, output):
        if pkm.usage_stats is not None:
            idx, w = args[0], kwargs.get("per_sample_weights")
            if w is None:
                w = torch.ones_like(idx, dtype=torch.float32)
            pkm.usage_stats.update(idx.reshape(-1, heads, topk), w.reshape(-1, heads, topk))

    pkm.values.register_forward_hook(hook, with_kwargs=True)


def make_memory(variant: str, memory: dict):
    """The ``make_memory`` of ``MemoryTransformer`` for ``variant``: None (pkmem's layer) or one that
    builds product-key-memory 0.3.0's ``PKM`` with the sizes of the config's ``memory`` section."""
    if variant != "product-key-memory":
        return None
    from pkmem.config import memory_options

    o = {**{n: p.default for n, p in memory_options().items()}, **memory}
    if o["query_norm"] != "layernorm":  # its BatchNorm path normalises the wrong axis (0.3.0)
        raise ValueError(f"memory.query_norm={o['query_norm']!r}: product-key-memory needs 'layernorm'")

    def make(layer: int, dim: int, values):
        try:
            from product_key_memory import PKM
        except ImportError as e:
            raise ValueError("the product-key-memory variant needs product-key-memory==0.3.0") from e
        pkm = PKM(
            dim,
            heads=o["heads"],
            num_keys=o["num_keys"],
            topk=o["topk"],
            dim_head=o["k_dim"] // 2,
            input_dropout=o["input_dropout"],
            query_dropout=o["query_dropout"],
            value_dropout=o["value_dropout"],
            attn_dropout=o["score_dropout"],
            use_layernorm=True,
            non_competitive_gates=o["score"] == "relu",
        )
        _make_trackable(pkm, o["heads"], o["topk"])
        return pkm

    return make


def _config(args, variant: str, extra: list[str]):
    from pkmem.config import load_config

    overrides = [f"data_path={args.data_path}", f"device={args.device}", f"seed={args.seed}"]
    overrides += [f"compile={str(args.compile).lower()}"]
    cfg = load_config(args.config, overrides + list(args.overrides) + VARIANTS[variant] + extra)
    cfg.name = f"enwik8-small-{variant}"
    return cfg


def _calibrate(args, variant: str, work: Path) -> float:
    """Seconds per training step of ``variant`` (median window after the first steps)."""
    from pkmem.train.loop import train

    run = work / f"calibrate-{variant}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = _config(
        args,
        variant,
        [
            f"cache_dir={work / 'cache'}",
            "log_every=5",
            "eval_every=0",
            "final_eval_tokens=4096",
            "tensorboard=false",
            "track_usage=true",
            f"max_steps={CALIBRATION_STEPS}",
        ],
    )
    memory = make_memory(variant, cfg.model.memory)
    train(cfg, run, progress=False, log=lambda *a: None, make_memory=memory)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tps = sorted(r["tokens_per_s"] for r in recs if r["type"] == "train" and r["step"] > CALIBRATION_SKIP)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    shutil.rmtree(run, ignore_errors=True)
    return tokens_per_step / tps[len(tps) // 2]


def _plan_steps(args, work: Path, t0: float, out: Path) -> tuple[int, dict]:
    previous = out / "results.json"
    if args.steps is not None:
        return args.steps, {"how": "--steps"}
    if previous.is_file():
        old = json.loads(previous.read_text())
        steps = old.get("steps")
        same = (old.get("config"), old.get("overrides"), old.get("seed")) == (
            args.config,
            list(args.overrides),
            args.seed,
        )
        if steps and same:
            _log(f"reusing {steps} steps from {previous} (equal steps for every variant; --steps overrides)")
            return int(steps), {"how": f"reused from {previous}"}
    timed = [v for v in ("memory", "baseline") if v in args.variants] or args.variants
    sec = {}
    for v in timed:
        sec[v] = _calibrate(args, v, work)
        _log(f"calibration: {v} {1000 * sec[v]:.1f} ms/step")
    cfg = _config(args, timed[0], [])
    from pkmem.train.data import eval_windows

    valid_tokens = _valid_tokens(args, work)
    n_eval = (
        len(eval_windows(valid_tokens, cfg.model.seq_len, cfg.train.final_eval_tokens)) * cfg.model.seq_len
    )
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    # evaluation: forward only, about 3x faster per token than a training step; + start-up per run
    eval_s = sum(n_eval / tokens_per_step * s / 3 + 20 for s in sec.values())
    periodic = cfg.train.eval_every and cfg.train.eval_tokens / tokens_per_step
    left = args.time_budget_s - (time.perf_counter() - t0) - eval_s - 15 * len(sec)
    per_step = sum(sec.values()) * (1 + (periodic or 0) / max(1, cfg.train.eval_every) / 3)
    steps = max(1, min(args.max_steps, math.floor(left / per_step)))
    plan = {"how": "calibrated", "seconds_per_step": sec, "eval_s_estimate": eval_s, "budget_left_s": left}
    _log(
        f"plan: {steps} steps per variant (max {args.max_steps}), "
        f"~{steps * sum(sec.values()):.0f} s of training"
    )
    return steps, plan


def _valid_tokens(args, work: Path) -> int:
    from pkmem.train.loop import load_data_for

    cfg = _config(args, "memory", [f"cache_dir={work / 'cache'}"])
    return load_data_for(cfg, work, log=_log).meta["splits"]["valid"]["tokens"]


def _versions() -> dict:
    import numpy
    import torch

    import pkmem

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__}
    v["pkmem"] = pkmem.__version__
    for mod in ("triton", "product_key_memory"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    try:
        import importlib.metadata as md

        v["product_key_memory"] = md.version("product-key-memory")
    except Exception:
        pass
    return v


def _device_name(device: str) -> str:
    import platform

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


def _md_table(results: dict) -> str:
    lines = [
        "| variant | val bits/byte | val loss | usage | KL | train tokens/s | eval tokens/s "
        "| params (values) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["variants"].items():
        mem = r["memories"][0] if r["memories"] else None
        usage = f"{100 * mem['usage']:.1f}%" if mem else "-"
        kl = f"{mem['kl']:.3f}" if mem else "-"
        lines.append(
            f"| {name} | {r['bpb']:.4f} | {r['loss']:.4f} | {usage} | {kl} "
            f"| {r['train_tokens_per_s']:,.0f} | "
            f"{r['eval_tokens_per_s']:,.0f} | {r['params'] / 1e6:.1f}M ({r['value_params'] / 1e6:.1f}M) |"
        )
    lines.append("")
    lines.append(
        f"{results['steps']} steps x {results['tokens_per_step']:,} tokens = {results['tokens']:,} training "
        f"tokens per variant; validation: {results['valid_tokens']:,} tokens; "
        f"device: {results['device_name']}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="enwik8, enwik8.gz or enwik8.zip")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--variants", default="memory,baseline", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument(
        "--with-product-key-memory", action="store_true", help="add the product-key-memory variant"
    )
    p.add_argument("--steps", type=int, help="steps per variant (default: fit --time-budget-s)")
    p.add_argument("--max-steps", type=int, default=6000, help="upper bound of the chosen steps")
    p.add_argument(
        "--time-budget-s", type=float, default=480.0, help="whole-script budget for memory+baseline"
    )
    p.add_argument("--config", default="enwik8-small")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--work-dir", help="checkpoints and token cache (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.with_product_key_memory and "product-key-memory" not in args.variants:
        args.variants.append("product-key-memory")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants {bad or args.variants} not allowed: choose from {list(VARIANTS)}")
    if not Path(args.data_path).is_file():
        p.error(f"--data-path {args.data_path!r} does not exist")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="pkmem-enwik8-"))
    work.mkdir(parents=True, exist_ok=True)
    from pkmem.train.loop import train
    from pkmem.train.plot import plot_runs

    try:
        steps, plan = _plan_steps(args, work, t0, out)
        previous = out / "results.json"
        results = json.loads(previous.read_text()) if previous.is_file() else {}
        same = (results.get("config"), results.get("overrides"), results.get("seed")) == (
            args.config,
            list(args.overrides),
            args.seed,
        )
        if results and (results.get("steps") != steps or not same):
            _log(f"{previous} was made with other steps or settings: starting a new results file")
            results = {}
        results.setdefault("variants", {})
        for variant in args.variants:
            run = work / "runs" / variant
            shutil.rmtree(run, ignore_errors=True)
            extra = [f"cache_dir={work / 'cache'}", "tensorboard=false", f"max_steps={steps}"]
            cfg = _config(args, variant, extra)
            _log(f"\n=== {variant}: {steps} steps ===")
            t_run = time.perf_counter()
            memory = make_memory(variant, cfg.model.memory)
            summary = train(cfg, run, progress=True, log=_log, make_memory=memory)
            valid = summary["valid"]
            from pkmem.models import MemoryTransformer

            model = MemoryTransformer(cfg.model, memory)
            impl = "product-key-memory" if memory else "pkmem"
            tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
            results["variants"][variant] = {
                "bpb": valid["bpb"],
                "loss": valid["loss"],
                "ppl": valid["ppl"],
                "memories": [
                    {k: m[k] for k in ("layer", "usage", "kl", "gini", "slots_50", "slots_90", "slots_99")}
                    for m in valid["memories"]
                ],
                "train_tokens_per_s": summary["train_tokens_per_s"],
                "eval_tokens_per_s": valid["tokens_per_s"],
                "steps": summary["step"],
                "tokens": summary["tokens"],
                "wall_s": time.perf_counter() - t_run,
                "params": model.num_parameters(),
                "value_params": model.num_parameters() - model.num_parameters(values=False),
                "memory_layers": list(model.mem_layer_indices),
                "mem_impl": impl if model.mem_layer_indices else None,
            }
            del model
            keep = out / "runs" / variant
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "eval_valid.json", "config.json"):
                shutil.copy2(run / name, keep / name)
            results.update(
                {
                    "benchmark": "benchmarks/enwik8_small.py",
                    "config": args.config,
                    "overrides": list(args.overrides),
                    "steps": steps,
                    "tokens_per_step": tokens_per_step,
                    "tokens": steps * tokens_per_step,
                    "valid_tokens": valid["tokens"],
                    "device_name": _device_name(args.device),
                    "versions": _versions(),
                    "seed": args.seed,
                    "plan": plan,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                }
            )
            tmp = out / ".results.json.tmp"
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, out / "results.json")
        order = [v for v in VARIANTS if v in results["variants"]]
        results["variants"] = {v: results["variants"][v] for v in order}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(_md_table(results))
        runs = [out / "runs" / v for v in order if (out / "runs" / v / "metrics.jsonl").is_file()]
        for path in plot_runs(runs, out / "plots"):
            _log(f"plot: {path}")
        _log("\n" + _md_table(results))
        _log(f"total wall time {time.perf_counter() - t0:.0f} s; results in {out}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
