"""Text generation with and without the KV cache, side by side in one run.

The main job's model (the ``tiny`` preset: 4 layers, dim 128, a 128²-slot memory in layer 3,
128-token window), or a trained run's (``--run``), continues a 16-token prompt by 200 sampled tokens
(temperature 0.8, top-k 40, the ``pkmem generate`` defaults) three ways:

- ``before``: the generation loop as it was before the KV cache (kept below, verbatim): under
  ``torch.no_grad``, the whole window (up to 128 tokens) runs for every new token;
- ``no_cache``: ``MemoryTransformer.generate(use_cache=False)``: the same computation under
  ``torch.inference_mode`` (a decoding step is mostly host time, and inference mode has less of it);
- ``kv_cache``: ``MemoryTransformer.generate()``: the attention's keys and values are kept, one
  token runs per step.

They are timed round-robin (one repeat of each in turn) so that the noise of a shared machine hits
them alike, with the same thread count; medians are reported, and the greedy texts are compared
while they fit the window.

    python benchmarks/generate.py [--repeats 3] [--threads N] [--device cpu] [--config tiny | --run RUN]
        [--out benchmarks/results/generate-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import pkmem
from pkmem.config import load_config
from pkmem.models import MemoryTransformer
from pkmem.train.evaluate import set_threads


def load_model(run: str | None, config: str, device: str) -> tuple[MemoryTransformer, str]:
    if run:
        from pkmem.train.loop import load_run

        model, cfg, _, ck = load_run(run, device)
        return model, f"{cfg.name} run {ck['dir']}"
    cfg = load_config(config).model
    torch.manual_seed(0)
    return MemoryTransformer(cfg).to(device).eval(), f"{config} preset, random weights"


@torch.no_grad()
def generate_before(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """``MemoryTransformer.generate`` before the KV cache (the whole window per new token)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.seq_len :])[:, -1].float()
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained run (default: the --config preset's model, random weights)")
    p.add_argument("--config", default="tiny", help="preset of the model (default: tiny, the main job's)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: pkmem's choice from the free cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", help="JSON file (default: benchmarks/results/generate-<device>.json, -<config> unless tiny)"
    )
    args = p.parse_args(argv)
    threads = set_threads(args.threads, print)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, what = load_model(args.run, args.config, args.device)
    window = model.config.seq_len
    g = torch.Generator(device=args.device).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=g, device=args.device)

    def sample(how: str):
        def f():
            gen = torch.Generator(device=args.device).manual_seed(1)
            if how == "before":
                return generate_before(model, prompt, args.new_tokens, 0.8, 40, gen)
            return model.generate(prompt, args.new_tokens, 0.8, 40, None, gen, how == "kv_cache")

        return f

    fns = {how: sample(how) for how in ("before", "no_cache", "kv_cache")}
    for f in fns.values():  # warm-up: allocations, the first calls of each kernel
        f()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            _sync(args.device)
            t = time.perf_counter()
            f()
            _sync(args.device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = min(args.new_tokens, window - prompt.shape[1])  # greedy texts agree while they fit the window
    greedy = model.generate(prompt, n, temperature=0.0, use_cache=True)
    same = torch.equal(greedy, model.generate(prompt, n, temperature=0.0, use_cache=False))
    same = same and torch.equal(greedy, generate_before(model, prompt, n, temperature=0.0))
    speedup = {"kv_cache_vs_before": med["before"] / med["kv_cache"]}
    speedup["kv_cache_vs_no_cache"] = med["no_cache"] / med["kv_cache"]
    speedup["no_cache_vs_before"] = med["before"] / med["no_cache"]
    print(f"{what}; {args.new_tokens} new tokens after a {prompt.shape[1]}-token prompt, window {window}")
    print(f"threads {threads}, load average {load}")
    print(f"{'':10s} {'seconds':>9s} {'tokens/s':>9s}")
    for k, s in med.items():
        print(f"{k:10s} {s:9.3f} {args.new_tokens / s:9.1f}")
    print(
        f"speed-up: {speedup['kv_cache_vs_before']:.1f}x over before ({speedup['kv_cache_vs_no_cache']:.1f}x "
        f"from the cache, {speedup['no_cache_vs_before']:.2f}x from inference mode); greedy texts equal "
        f"over the first {n} tokens: {same}"
    )
    result = {
        "benchmark": "generate",
        "setting": {
            "model": what,
            "prompt_tokens": prompt.shape[1],
            "new_tokens": args.new_tokens,
            "window": window,
            "temperature": 0.8,
            "top_k": 40,
            "repeats": args.repeats,
            "device": args.device,
            "threads": threads,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": load,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "pkmem": pkmem.__version__,
        },
        "seconds": med,
        "seconds_all": times,
        "tokens_per_s": {k: args.new_tokens / s for k, s in med.items()},
        "speedup": speedup,
        "greedy_equal_tokens": n if same else 0,
    }
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().split()[-1].lower()
    name = f"generate-{device}" + ("" if args.config == "tiny" or args.run else f"-{args.config}")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
