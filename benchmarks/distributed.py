"""Training on several ranks: data-parallel tokens/s at N ranks vs one, what a sharded value table
costs each rank (memory and bytes sent), and the largest memory that trains on one device vs
sharded over N.

    python benchmarks/distributed.py --device cpu --nproc 2 --capacity-keys 16,32   # 2 CPU processes, tiny
    python benchmarks/distributed.py --device cuda --nproc 2 --only throughput      # 2 GPUs (NCCL)
    python benchmarks/distributed.py --device cuda --nproc 2 --only capacity
    python benchmarks/distributed.py --device cuda --nproc 2 --only resume --resume-steps 100

It starts its own ranks, as torchrun does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), so that 1 and N ranks are measured side by side in one run:

- ``throughput``: the training loop's own step (``pkmem.train.loop.train_step``: DDP, the global
  BatchNorm, the sharded reads, clipping, AdamW) on the preset's global batch (batch_size x
  grad_accum sequences per step, split over the ranks), on synthetic tokens of the preset's
  vocabulary; value tables ``replicated`` (DDP all-reduces their gradient) or sharded by
  ``columns`` or ``rows``. Tokens/s: the median of ``--repeats`` timings of ``--steps`` steps after
  ``--warmup`` steps. Per rank also: the value table's bytes (the table, its gradient and its Adam
  state), the bytes the rank sends per step (``ddp_allreduce``: DDP's gradient all-reduce of the
  replicated parameters, value tables included when replicated, counted as a ring all-reduce,
  2 (N-1)/N of the buffer; ``indices``, ``weights``, ``outputs``, ``output_grads``,
  ``weight_grads``: the sharded reads' messages), and on CUDA the peak allocated memory.
- ``read``: one read of the value table, forward and backward, at the preset's memory and batch:
  the sharded read by ``columns`` and by ``rows`` on N ranks (each its share of the tokens, random
  slots), and the whole table's gather of all the tokens on one rank. Median (and minimum)
  milliseconds of the read, of its local gather alone (every rank's tokens on this rank's part, no
  communication), and the bytes each rank sends: the layouts side by side.
- ``capacity`` (``--capacity-keys``): for 1 and N ranks, memories of growing ``num_keys`` (values
  zero-initialised: the same memory, no time spent drawing) train ``--capacity-steps`` steps or
  fail (out of memory); each attempt in fresh processes, stopping at the first failure.
- ``resume`` (``--resume-steps S``): ``pkmem train`` runs of 2 S steps with a checkpoint at S, one
  on N ranks (value tables sharded by the first sharded ``--modes`` layout, else replicated) and
  one in one process; each run's checkpoint at S is then resumed on the other world size for the
  last S steps. The resumed losses against the uninterrupted run's at the same steps, beside the
  two uninterrupted runs' own difference (1 vs N ranks: the run-to-run noise of the world size).
  Data: ``--resume-data`` (``stdlib``, or a path to enwik8).

Every part runs unless ``--only`` names one (``--resume-steps 0`` leaves the resume part out).

On CPUs the numbers show that the code runs (2 processes sharing the machine's cores), not speed.
Writes ``benchmarks/results/distributed[-<part>]-<cpu|gpu>x<N>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

# this folder last on sys.path (Python puts a script's first): its kernels.py, layer.py, ... must not
# shadow an installed package (transformers imports `kernels`)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from common import git_commit, table, write_json  # noqa: E402

MODES = ("replicated", "columns", "rows")
CPU_OVERRIDES = "batch_size=8,seq_len=64"  # the tiny preset, smaller: 2 processes share 2 cores


# ---- one rank ---------------------------------------------------------------------------------------
class _Tokens:
    """Synthetic training tokens: what ``Run.data`` gives ``train_step``."""

    def __init__(self, vocab: int, n: int = 1 << 22, seed: int = 0):
        dtype = np.uint16 if vocab <= 2**16 else np.int32
        self.array = np.random.default_rng(seed).integers(0, vocab, size=n, dtype=dtype)

    def tokens(self, split: str):
        return self.array


def _config(name: str, overrides: list[str], mode: str, device: str):
    from pkmem.config import load_config

    extra = [f"device={device}", "tensorboard=false"]
    if mode != "replicated":
        extra += ["shard_values=true", f"shard_layout={mode}"]
    cfg = load_config(name, [*overrides, *extra])
    cfg.model.vocab_size = cfg.train.bpe_vocab_size if cfg.train.tokenizer == "bpe" else 256
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _value_bytes(model, optimizer) -> int:
    """The value tables on this rank: the table, its gradient (allocated in every step: counted as
    one table) and its optimizer state."""
    from pkmem.optim import value_parameters

    total = 0
    for p in value_parameters(model):
        total += 2 * p.numel() * p.element_size()
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def _ddp_counter(ddp, counter: dict, world: int):
    """A DDP comm hook that counts the bytes a rank sends in DDP's gradient all-reduce (a ring
    all-reduce sends 2 (N-1)/N of the buffer): the replicated parameters, value tables included when
    they are replicated."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
        counter["ddp_allreduce"] = counter.get("ddp_allreduce", 0) + 2 * (world - 1) * nbytes // world
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, hook)


def _throughput(name: str, overrides: list[str], mode: str, device_name: str, args) -> dict:
    import pkmem.train.loop as loop
    from pkmem import value_parameters
    from pkmem.distributed.values import count_traffic

    par = _PAR
    cfg = _config(name, overrides, mode, device_name)
    device = par.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, optimizer = loop._model_and_optimizer(cfg, device, None, par)
    forward = par.wrap(model)
    ddp_bytes: dict = {}
    if par.distributed:
        _ddp_counter(forward, ddp_bytes, par.world_size)
    run = loop.Run(
        cfg=cfg,
        dir=Path(tempfile.gettempdir()),
        device=device,
        data=_Tokens(cfg.model.vocab_size),
        tok=None,
        model=model,
        forward=forward,
        optimizer=optimizer,
        tracker=loop._usage_tracker(model, cfg.train.track_usage),
        tb=None,
        pbar=None,
        start_step=0,
        t_start=time.perf_counter(),
        par=par,
    )
    state = loop.LoopState(step=0, lr=cfg.train.lr)
    model.train()
    if run.tracker is not None:
        run.tracker.start()

    def step():
        state.step += 1
        loop.train_step(run, state)

    for _ in range(args.warmup):
        step()
    ddp_bytes.clear()
    with count_traffic() as traffic:  # one step's messages
        step()
    _sync(device)
    sent = {**traffic, **ddp_bytes}
    rates = []
    for _ in range(args.repeats):
        state.losses = []
        par.barrier("timing")
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        loss = float(par.mean(torch.stack(state.losses)).mean())  # syncs the device
        rates.append(args.steps * run.tokens_per_step / (time.perf_counter() - t0))
    n_table = sum(p.numel() for p in value_parameters(model))
    row = {
        "config": name,
        "mode": mode if par.distributed else "one rank",
        "world_size": par.world_size,
        "tokens_per_step": run.tokens_per_step,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_all": rates,
        "loss_after": loss,
        "value_params_per_rank": n_table,
        "value_bytes_per_rank": _value_bytes(model, optimizer),
        "bytes_sent_per_step": sent,
        "bytes_sent_per_step_total": sum(sent.values()),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    return row


def _read(name: str, overrides: list[str], layout: str, device_name: str, args) -> dict:
    """One read of the value table (forward and backward) at the preset's memory and batch: the
    sharded read on N ranks (each with its share of the tokens), or the whole table's gather of all
    the tokens on one rank."""
    from pkmem import ops
    from pkmem.distributed.values import count_traffic, sharded_read

    par = _PAR
    cfg = _config(name, overrides, "replicated", device_name)
    device = par.device(cfg.train.device)
    opts = {"heads": 4, "num_keys": 512, "topk": 32, **cfg.model.memory}
    S, J = opts["num_keys"] ** 2, opts["heads"] * opts["topk"]
    v, N = opts.get("v_dim") or cfg.model.dim, par.world_size
    T = cfg.train.batch_size * cfg.model.seq_len // N  # this rank's tokens of one micro-batch
    g = torch.Generator(device=device).manual_seed(par.rank)
    shape = {"columns": (S, v // N), "rows": (S // N, v), "whole": (S, v)}[layout]
    table_ = torch.randn(shape, device=device, generator=g).requires_grad_()
    idx = torch.randint(0, S, (T, J), device=device, generator=g)
    w = torch.rand(T, J, device=device, generator=g).requires_grad_()
    grad = torch.randn(T, v, device=device, generator=g)
    # the local gather alone (no communication): every rank's tokens on this rank's part
    idx_all = torch.randint(0, S, (N * T, J), device=device, generator=g)
    if layout == "rows":
        lo, hi = par.rank * S // N, (par.rank + 1) * S // N
        idx_all = torch.where((idx_all >= lo) & (idx_all < hi), idx_all - lo, -1)
    w_all = torch.rand(N * T, J, device=device, generator=g).requires_grad_()
    grad_all = torch.randn(N * T, shape[1], device=device, generator=g)

    def once():
        if layout == "whole":
            out = ops.weighted_gather(table_, idx, w)
        else:
            out = sharded_read(table_, idx, w, layout, S, par.group)
        out.backward(grad)
        table_.grad = w.grad = None

    def local():
        ops.weighted_gather(table_, idx_all, w_all).backward(grad_all)
        table_.grad = w_all.grad = None

    def timed(fn) -> list[float]:
        times = []
        for _ in range(args.read_iters):
            par.barrier("timing")
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    for _ in range(3):
        once()
        local()
    with count_traffic() as traffic:
        once()
    times, local_times = timed(once), timed(local)
    ms = statistics.median(times)
    return {
        "config": name,
        "part": "read",
        "layout": layout,
        "world_size": N,
        "tokens_per_rank": T,
        "entries_per_token": J,
        "slots": S,
        "v_dim": v,
        "read_ms": ms,
        "read_ms_min": min(times),
        "read_ms_all": times,
        "local_gather_ms": statistics.median(local_times),
        "local_gather_ms_min": min(local_times),
        "tokens_per_s": N * T / (ms * 1e-3),
        "bytes_sent": dict(traffic),
        "bytes_sent_total": sum(traffic.values()),
    }


def _capacity(name: str, overrides: list[str], num_keys: int, device_name: str, args) -> dict:
    import pkmem.train.loop as loop

    par = _PAR
    mode = "columns" if par.distributed else "replicated"
    cfg = _config(
        name, [*overrides, f"memory.num_keys={num_keys}", "memory.zero_init_values=true"], mode, device_name
    )
    device = par.device(cfg.train.device)
    t0 = time.perf_counter()
    model, optimizer = loop._model_and_optimizer(cfg, device, None, par)
    build_s = time.perf_counter() - t0
    run = loop.Run(
        cfg=cfg,
        dir=Path(tempfile.gettempdir()),
        device=device,
        data=_Tokens(cfg.model.vocab_size, n=1 << 20),
        tok=None,
        model=model,
        forward=par.wrap(model),
        optimizer=optimizer,
        tracker=None,
        tb=None,
        pbar=None,
        start_step=0,
        t_start=time.perf_counter(),
        par=par,
    )
    state = loop.LoopState(step=0, lr=cfg.train.lr)
    for _ in range(args.capacity_steps):
        state.step += 1
        loop.train_step(run, state)
    loss = float(torch.stack(state.losses).mean())
    from pkmem import value_parameters

    table_params = sum(getattr(m, "num_slots", 0) * getattr(m, "v_dim", 0) for _, _, m in model.memories())
    return {
        "config": name,
        "world_size": par.world_size,
        "num_keys": num_keys,
        "table_params": table_params,
        "table_and_adam_gib": table_params * 4 * 4 / 2**30,  # table, gradient, two moments (float32)
        "value_params_per_rank": sum(p.numel() for p in value_parameters(model)),
        "trained_steps": args.capacity_steps,
        "loss": loss,
        "build_s": build_s,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _train_run(name: str, overrides: list[str], spec: tuple, device_name: str, args) -> dict:
    """A ``pkmem train`` run (``spec = ("train", run_dir, mode)``) or its resumption
    (``("resume", run_dir, mode)``) on this launch's ranks, as ``torchrun -m pkmem train`` runs it."""
    import pkmem.train.loop as loop

    kind, run_dir, mode = spec
    par = _PAR
    extra = ["shard_values=true", f"shard_layout={mode}"] if par.distributed and mode != "replicated" else []
    t0 = time.perf_counter()
    if kind == "train":
        loop.train(_config(name, overrides, mode, device_name), run_dir, progress=False, log=_quiet)
    else:
        loop.resume(run_dir, [*overrides, f"device={device_name}", *extra], progress=False, log=_quiet)
    return {"part": "resume", "kind": kind, "run": run_dir, "world_size": par.world_size,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _quiet(*args, **kwargs) -> None:
    pass


def _train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("type") == "train"}


def _resume_part(config: str, overrides: list[str], mode: str, args) -> dict:
    """Saved on N ranks and resumed in one process, and the reverse, against uninterrupted runs."""
    S, N = args.resume_steps, args.nproc
    root = Path(tempfile.mkdtemp(prefix="pkmem-resume-"))
    data = (
        ["data=stdlib"] if args.resume_data == "stdlib" else ["data=enwik8", f"data_path={args.resume_data}"]
    )
    common = [*overrides, *data, f"cache_dir={root / 'cache'}", f"max_steps={2 * S}", f"ckpt_every={S}"]
    common += [
        "log_every=1",
        "eval_every=0",
        "final_eval_tokens=4096",
        "max_time_s=null",
        "keep_checkpoints=2",
    ]
    out: dict = {"config": config, "steps": S, "mode_on_n_ranks": mode, "world_size": N, "data": data}
    try:
        steps = [
            (N, [("resume", config, common, ("train", str(root / "ref_n"), mode))]),
            (1, [("resume", config, common, ("train", str(root / "ref_1"), "replicated"))]),
        ]
        for world, jobs in steps:
            rows, error = _launch(world, jobs, args, args.timeout)
            if error:
                return {**out, "error": f"training on {world} rank(s): {error}"}
        keep = f"step_{S:09d}"

        def other_checkpoints(folder, names):  # copy a run with its checkpoint of step S alone
            if Path(folder).name != "checkpoints":
                return []
            return [n for n in names if n.startswith("step_") and n != keep]

        for src, dst in (("ref_n", "n_to_1"), ("ref_1", "one_to_n")):
            shutil.copytree(root / src, root / dst, ignore=other_checkpoints)
        resumed = [
            (1, [("resume", config, [f"max_steps={2 * S}"], ("resume", str(root / "n_to_1"), "replicated"))]),
            (N, [("resume", config, [f"max_steps={2 * S}"], ("resume", str(root / "one_to_n"), mode))]),
        ]
        for world, jobs in resumed:
            rows, error = _launch(world, jobs, args, args.timeout)
            if error:
                return {**out, "error": f"resuming on {world} rank(s): {error}"}
        return _compare(root, out, S, N)
    except Exception as e:  # the other parts' results are still written
        return {**out, "error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _compare(root: Path, out: dict, S: int, N: int) -> dict:
    """The resumed runs' losses of steps S+1..2S against the uninterrupted runs'."""
    ref_n, ref_1 = _train_losses(root / "ref_n"), _train_losses(root / "ref_1")
    later = list(range(S + 1, 2 * S + 1))
    spread = max(abs(ref_n[t] - ref_1[t]) for t in range(1, 2 * S + 1))
    for name, run, ref, what in (
        ("n_to_1", "n_to_1", ref_n, f"saved on {N} ranks, resumed in one process"),
        ("one_to_n", "one_to_n", ref_1, f"saved in one process, resumed on {N} ranks"),
    ):
        got = _train_losses(root / run)
        diffs = [abs(got[t] - ref[t]) for t in later]
        out[name] = {
            "what": what,
            "resumed_losses": [got[t] for t in later],
            "uninterrupted_losses": [ref[t] for t in later],
            "max_abs_diff": max(diffs),
            "mean_abs_diff": statistics.fmean(diffs),
        }
    out["uninterrupted_1_vs_n_max_abs_diff"] = spread
    out["uninterrupted_losses"] = {"n_ranks": [ref_n[t] for t in sorted(ref_n)],
                                   "one": [ref_1[t] for t in sorted(ref_1)]}  # fmt: skip
    return out


_PAR = None


def _rank_main(rank: int, world: int, port: int, jobs: list[tuple], args, out: str) -> None:
    """One rank of one launch: join the ranks (as under torchrun), run ``jobs``, rank 0 writes JSON."""
    global _PAR
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if args.device == "cpu":  # one core per rank, one rank or N: N ranks use N cores
        torch.set_num_threads(1)
    from pkmem.distributed import Parallel

    _PAR = Parallel.from_env(args.device)
    rows = []
    try:
        for kind, name, overrides, extra in jobs:
            if kind == "throughput":
                rows.append(_throughput(name, overrides, extra, args.device, args))
            elif kind == "read":
                rows.append(_read(name, overrides, extra, args.device, args))
            elif kind == "resume":
                rows.append(_train_run(name, overrides, extra, args.device, args))
            else:
                rows.append(_capacity(name, overrides, extra, args.device, args))
            gc.collect()  # the job's model and optimizer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    finally:
        _PAR.close()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, jobs: list[tuple], args, timeout_s: float) -> tuple[list[dict] | None, str | None]:
    """Run ``jobs`` on ``world`` fresh ranks; ``(rows, None)`` or ``(None, error)``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        ctx = mp.start_processes(
            _rank_main,
            args=(world, _free_port(), jobs, args, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    return None, f"did not finish within {timeout_s:.0f} s"
        except Exception as e:  # a rank raised (out of memory, ...): the others were stopped
            text = str(e).strip().splitlines()
            return None, next((line for line in reversed(text) if line.strip()), type(e).__name__)
        return json.loads(Path(out).read_text()), None


# ---- the parent ------------------------------------------------------------------------------------
def _environment(device: str, nproc: int) -> dict:
    env = {
        "git_commit": git_commit() or "",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device == "cuda":
        env.update(
            device=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    else:
        env["device"] = "cpu"
    return env


def _slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    name = env["device"].lower().replace("nvidia", "")
    return (re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu") + f"x{env['nproc']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="ranks to compare with one (default 2)")
    p.add_argument("--configs", help="comma-separated presets (cpu: tiny; cuda: enwik8-small,paper-12l-1024)")
    p.add_argument(
        "--set",
        help=f"comma-separated key=value overrides of every config (cpu: {CPU_OVERRIDES}; cuda: none)",
    )
    p.add_argument("--modes", default=",".join(MODES), help="value tables: replicated,columns,rows")
    p.add_argument("--warmup", type=int, help="steps before timing (cpu 2, cuda 5)")
    p.add_argument("--steps", type=int, help="steps per timing (cpu 3, cuda 10)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-iters", type=int, default=10, help="timings of one read (median)")
    p.add_argument(
        "--capacity-keys",
        help="comma-separated num_keys, ascending (cuda default: 2560,2816,3072,3584 on "
        "paper-12l-1024, whose table, gradient and Adam moments take 16 KiB a slot; cpu: none)",
    )
    p.add_argument(
        "--capacity-config", default=None, help="preset of the capacity runs (default: the last config)"
    )
    p.add_argument("--capacity-steps", type=int, default=3)
    p.add_argument(
        "--resume-steps",
        type=int,
        help="S: save at step S on N ranks / one, resume on the other to 2 S (cpu 3, cuda 100; 0: off)",
    )
    p.add_argument(
        "--resume-data", default="stdlib", help="data of the resume runs: stdlib or an enwik8 path"
    )
    p.add_argument(
        "--resume-config", default=None, help="preset of the resume runs (default: the first config)"
    )
    p.add_argument("--only", choices=["read", "throughput", "capacity", "resume"], help="run one part")
    p.add_argument("--timeout", type=float, default=540, help="seconds per launch of the ranks")
    p.add_argument("--out", help="JSON file (default benchmarks/results/distributed-<cpu|gpu>.json)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < args.nproc:
        p.error(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    configs = (args.configs or ("enwik8-small,paper-12l-1024" if cuda else "tiny")).split(",")
    overrides = [
        o for o in (args.set if args.set is not None else ("" if cuda else CPU_OVERRIDES)).split(",") if o
    ]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes {bad[0]!r} is not allowed: choose from {','.join(MODES)}")
    keys_text = (
        args.capacity_keys if args.capacity_keys is not None else ("2560,2816,3072,3584" if cuda else "")
    )
    capacity_keys = [int(k) for k in keys_text.split(",") if k.strip()]
    capacity_config = args.capacity_config or ("paper-12l-1024" if cuda else configs[-1])
    args.resume_steps = args.resume_steps if args.resume_steps is not None else (100 if cuda else 3)
    if args.resume_steps < 0 or (args.only == "resume" and args.resume_steps == 0):
        least = 1 if args.only == "resume" else 0
        p.error(f"--resume-steps={args.resume_steps} is not allowed: it must be an int >= {least}")
    if args.resume_steps and args.only in (None, "resume"):
        if args.nproc < 2:
            p.error(f"--nproc {args.nproc} is not allowed with the resume part: it compares 1 rank with >= 2")
        if args.resume_data != "stdlib" and not Path(args.resume_data).exists():
            p.error(
                f"--resume-data={args.resume_data!r} is not allowed: give 'stdlib' or an existing enwik8 file"
            )
    resume_config = args.resume_config or configs[0]

    env = _environment(args.device, args.nproc)
    result = {
        "env": env,
        "args": vars(args),
        "overrides": overrides,
        "read": [],
        "throughput": [],
        "capacity": [],
        "resume": None,
    }
    t_start = time.perf_counter()
    # throughput: one launch per world size, every config and mode in it
    for world in (1, args.nproc) if args.only in (None, "read", "throughput") else ():
        layouts = [m for m in modes if m != "replicated"] if world > 1 else ["whole"]
        jobs = [("read", c, overrides, m) for c in configs for m in layouts if args.only in (None, "read")]
        jobs += [
            ("throughput", c, overrides, m)
            for c in configs
            for m in (modes if world > 1 else ["replicated"])
            if args.only in (None, "throughput")
        ]
        rows, error = _launch(world, jobs, args, args.timeout)
        if error:
            result["throughput"].append({"world_size": world, "error": error})
            print(f"{world} rank(s): {error}", file=sys.stderr)
        else:
            result["read"] += [r for r in rows if r.get("part") == "read"]
            result["throughput"] += [r for r in rows if r.get("part") != "read"]
    one = {
        r["config"]: r["tokens_per_s"]
        for r in result["throughput"]
        if r.get("world_size") == 1 and "error" not in r
    }
    for r in result["throughput"]:
        if "error" not in r and r["config"] in one:
            r["speedup_vs_one_rank"] = r["tokens_per_s"] / one[r["config"]]
    # capacity: each attempt in fresh ranks, ascending, stop at the first failure per world size
    for world in (1, args.nproc) if capacity_keys and args.only in (None, "capacity") else ():
        for k in capacity_keys:
            rows, error = _launch(world, [("capacity", capacity_config, overrides, k)], args, args.timeout)
            row = rows[0] if rows else {"config": capacity_config, "world_size": world, "num_keys": k}
            row["trained"] = error is None
            if error:
                row["error"] = error
            result["capacity"].append(row)
            print(json.dumps(row), flush=True)
            if error:
                break
    if args.resume_steps and args.only in (None, "resume"):
        sharded = [m for m in modes if m != "replicated"]
        result["resume"] = _resume_part(
            resume_config, overrides, sharded[0] if sharded else "replicated", args
        )
        print(json.dumps(result["resume"])[:400], flush=True)
    result["wall_s"] = time.perf_counter() - t_start

    rows = [
        [
            r["config"],
            r["world_size"],
            r["mode"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r.get('speedup_vs_one_rank', float('nan')):.2f}",
            f"{r['value_bytes_per_rank'] / 2**20:,.1f}",
            f"{r['bytes_sent_per_step_total'] / 2**20:,.2f}",
        ]
        for r in result["throughput"]
        if "error" not in r
    ]
    head = ["config", "ranks", "value tables", "tokens/s", "vs 1 rank", "value MiB/rank", "MiB sent/step"]
    if rows:
        print(table(rows, head))
    reads = [
        [
            r["config"],
            r["world_size"],
            r["layout"],
            f"{r['read_ms']:.2f} ({r['read_ms_min']:.2f})",
            f"{r['local_gather_ms']:.2f} ({r['local_gather_ms_min']:.2f})",
            f"{r['bytes_sent_total'] / 2**20:.2f}",
        ]
        for r in result["read"]
    ]
    head = ["config", "ranks", "read of the table", "ms fwd+bwd (min)", "local gather ms (min)", "MiB sent"]
    if reads:
        print(table(reads, head))
    for r in result["capacity"]:
        state = "trained" if r["trained"] else f"failed: {r.get('error', '')[:80]}"
        print(f"capacity: {r['config']} num_keys={r['num_keys']} on {r['world_size']} rank(s): {state}")
    res = result["resume"]
    if res and "error" not in res:
        for key in ("n_to_1", "one_to_n"):
            r = res[key]
            print(
                f"resume: {r['what']}: steps {res['steps'] + 1}-{2 * res['steps']} differ from the "
                f"uninterrupted run's by at most {r['max_abs_diff']:.2e} (1 vs {res['world_size']} ranks "
                f"uninterrupted: {res['uninterrupted_1_vs_n_max_abs_diff']:.2e})"
            )
    elif res:
        print(f"resume: {res['error']}")
    part = f"-{args.only}" if args.only else ""
    out = args.out or f"benchmarks/results/distributed{part}-{_slug(env)}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
