"""CPU speed of one memory layer: pkmem vs product-key-memory 0.3.0, side by side in one run.

Setting: dim 512, heads 4, num_keys 256 (65,536 slots), topk 32, k_dim 256 (lucidrains'
dim_head 128), 4 x 512 tokens, fp32, 2 threads. Variants are timed round-robin (one repeat of
each in turn) so that machine noise hits them alike; medians are reported.

Also: dense vs row-sparse value gradients (`sparse_values=True` + SparseAdam) for forward +
backward + the values' optimizer step, over token counts, to find the crossover.

    python benchmarks/cpu_layer.py [--repeats 7] [--out benchmarks/results/cpu_layer.json]
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

SETTING = dict(dim=512, heads=4, num_keys=256, topk=32, k_dim=256, batch=4, seq=512)


def make_layers():
    from product_key_memory import PKM

    s = SETTING
    common = dict(heads=s["heads"], num_keys=s["num_keys"], topk=s["topk"], k_dim=s["k_dim"])
    torch.manual_seed(0)
    return {
        "product-key-memory 0.3.0": PKM(
            s["dim"], heads=s["heads"], num_keys=s["num_keys"], topk=s["topk"], dim_head=s["k_dim"] // 2
        ),
        # the same computation as 0.3.0: LayerNorm per query half, no query bias
        "pkmem (layernorm, as 0.3.0)": pkmem.ProductKeyMemory(
            s["dim"], **common, query_norm="layernorm", query_bias=False
        ),
        "pkmem defaults (batchnorm)": pkmem.ProductKeyMemory(s["dim"], **common),
        "pkmem sparse_values (layernorm)": pkmem.ProductKeyMemory(
            s["dim"], **common, query_norm="layernorm", query_bias=False, sparse_values=True
        ),
    }


def step_fn(layer, x, backward):
    def step():
        if backward:
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    return step


def round_robin(fns: dict, repeats: int) -> dict:
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def sparse_crossover(repeats: int, tokens_list) -> list[dict]:
    """Forward + backward + the values' Adam step: dense gradients vs row-sparse ones."""
    s = SETTING
    common = dict(heads=s["heads"], num_keys=s["num_keys"], topk=s["topk"], k_dim=s["k_dim"])
    rows = []
    for tokens in tokens_list:
        torch.manual_seed(0)
        dense = pkmem.ProductKeyMemory(s["dim"], **common, query_norm="layernorm", query_bias=False)
        sparse = pkmem.ProductKeyMemory(
            s["dim"], **common, query_norm="layernorm", query_bias=False, sparse_values=True
        )
        opt_d = torch.optim.Adam([dense.values], lr=1e-3)
        opt_s = torch.optim.SparseAdam([sparse.values], lr=1e-3)
        x = torch.randn(tokens, s["dim"])

        def train_step(layer, opt, x=x):
            def f():
                layer.zero_grad(set_to_none=True)
                layer(x).sum().backward()
                opt.step()

            return f

        med = round_robin({"dense": train_step(dense, opt_d), "sparse": train_step(sparse, opt_s)}, repeats)
        slots = len(torch.unique(dense.lookup(x)[1]))
        rows.append(
            dict(
                tokens=tokens,
                touched_slots=slots,
                touched_fraction=slots / dense.num_slots,
                dense_ms=med["dense"],
                sparse_ms=med["sparse"],
                sparse_over_dense=med["sparse"] / med["dense"],
            )
        )
        print(
            f"  {tokens:5d} tokens  touched {slots / dense.num_slots:6.1%}  dense {med['dense']:7.1f} ms  "
            f"sparse {med['sparse']:7.1f} ms  ratio {med['sparse'] / med['dense']:.2f}",
            flush=True,
        )
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_layer.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = SETTING
    x = torch.randn(s["batch"], s["seq"], s["dim"])
    layers = make_layers()
    print(f"one memory layer, {s['batch']}x{s['seq']} tokens, fp32, {args.threads} threads", flush=True)
    fwd = round_robin({k: step_fn(m, x, False) for k, m in layers.items()}, args.repeats)
    fwdbwd = round_robin({k: step_fn(m, x, True) for k, m in layers.items()}, args.repeats)
    base = "product-key-memory 0.3.0"
    print(f"{'implementation':34s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd+bwd / 0.3.0':>16s}")
    for k in layers:
        print(f"{k:34s} {fwd[k]:9.1f} {fwdbwd[k]:11.1f} {fwdbwd[k] / fwdbwd[base]:16.2f}")
    print("sparse_values crossover (forward + backward + values' Adam / SparseAdam step):", flush=True)
    crossover = sparse_crossover(args.repeats, [64, 128, 256, 512, 1024, 2048])
    result = {
        "benchmark": "cpu_layer",
        "setting": {**s, "dtype": "float32", "threads": args.threads, "repeats": args.repeats},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "pkmem": pkmem.__version__,
        },
        "forward_ms": fwd,
        "forward_backward_ms": fwdbwd,
        "ratio_fwd_bwd_vs_0.3.0": {k: fwdbwd[k] / fwdbwd[base] for k in layers},
        "ratio_fwd_vs_0.3.0": {k: fwd[k] / fwd[base] for k in layers},
        "sparse_crossover": crossover,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
