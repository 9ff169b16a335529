"""Whole-model forward throughput: 24 dense layers vs 12 layers with one memory layer (paper §4.5).

    python benchmarks/model.py [--out benchmarks/results/model-<gpu>.json]

A minimal pre-LN decoder (dim 1024, 16 heads, 4 x dim FFN, causal flash attention through
``scaled_dot_product_attention``), transformer blocks only (no embedding or output layer), on
random hidden states of batch 16 x 512 tokens, bf16 autocast with float32 parameters. In the
memory models, block 6 (1-based) has a memory layer in place of its FFN, as in the paper.
Forward tokens/s, timed three ways: training mode with autograd on, eval mode without autograd, and
that eval forward replayed from a CUDA graph (device time: no host launch overhead, which varies
between machines); plus a decode-like batch of 64 sequences x 1 token (eval). Medians of CUDA-event
timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import cuda_time, environment, gpu_slug, table, write_json  # noqa: E402
from layer import eval_graph_time, kernel_configs  # noqa: E402

from pkmem import ProductKeyMemory  # noqa: E402

DIM, HEADS, BATCH, SEQ = 1024, 16, 16, 512


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module | None = None):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if mlp is None:
            mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


def model(layers: int, memory: str | None = None, at: int = 6) -> nn.Module:
    blocks = []
    for i in range(1, layers + 1):
        mlp = None
        if memory is not None and i == at:
            if memory == "lucidrains":
                from product_key_memory import PKM

                mlp = PKM(DIM, heads=4, num_keys=512, topk=32, dim_head=256)
            else:
                mlp = ProductKeyMemory(DIM, 4, 512, 32, 512, backend=memory.split()[0])
                if "bf16" in memory:
                    mlp.values.data = mlp.values.data.to(torch.bfloat16)
        blocks.append(Block(DIM, HEADS, mlp))
    return nn.Sequential(*blocks)


def measure(m: nn.Module, x: torch.Tensor, xd: torch.Tensor) -> dict:
    def train_fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(x)

    def eval_fwd(inp):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return m(inp)

    m.train()
    # 10 warm-up calls: the first eager calls of a model in a process can run markedly slower
    row = {"train_fwd": cuda_time(train_fwd, iters=20, warmup=10)}
    m.eval()
    row["eval_fwd"] = cuda_time(lambda: eval_fwd(x), iters=20, warmup=10)
    row["decode_64x1_eval_fwd"] = cuda_time(lambda: eval_fwd(xd), iters=20)
    if not any(getattr(mod, "backend", "") == "torch" for mod in m.modules()):
        try:  # the same eval forward replayed from a CUDA graph: no host launch overhead
            row["eval_fwd_cuda_graph"] = eval_graph_time(m, x, iters=20)
        except Exception as e:
            traceback.print_exc(limit=3)
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


MODELS = [
    ("24 dense layers", 24, None),
    ("12 dense layers", 12, None),
    ("12 + pkmem memory (triton, bf16 values)", 12, "triton bf16"),
    ("12 + pkmem memory (triton, fp32 values)", 12, "triton"),
    ("12 + pkmem memory (torch reference)", 12, "torch"),
    ("12 + product-key-memory 0.3.0", 12, "lucidrains"),
]


def _graph_cell(r: dict) -> str:
    if "eval_fwd_cuda_graph_speedup_vs_24_dense" not in r:
        return ""
    g = r["eval_fwd_cuda_graph"]["median_ms"]
    return f"{g:.2f} ({r['eval_fwd_cuda_graph_speedup_vs_24_dense']:.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/model-<gpu>.json)")
    args = ap.parse_args()
    tuned = kernel_configs()
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"model-{gpu_slug()}.json")
    data = {"env": environment(), "config": dict(dim=DIM, heads=HEADS, batch=BATCH, seq=SEQ), "results": []}
    data["kernel_configs"] = tuned
    x = torch.randn(BATCH, SEQ, DIM, device="cuda")
    xd = torch.randn(64, 1, DIM, device="cuda")
    for name, layers, memory in MODELS:
        row = {"model": name}
        try:
            torch.manual_seed(0)
            row.update(measure(model(layers, memory).cuda(), x, xd))
        except Exception as e:
            traceback.print_exc(limit=3)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()
        data["results"].append(row)
        write_json(out_path, data)
    tokens = BATCH * SEQ
    first = data["results"][0]
    keys = ("train_fwd", "eval_fwd", "eval_fwd_cuda_graph")
    base = {k: first[k]["median_ms"] for k in keys if k in first}
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["model"], "error", r["error"][:60], "", "", "", ""])
            continue
        for k in keys:
            if k not in r or k not in base:
                continue
            r[f"{k}_tokens_per_s"] = tokens / (r[k]["median_ms"] * 1e-3)
            r[f"{k}_speedup_vs_24_dense"] = base[k] / r[k]["median_ms"]
        rows.append(
            [
                r["model"],
                f"{r['train_fwd']['median_ms']:.2f}",
                f"{r['train_fwd_tokens_per_s']:,.0f} ({r['train_fwd_speedup_vs_24_dense']:.2f}x)",
                f"{r['eval_fwd']['median_ms']:.2f}",
                f"{r['eval_fwd_tokens_per_s']:,.0f} ({r['eval_fwd_speedup_vs_24_dense']:.2f}x)",
                f"{r['decode_64x1_eval_fwd']['median_ms']:.2f}",
                _graph_cell(r),
            ]
        )
    write_json(out_path, data)
    print(f"wrote {out_path}")
    header = ["model", "train fwd ms", "tokens/s (vs 24)", "eval fwd ms", "tokens/s (vs 24)", "decode ms"]
    header.append("eval fwd, CUDA graph ms (vs 24)")
    print(table(rows, header))


if __name__ == "__main__":
    main()
