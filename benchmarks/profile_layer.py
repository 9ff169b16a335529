"""Where the layer's time goes, per PyTorch op and per kernel (one GPU run).

    python benchmarks/profile_layer.py trace [--tokens 8192]   # torch profiler tables
    python benchmarks/profile_layer.py ncu                     # kernels for Nsight Compute

``trace``: the paper setting's training step (bf16 autocast, forward + backward) under the torch
profiler: device time per op and input shapes (which op launched which copy), and host time per
op of the eval forward (what an eager decode step pays). ``ncu``: runs the search forward and
backward and the gather forward and backward at the paper's size a few times, for
``ncu -k regex:_search_fwd_kernel -s 2 -c 1 python benchmarks/profile_layer.py ncu``.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pkmem import ProductKeyMemory
from pkmem.ops.triton import gather, search

DIM, HEADS, NUM_KEYS, TOPK, K_DIM = 1024, 4, 512, 32, 512


def layer_step(T: int):
    layer = ProductKeyMemory(DIM, HEADS, NUM_KEYS, TOPK, K_DIM, backend="triton").cuda()
    layer.values.data = layer.values.data.to(torch.bfloat16)
    x = torch.randn(T, DIM, device="cuda", requires_grad=True)
    gy = torch.randn(T, DIM, device="cuda")

    def step():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(gy)

    return layer, x, step


def trace(T: int) -> None:
    layer, x, step = layer_step(T)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"=== training step, {T} tokens: ops by device time (5 steps)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=45))
    layer.eval()
    for t in (64, T):
        xe = torch.randn(t, DIM, device="cuda")

        def infer(xe=xe):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return layer(xe)

        for _ in range(5):
            infer()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                infer()
            torch.cuda.synchronize()
        print(f"=== eval forward, {t} tokens: host time per op (20 calls)")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


def ncu_kernels() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(8192, HEADS, K_DIM, device="cuda", generator=g)
    sk = torch.randn(HEADS, 2, NUM_KEYS, K_DIM // 2, device="cuda", generator=g) / (K_DIM // 2) ** 0.5
    for _ in range(3):
        w_s, i_s = search.search_forward(q, sk, TOPK)
    gs = torch.randn_like(w_s)
    for _ in range(3):  # the backward's scatter kernel, bf16 gradient (as under autocast)
        search.search_backward(gs, q, sk, i_s, grad_dtype="bfloat16")
    values = (torch.randn(NUM_KEYS**2, DIM, device="cuda", generator=g) / DIM**0.5).to(torch.bfloat16)
    idx = torch.randint(0, NUM_KEYS**2, (8192, HEADS * TOPK), device="cuda", generator=g)
    w = torch.softmax(torch.randn(8192, HEADS * TOPK, device="cuda", generator=g), -1)
    go = torch.randn(8192, DIM, device="cuda", generator=g)
    for _ in range(3):
        gather.gather_forward(values, idx, w)
        gather.gather_backward(go, values, idx, w)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["trace", "ncu"])
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args()
    trace(a.tokens) if a.mode == "trace" else ncu_kernels()


if __name__ == "__main__":
    main()
