"""One training step of a preset, part by part, with and without the memory, for each way of
training the value table; and (``--quality``) bf16 against float32 values on the same batches.

    python benchmarks/train_step.py [--presets enwik8-small,paper-12l-1024] [--rounds 3] [--out PATH]
    python benchmarks/train_step.py --device cpu --tiny            # smoke test on a CPU
    python benchmarks/train_step.py --quality 1500 --data-path /path/to/enwik8 [--out PATH]

The model and the optimiser come from the library as ``pkmem train`` builds them
(``pkmem.config.load_config``, ``MemoryTransformer``, ``make_optimizer``, ``clip_grad_norm``, a
``UsageTracker``, bf16 autocast on CUDA, the learning rate set every step); the batches are random
tokens made once on the device (no data loading). Variants, side by side in one process:

- ``no memory``: the preset without its memories (the FFN stays), AdamW;
- ``adamw fp32``: the value table in the AdamW (a dense gradient);
- ``adamw bf16``: a bfloat16 table in torch's AdamW (bfloat16 moments);
- ``sparse_adam fp32``: ``sparse_values=True`` and ``torch.optim.SparseAdam``;
- ``lazy_adam fp32|bf16``, ``exact_adam fp32|bf16``: :class:`pkmem.optim.RowAdam` (the backward
  writes only the rows read; one fused update of those rows; lazy = the paper's sparse updates,
  exact = dense AdamW's result).

The AdamW of the other parameters is torch's fused one (``make_optimizer``'s default on CUDA);
``(foreach AdamW)`` variants use torch's default ``foreach`` AdamW, as pkmem did before (the
memory's ratio of tokens/s is taken against the baseline with the same AdamW).

Each step is timed with CUDA events between its parts: ``forward`` (the usage tracking inside it
is timed on its own as ``metrics`` and left out of ``forward``), ``backward``, ``clip``,
``optimizer``, ``zero_grad``; medians over ``--steps`` steps run back to back after ``--warmup``
steps, with no host synchronisation between them (as in training: the host may run ahead of the
device). ``wall`` is the host's time per step over those steps (what tokens/s sees: the median of
three consecutive blocks' means, with a sync after each block, so that a one-time stall such as a
kernel compiled mid-run does not count; ``wall_ms_blocks`` lists the three); ``device``
the device's time per step (event to event: kernels and idle gaps); ``busy`` the sum of the
kernels' durations (the profiler, a few more steps; ``kernels`` lists the 25 longest per
step); ``idle = device - busy``: the device waiting
for the host. ``host`` is the host's time to issue one step's work; ``--host-profile N`` lists
the operators that take it (the profiler's self host time per step) and counts them per step.
The value update is also timed alone (``value_update``, on the gradient of a real step, medians
of repeats) against its floor: the bytes it must move (read the gradient, the parameters and two
moments of each updated row, write parameters and moments) at 4.2 TB/s. ``table_floor``: the least
device time the value table costs a step, its three passes over HBM (the forward's selected rows,
the gradient's rows, the update) at 4.2 TB/s. ``--rounds N`` measures every variant N times, the
order rotated each round, and adds a ``summary``: medians over the rounds, each ratio of tokens/s
taken against the baseline of its own round (the host's speed drifts from minute to minute: on one
H200 the baseline's rounds took 12.7, 13.1 and 19.6 ms per step while its kernels' busy time stayed
within 0.1 %). ``--compile on|both``
runs the model under ``torch.compile`` (as ``pkmem train compile=true``): the host's share then
shrinks to the compiled graphs' launches.

``--quality N``: trains enwik8-small N steps from the same initial weights on the same batches
(a function of seed and step, as ``pkmem train``) with float32 values (AdamW, today) and bfloat16
values (exact_adam, lazy_adam), and reports the validation loss (bits per byte) of each.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import table, write_json  # noqa: E402

HBM_BYTES_PER_S = 4.2e12  # H200 copy bandwidth (docs/kernels.md: 4.17-4.25 TB/s measured)
PRESETS = ("enwik8-small", "paper-12l-1024")

# name: (memory, value_optimizer, value dtype, sparse_values, fused AdamW: None = the library's default)
VARIANTS = {
    "no memory (foreach AdamW)": (False, "adamw", None, False, False),
    "adamw fp32 (foreach AdamW)": (True, "adamw", torch.float32, False, False),
    "no memory": (False, "adamw", None, False, None),
    "adamw fp32": (True, "adamw", torch.float32, False, None),
    "adamw bf16": (True, "adamw", torch.bfloat16, False, None),
    "sparse_adam fp32": (True, "sparse_adam", torch.float32, True, None),
    "lazy_adam fp32": (True, "lazy_adam", torch.float32, False, None),
    "lazy_adam bf16": (True, "lazy_adam", torch.bfloat16, False, None),
    "exact_adam fp32": (True, "exact_adam", torch.float32, False, None),
    "exact_adam bf16": (True, "exact_adam", torch.bfloat16, False, None),
}
QUALITY_VARIANTS = ("adamw fp32", "exact_adam bf16", "lazy_adam bf16", "lazy_adam fp32")


# ---- the one place that knows the config's key names ------------------------------------------------
def build_config(preset: str, memory: bool, tiny: bool, extra: list[str] = ()):
    """The preset's :class:`pkmem.config.Config` (without memories, or shrunk for a CPU smoke test)."""
    from pkmem.config import load_config

    overrides = []
    if tiny:
        overrides += ["dim=64", "n_heads=2", "n_layers=2", "seq_len=32", "batch_size=2", "grad_accum=2"]
        overrides += ["memory.num_keys=16", "memory.k_dim=16", "memory.topk=4", "memory.heads=2"]
        overrides += ["mem_layers=[2]", "n_memories=null", "bpe_vocab_size=300"]
    if not memory:
        overrides += ["mem_layers=[]", "n_memories=null"]
    cfg = load_config(preset, overrides + list(extra))
    cfg.model.vocab_size = cfg.train.bpe_vocab_size if cfg.train.tokenizer == "bpe" else 256
    return cfg


# ---- building a variant --------------------------------------------------------------------------
def build(preset: str, variant: str, device: torch.device, tiny: bool, extra: list[str] = ()):
    """``(model, optimizer, cfg)`` of one variant, from the same initial weights for every variant."""
    from pkmem.models import MemoryTransformer
    from pkmem.optim import make_optimizer, value_parameters

    memory, value_optimizer, dtype, sparse, fused = VARIANTS[variant]
    cfg = build_config(preset, memory, tiny, extra)
    torch.manual_seed(cfg.train.seed)
    model = MemoryTransformer(cfg.model).to(device)
    for table_ in value_parameters(model):  # shared tables are one Parameter: converted once
        table_.data = table_.data.to(dtype)  # as ProductKeyMemory(value_dtype=...): drawn in float32
    for _, _, m in model.memories():
        m.sparse_values = sparse
    t = cfg.train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16-table-under-AdamW warning: measured on purpose
        opt = make_optimizer(
            model,
            lr=t.lr,
            value_lr=t.value_lr,
            betas=tuple(t.betas),
            eps=t.eps,
            weight_decay=t.weight_decay,
            value_weight_decay=t.value_weight_decay,
            value_optimizer=value_optimizer,
            fused=fused,
        )
    return model, opt, cfg


def set_lr(opt, cfg, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = (cfg.train.value_lr if g.get("name") == "values" else cfg.train.lr) * factor


# ---- timing -------------------------------------------------------------------------------------
class Marks:
    """Timestamps of a step's parts: CUDA events (device) and perf_counter (host)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.events: list = []
        self.host: list[float] = []

    def __call__(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)
        self.names.append(name)
        self.host.append(time.perf_counter())

    def device_ms(self, i: int, j: int) -> float:
        if self.cuda:
            return self.events[i].elapsed_time(self.events[j])
        return (self.host[j] - self.host[i]) * 1e3  # on a CPU the host is the device


class TimedStats:
    """A memory's UsageStats with marks around each update (the metrics' share of the forward)."""

    def __init__(self, inner, marks_ref: list):
        self.inner, self.marks_ref = inner, marks_ref

    def update(self, idx, w) -> None:
        marks = self.marks_ref[0]
        if marks is not None:
            marks("metrics<")
        self.inner.update(idx, w)
        if marks is not None:
            marks("metrics>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, opt, cfg, batches, device, marks_ref: list, forward=None):
    """A closure running one training step (as pkmem's training loop) with marks between parts;
    ``forward`` (default ``model``): what computes the logits, e.g. ``torch.compile(model)``."""
    from pkmem.optim import clip_grad_norm
    from pkmem.train.evaluate import autocast
    from pkmem.train.loop import lr_factor

    t = cfg.train
    A = t.grad_accum
    counter = [0]
    forward = model if forward is None else forward

    def step(marks: Marks | None) -> torch.Tensor:
        marks_ref[0] = marks
        mark = marks if marks is not None else (lambda name: None)
        counter[0] += 1
        mark("start")
        factor = lr_factor(counter[0] + 10, t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        set_lr(opt, cfg, factor)
        loss_sum = torch.zeros((), device=device)
        for micro in range(A):
            xy = batches[(counter[0] * A + micro) % len(batches)]
            if forward is not model:  # a compiled model: its CUDA graphs (if any) may be replayed again
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, t.precision):
                logits = forward(xy[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
            mark("forward")
            (loss / A).backward()
            loss_sum += loss.detach() / A
            mark("backward")
        clip_grad_norm(model, t.grad_clip, t.value_grad_clip)
        mark("clip")
        opt.step()
        mark("optimizer")
        opt.zero_grad(set_to_none=True)
        mark("zero_grad")
        marks_ref[0] = None
        return loss_sum

    return step


PARTS = ("forward", "metrics", "backward", "clip", "optimizer", "zero_grad")
# the timed steps run in this many consecutive blocks; ``wall`` is the median block's time per step,
# so that one stall (e.g. a Triton kernel compiled for a new argument specialisation) does not move it
WALL_BLOCKS = 3


def split(marks: Marks) -> dict:
    """Device and host milliseconds per part of one step's marks."""
    dev = dict.fromkeys(PARTS, 0.0)
    host = dict.fromkeys(PARTS, 0.0)
    prev = 0
    open_metrics = None
    for i in range(1, len(marks.names)):
        name = marks.names[i]
        if name == "metrics<":
            open_metrics = i
            continue
        if name == "metrics>":
            dev["metrics"] += marks.device_ms(open_metrics, i)
            host["metrics"] += (marks.host[i] - marks.host[open_metrics]) * 1e3
            continue
        dev[name] += marks.device_ms(prev, i)
        host[name] += (marks.host[i] - marks.host[prev]) * 1e3
        prev = i
    dev["forward"] -= dev["metrics"]  # the forward's own share
    host["forward"] -= host["metrics"]
    dev["step"] = marks.device_ms(0, len(marks.names) - 1)
    host["step"] = (marks.host[-1] - marks.host[0]) * 1e3
    return {"device": dev, "host": host}


def busy_ms(step, device: torch.device, steps: int = 3, top: int = 25) -> tuple[float, list] | None:
    """Sum of the kernels' device time per step, from the profiler, and the ``top`` kernels by
    their time per step (``[{"name", "ms", "calls"}]``, calls per step); None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(None)
        sync(device)
    from torch.autograd import DeviceType

    total = 0.0  # kernels and copies on the device (not the annotations spanning them)
    per_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            us = e.time_range.elapsed_us()
            total += us
            acc = per_name.setdefault(e.name, [0.0, 0])
            acc[0] += us
            acc[1] += 1
    kernels = sorted(per_name.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    kernels = [{"name": k[:160], "ms": v[0] / 1e3 / steps, "calls": v[1] / steps} for k, v in kernels]
    return total / 1e3 / steps, kernels


def host_profile(step, device: torch.device, steps: int, top: int = 25) -> dict:
    """Where the host's time per step goes: the profiler's operators (and Python-level records such
    as ``Optimizer.step``) by their own host time, and how many operators one step dispatches."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(None)
        sync(device)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = sum(e.count for e in rows if e.key.startswith("aten::"))
    return {
        "steps": steps,
        "aten_ops_per_step": ops / steps,
        "top_self_host_ms_per_step": [
            {"name": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in rows[:top]
        ],
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure_variant(preset: str, variant: str, device, args, compiled: bool = False) -> dict:
    """One variant's step, eager or (``compiled``) with the model under ``torch.compile`` as
    ``pkmem train compile=true`` runs it (the usage tracking is then inside the compiled forward:
    ``metrics`` is not timed apart)."""
    from pkmem.metrics import UsageTracker

    model, opt, cfg = build(preset, variant, device, args.tiny)
    t = cfg.train
    B, T, A = t.batch_size, cfg.model.seq_len, t.grad_accum
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = cfg.model.vocab_size
    batches = [torch.randint(0, vocab, (B, T + 1), generator=g).to(device) for _ in range(max(2, A))]
    marks_ref = [None]
    if compiled:
        torch._dynamo.reset()
    mode = None if args.compile_mode == "default" else args.compile_mode
    forward = torch.compile(model, backend=args.compile_backend, mode=mode) if compiled else model
    tracker = None
    if model.memories() and t.track_usage:  # started after torch.compile: its buffers marked static
        tracker = UsageTracker(model).start()
        if not compiled:  # marks are host calls: they would break the compiled graph
            for _, _, m in model.memories():
                m.usage_stats = TimedStats(m.usage_stats, marks_ref)
    model.train()
    step = make_step(model, opt, cfg, batches, device, marks_ref, forward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(None)
    sync(device)
    all_marks = [Marks(device) for _ in range(args.steps)]
    k = min(WALL_BLOCKS, args.steps)  # consecutive blocks, a host sync after each
    cuts = [round(i * args.steps / k) for i in range(k + 1)]
    block_ms = []
    for block in (all_marks[a:b] for a, b in zip(cuts, cuts[1:])):
        t0 = time.perf_counter()
        for marks in block:
            step(marks)
        sync(device)
        block_ms.append((time.perf_counter() - t0) * 1e3 / len(block))
    wall = median(block_ms)
    parts = [split(m) for m in all_marks]
    row = {
        "preset": preset,
        "variant": variant,
        "compiled": compiled,
        "tokens_per_step": B * T * A,
        "wall_ms": wall,
        "wall_ms_blocks": block_ms,
        "tokens_per_s": B * T * A / (wall * 1e-3),
        "device_ms": {k: median([p["device"][k] for p in parts]) for k in (*PARTS, "step")},
        "host_ms": {k: median([p["host"][k] for p in parts]) for k in (*PARTS, "step")},
    }
    if all_marks[0].cuda:  # the device's time per step, start mark to the next step's start mark
        per = [a.events[0].elapsed_time(b.events[0]) for a, b in zip(all_marks, all_marks[1:])]
        row["device_step_ms"] = median(per)
    else:
        row["device_step_ms"] = row["device_ms"]["step"]
    try:
        busy = busy_ms(step, device)
        row["busy_ms"] = None if busy is None else busy[0]
        if busy is not None:
            row["kernels"] = busy[1]
    except Exception as e:  # the profiler is optional
        row["busy_error"] = f"{type(e).__name__}: {e}"
        row["busy_ms"] = None
    if row["busy_ms"] is not None:
        row["idle_ms"] = row["device_step_ms"] - row["busy_ms"]
    if args.host_profile:
        try:
            row["host_profile"] = host_profile(step, device, args.host_profile)
        except Exception as e:  # the profiler is optional
            row["host_profile"] = {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if model.memories():
        try:
            row["value_update"] = value_update(model, cfg, variant, batches, device, args)
        except Exception as e:
            traceback.print_exc(limit=4)
            row["value_update"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        row["table_floor"] = table_floor(model, B * T * A, row["value_update"])
    if tracker is not None:
        for _, _, m in model.memories():
            m.usage_stats = None
    del model, opt, step, forward
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def adam_bytes(elements: int, es_p: int, es_g: int, es_m: int) -> int:
    """The bytes an Adam(W) update of ``elements`` moves at least: read the parameter, its gradient
    and two moments, write the parameter and the moments (element sizes in bytes)."""
    return elements * (2 * es_p + es_g + 4 * es_m)


def table_floor(model, tokens: int, update: dict) -> dict:
    """The least device time the memory's value table costs a step (the presets have one memory):
    the bytes of its three passes over HBM at 4.2 TB/s, which no kernel, host or compiler change
    removes.

    - ``read``: the forward reads each row it selects at least once (``rows_read``, the distinct
      rows; the "with reuse" floor of docs/kernels.md: ``read_all_selected_bytes``, every selection
      read from HBM, is the floor without reuse across tokens, which the gather beats);
    - ``gradient``: the backward writes the gradient's rows (RowAdam: the rows read; dense AdamW:
      every row of the table; SparseAdam: the rows read);
    - ``update``: the value optimizer's bytes (``value_update``: read p, g, m, v; write p, m, v).
    """
    if "bytes" not in update:
        return {"error": "no value_update bytes"}
    m = model.memories()[0][2]
    es = m.values.element_size()
    read = update["rows_read"] * m.v_dim * es
    grad = update["rows"] * m.v_dim * es
    parts = {"read": read, "gradient": grad, "update": update["bytes"]}
    out = {f"{k}_bytes": v for k, v in parts.items()}
    out["read_all_selected_bytes"] = tokens * m.heads * m.topk * m.v_dim * es
    out["floor_ms_at_4.2TBps"] = sum(parts.values()) / HBM_BYTES_PER_S * 1e3
    return out


def value_update(model, cfg, variant: str, batches, device, args) -> dict:
    """The value table's update alone, on the gradient of a real step, against its floor.

    A separate optimizer over the table only (as the variant's value optimizer), re-armed with the
    same gradient before every repeat (outside the timed window)."""
    from pkmem.optim import RowAdam, value_parameters
    from pkmem.train.evaluate import autocast

    value_optimizer = VARIANTS[variant][1]
    t = cfg.train
    table_ = value_parameters(model)[0]
    betas = tuple(t.betas)
    if value_optimizer in ("lazy_adam", "exact_adam"):
        mode = "lazy" if value_optimizer == "lazy_adam" else "exact"
        opt = RowAdam([table_], lr=t.value_lr, betas=betas, eps=t.eps, mode=mode)
    elif value_optimizer == "sparse_adam":
        opt = torch.optim.SparseAdam([table_], lr=t.value_lr, betas=betas, eps=t.eps)
    else:
        opt = torch.optim.AdamW([table_], lr=t.value_lr, betas=betas, eps=t.eps, weight_decay=0.0)
    model.zero_grad(set_to_none=True)
    xy = batches[0]
    with autocast(device, t.precision):
        logits = model(xy[:, :-1])
    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1)).backward()
    N, v = table_.shape
    es_p = table_.element_size()
    if isinstance(opt, RowAdam):
        rg = opt.row_grad(table_)
        saved = (rg.touched.clone(), rg.count.clone(), rg.bound, rg.backwards)
        rows = rows_read = int(rg.touched.sum())
        es_g, es_m = table_.element_size(), 4

        def arm():
            rg.touched.copy_(saved[0])
            rg.count.copy_(saved[1])
            rg.bound, rg.backwards = saved[2], saved[3]
    else:
        grad = table_.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            table_.grad = grad
            rows = rows_read = grad.indices().shape[1]
        else:
            rows = N
            rows_read = int((grad != 0).any(dim=1).sum())  # the rows the forward read (nonzero weights)
        es_g, es_m = table_.element_size(), (4 if value_optimizer == "sparse_adam" else es_p)

        def arm():
            pass

    times = []
    for i in range(args.update_repeats + 2):
        arm()
        sync(device)
        marks = Marks(device)
        marks("a")
        opt.step()
        marks("b")
        sync(device)
        if i >= 2:
            times.append(marks.device_ms(0, 1))
    if isinstance(opt, RowAdam):
        opt.zero_grad()
    model.zero_grad(set_to_none=True)
    bytes_moved = adam_bytes(rows * v, es_p, es_g, es_m)
    ms = median(times)
    floor = bytes_moved / HBM_BYTES_PER_S * 1e3
    return {
        "ms": ms,
        "rows": rows,
        "rows_read": rows_read,
        "num_slots": N,
        "v_dim": v,
        "bytes": bytes_moved,
        "floor_ms_at_4.2TBps": floor,
        "measured_over_floor": ms / floor if floor > 0 else None,
    }


# ---- quality: bf16 against float32 values -------------------------------------------------------------
def quality(args, device) -> dict:
    """Train enwik8-small ``args.quality`` steps per variant on the same batches; validation loss."""
    from pkmem.optim import clip_grad_norm
    from pkmem.train.data import prepare_data, sample_batch
    from pkmem.train.evaluate import autocast, evaluate
    from pkmem.train.loop import lr_factor

    source = ["data=enwik8", f"data_path={args.data_path}"] if args.data_path else ["data=stdlib"]
    source += [f"seed={args.seed}"]  # the initial weights and the batches
    cache = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "pkmem-train-step")
    results = []
    for variant in QUALITY_VARIANTS:
        model, opt, cfg = build("enwik8-small", variant, device, args.tiny, source)
        t = cfg.train
        data = prepare_data(t.data, t.data_path, cache, t.tokenizer, t.bpe_vocab_size, cfg.model.seq_len + 1)
        train_tokens, valid = data.tokens("train"), data.tokens("valid")
        B, T, A, N = t.batch_size, cfg.model.seq_len, t.grad_accum, args.quality
        model.train()
        sync(device)
        t0 = time.perf_counter()
        losses = []
        for step in range(1, N + 1):
            set_lr(opt, cfg, lr_factor(step, t.schedule, t.warmup_steps, N, t.min_lr_ratio))
            for micro in range(A):
                xy = torch.from_numpy(sample_batch(train_tokens, B, T, t.seed, step, micro)).to(device)
                with autocast(device, t.precision):
                    logits = model(xy[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
                (loss / A).backward()
            clip_grad_norm(model, t.grad_clip, t.value_grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % max(1, N // 10) == 0:
                losses.append((step, loss.item()))
        sync(device)
        seconds = time.perf_counter() - t0
        ev = evaluate(
            model, valid, T, t.eval_batch_size or B, device, t.precision, max_tokens=args.eval_tokens
        )
        results.append(
            {
                "variant": variant,
                "steps": N,
                "train_tokens_per_s": N * B * T * A / seconds,
                "valid_loss": ev["loss"],
                "valid_bits_per_token": ev["bits_per_token"],
                "valid_tokens": ev["tokens"],
                "train_losses": losses,
                "memories": ev.get("memories", []),
            }
        )
        print(f"{variant}: valid {ev['bits_per_token']:.4f} bits/token after {N} steps", flush=True)
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results[0]["valid_bits_per_token"]
    for r in results:
        r["diff_vs_" + QUALITY_VARIANTS[0].replace(" ", "_")] = r["valid_bits_per_token"] - base
    return {"data": args.data_path or "stdlib", "seed": args.seed, "results": results}


# ---- output ---------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        from common import environment as cuda_environment

        return cuda_environment()
    return {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}  # fmt: skip


def baseline(rows: list[dict], r: dict) -> dict | None:
    """The row of ``r``'s baseline: no memory, the same preset, AdamW, mode and round."""
    plain = "no memory (foreach AdamW)" if "foreach" in r["variant"] else "no memory"
    same = (r["preset"], plain, r.get("compiled"), r.get("round"))
    return next(
        (b for b in rows if (b["preset"], b["variant"], b.get("compiled"), b.get("round")) == same), None
    )


def summarize(rows: list[dict]) -> list[dict]:
    """Per preset, variant and mode over the rounds: the median wall time and kernels' busy time,
    and the median of each round's tokens/s ratio to that round's baseline (the host's speed
    drifts between processes and minutes: a ratio is taken within one round)."""
    out = []
    keys = list(dict.fromkeys((r["preset"], r["variant"], r.get("compiled")) for r in rows))
    for preset, variant, compiled in keys:
        rs = [
            r for r in rows if (r["preset"], r["variant"], r.get("compiled")) == (preset, variant, compiled)
        ]
        ok = [r for r in rs if "error" not in r]
        ratios = []
        for r in ok:
            b = baseline(rows, r)
            if b is not None and "tokens_per_s" in b:
                ratios.append(r["tokens_per_s"] / b["tokens_per_s"])
        busy = [r["busy_ms"] for r in ok if r.get("busy_ms") is not None]
        out.append(
            {
                "preset": preset,
                "variant": variant,
                "compiled": compiled,
                "rounds": len(ok),
                "wall_ms_median": median([r["wall_ms"] for r in ok]),
                "wall_ms_rounds": [r["wall_ms"] for r in ok],
                "busy_ms_median": median(busy) if busy else None,
                "ratio_vs_no_memory_rounds": ratios,
                "ratio_vs_no_memory_median": median(ratios) if ratios else None,
            }
        )
    return out


def print_summary(summary: list[dict]) -> None:
    rows = [
        [
            s["preset"],
            s["variant"] + (" (compiled)" if s["compiled"] else ""),
            f"{s['wall_ms_median']:.2f}",
            " ".join(f"{w:.2f}" for w in s["wall_ms_rounds"]),
            "-" if s["busy_ms_median"] is None else f"{s['busy_ms_median']:.2f}",
            "-" if s["ratio_vs_no_memory_median"] is None else f"{s['ratio_vs_no_memory_median']:.2f}x",
            " ".join(f"{x:.2f}" for x in s["ratio_vs_no_memory_rounds"]),
        ]
        for s in summary
    ]
    header = [
        "preset",
        "variant",
        "wall ms (median)",
        "per round",
        "busy ms",
        "vs none (median)",
        "per round",
    ]
    print(table(rows, header))


def print_table(rows: list[dict]) -> None:
    out = []
    several = any(r.get("round") for r in rows)
    for r in rows:
        name = r["variant"] + (" (compiled)" if r.get("compiled") else "")
        name += f" (round {r['round'] + 1})" if several else ""
        if "error" in r:
            out.append([r["preset"], name, "error", r["error"][:60]] + [""] * 12)
            continue
        d, h = r["device_ms"], r["host_ms"]
        base = baseline(rows, r)
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and "tokens_per_s" in base else float("nan")
        vu = r.get("value_update") or {}
        tf = r.get("table_floor") or {}
        out.append(
            [
                r["preset"],
                name,
                f"{r['wall_ms']:.2f}",
                f"{r['tokens_per_s'] / 1e3:.0f}k ({ratio:.2f}x)",
                f"{r['device_step_ms']:.2f}",
                "-" if r.get("busy_ms") is None else f"{r['busy_ms']:.2f}",
                "-" if r.get("idle_ms") is None else f"{r['idle_ms']:.2f}",
                f"{h['step']:.2f}",
                *(f"{d[k]:.2f}" for k in PARTS),
                "-" if "ms" not in vu else f"{vu['ms']:.3f} ({vu['measured_over_floor']:.1f}x)",
                f"{tf['floor_ms_at_4.2TBps']:.2f}" if "floor_ms_at_4.2TBps" in tf else "-",
            ]
        )
    header = ["preset", "variant", "wall ms", "tok/s (vs none)", "device", "busy", "idle", "host"]
    header += [*PARTS, "value update ms (/floor)", "table floor ms"]
    print(table(out, header))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="the model eager (off), under torch.compile (on), or each variant both ways (default off)",
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="profile N more steps on the host: the operators that take its time (default 0: off)",
    )
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's backend (default inductor)"
    )
    ap.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode; reduce-overhead replays the forward and backward from CUDA graphs",
    )
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing (default 5, tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 12, tiny 3)")
    ap.add_argument("--update-repeats", type=int, default=None, help="value-update repeats (default 10)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every variant this many times, the variants' order rotated each round; the "
        "summary gives medians over the rounds, ratios taken within a round (default 1)",
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/train_step-<gpu>.json)"
    )
    ap.add_argument("--quality", type=int, default=0, help="train enwik8-small N steps per value dtype")
    ap.add_argument("--data-path", default=None, help="enwik8 for --quality (default: stdlib data)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="validation tokens for --quality")
    ap.add_argument("--cache-dir", default=None, help="token cache for --quality")
    ap.add_argument("--seed", type=int, default=0, help="--quality: seed of the weights and batches")
    args = ap.parse_args()
    if args.quality and (args.compile != "off" or args.host_profile):
        ap.error(
            f"--quality={args.quality} trains eagerly: it takes no --compile={args.compile} and no "
            f"--host-profile={args.host_profile} (run the step breakdown without --quality for those)"
        )
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds} is not allowed: --rounds must be an int >= 1")
    device = torch.device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 12)
    args.update_repeats = args.update_repeats if args.update_repeats is not None else (2 if args.tiny else 10)
    if args.eval_tokens is None and args.tiny:
        args.eval_tokens = 4096
    if device.type == "cuda":
        from common import gpu_slug

        slug = gpu_slug()
    else:
        slug = "cpu"
    kind = "train_step_quality" if args.quality else "train_step"
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{kind}-{slug}.json"
    )
    data = {"env": environment(device), "args": vars(args), "hbm_bytes_per_s_for_floors": HBM_BYTES_PER_S}
    if args.quality:
        data["quality"] = quality(args, device)
        write_json(out, data)
        rows = [
            [
                r["variant"],
                f"{r['valid_bits_per_token']:.4f}",
                f"{r[k]:+.4f}",
                f"{r['train_tokens_per_s']:.0f}",
            ]
            for r in data["quality"]["results"]
            for k in [next(k for k in r if k.startswith("diff_vs_"))]
        ]
        print(table(rows, ["variant", "valid bits/token", "vs adamw fp32", "train tok/s"]))
        print(f"wrote {out}")
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {unknown} are not known: choose from {list(VARIANTS)}")
    data["results"] = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.compile != "off":  # the compile mode the config allows with each preset (pkmem train's rule)
        for preset in presets:
            try:
                build_config(preset, True, args.tiny, ["compile=true", f"compile_mode={args.compile_mode}"])
            except ValueError as e:
                ap.error(f"--compile-mode {args.compile_mode} is not allowed with {preset}: {e}")
    runs = [
        (rnd, p, v, c)
        for rnd in range(args.rounds)
        for p in presets
        for v in variants[rnd % len(variants) :] + variants[: rnd % len(variants)]  # rotated per round
        for c in modes
    ]
    for rnd, preset, variant, compiled in runs:
        print(f"{preset} / {variant}{' (compiled)' if compiled else ''} (round {rnd + 1}) ...", flush=True)
        try:
            row = measure_variant(preset, variant, device, args, compiled)
        except Exception as e:
            traceback.print_exc(limit=4)
            row = {"preset": preset, "variant": variant, "compiled": compiled}
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["round"] = rnd
        data["results"].append(row)
        write_json(out, data)
    if args.rounds > 1:
        data["summary"] = summarize(data["results"])
        write_json(out, data)
    print_table(data["results"])
    if args.rounds > 1:
        print_summary(data["summary"])
    print(
        "ms per step (medians); device/busy/idle: the device's time per step, its kernels, its waiting; "
        "host: the host's time to issue a step; value update: alone, measured / floor at 4.2 TB/s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
