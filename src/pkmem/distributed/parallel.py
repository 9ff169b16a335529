"""What a training run needs to know about its ranks: :class:`Parallel`.

``torchrun --nproc-per-node N -m pkmem train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :meth:`Parallel.from_env` joins them in a
process group (NCCL on CUDA, gloo on the CPU; plus a gloo group for the host-side agreements) and
returns the run's view of it. Without those variables (or with ``WORLD_SIZE=1``) it is one process
and every method is the identity, so the training loop calls them unconditionally.

The data-parallel contract: a global batch is a function of ``(seed, step, micro-batch)``; rank
``r`` of ``N`` trains on its rows ``[r*B/N, (r+1)*B/N)``. Replicated parameters are averaged by DDP;
the BatchNorm statistics and the sharded value tables (:mod:`pkmem.distributed.values`) are
computed over the whole batch; so N ranks take the optimizer steps one process takes at the global
batch, up to float rounding.

Failures: a set-up step runs on every rank inside :meth:`Parallel.agree`; if it raises anywhere,
every rank raises (the failing rank its own error, the others a :class:`DistributedError` naming
the rank and its message) instead of waiting in the next collective. A rank that dies without a
Python error is noticed by the others when a collective times out (``PKMEM_DIST_TIMEOUT_S``,
default 1800 s); torchrun also stops every rank when one exits with an error.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pkmem._util import DistributedError

__all__ = ["Parallel", "DistributedError", "timeout_s"]

T = TypeVar("T")
TIMEOUT_ENV = "PKMEM_DIST_TIMEOUT_S"


def timeout_s() -> float:
    """The collectives' timeout in seconds: ``PKMEM_DIST_TIMEOUT_S``, default 1800."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"{TIMEOUT_ENV}={raw!r} is not allowed: {TIMEOUT_ENV} must be a number of seconds > 0"
        )
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not allowed: {name} must be an integer (torchrun sets it)"
        ) from None


class Parallel:
    """The ranks of a run (one process by default): see the module docstring."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, group=None, control=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.group, self.control = group, control  # the run's process group; gloo, for host objects
        self._meshes: dict = {}
        self._owns_group = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto") -> Parallel:
        """One process, or the rank torchrun started (see the module docstring); ``device``: the
        run's ``train.device`` (``cuda`` / ``auto`` with GPUs: NCCL, one GPU per local rank)."""
        world = _env_int("WORLD_SIZE")
        if world is None or world <= 1:
            return cls()
        rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
        if rank is None or not 0 <= rank < world:
            raise ValueError(
                f"RANK={rank!r} is not allowed with WORLD_SIZE={world}: it must be in [0, {world})"
            )
        local_rank = rank if local_rank is None else local_rank
        owns = not dist.is_initialized()
        if not owns:  # already joined (the caller's own process group): use it
            if dist.get_world_size() != world or dist.get_rank() != rank:
                raise ValueError(
                    f"the initialised process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the environment says RANK={rank}, WORLD_SIZE={world}"
                )
        else:
            cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
            timeout = timedelta(seconds=timeout_s())
            kwargs = (
                {"backend": "nccl", "device_id": _cuda_device(local_rank)} if cuda else {"backend": "gloo"}
            )
            try:
                dist.init_process_group(rank=rank, world_size=world, timeout=timeout, **kwargs)
            except Exception as e:  # a rendezvous that timed out, a port in use, ...
                raise DistributedError(
                    f"rank {rank} of {world} could not join the process group at "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                    f"{timeout.total_seconds():.0f} s ({type(e).__name__}: {e})"
                ) from e
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s()))
        par = cls(rank, world, local_rank, dist.group.WORLD, control)
        par._owns_group = owns
        return par

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the run's files."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The run's device for ``train.device``: ``cuda:LOCAL_RANK`` for CUDA ranks (also made the
        current device)."""
        from pkmem.train.evaluate import resolve_device

        device = resolve_device(name)
        if self.distributed and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def mesh(self, device_type: str):
        """A one-dimensional DeviceMesh over the run's ranks (for DTensor views of shards)."""
        from torch.distributed.device_mesh import DeviceMesh

        if device_type not in self._meshes:  # CPU tensors on the gloo group, device tensors on the run's
            group = self.control if device_type == "cpu" else self.group
            self._meshes[device_type] = DeviceMesh.from_group(group, device_type)
        return self._meshes[device_type]

    def __repr__(self) -> str:
        return f"Parallel(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # ---- agreement between ranks ---------------------------------------------------------------
    def _gather_objects(self, obj, what: str) -> list:
        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.control)
        except Exception as e:  # gloo: a rank that died or hangs makes the others time out here
            raise DistributedError(
                f"rank {self.rank}: the other ranks did not reach {what} within {timeout_s():.0f} s "
                f"(one may have crashed: see its output) ({type(e).__name__}: {e})"
            ) from e
        return out

    def agree(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it raised on any rank, raise on every rank (see the module
        docstring). ``what`` names the step in the error."""
        if not self.distributed:
            return fn()
        result, error, message = None, None, None
        try:
            result = fn()
        except BaseException as e:
            error, message = e, f"{type(e).__name__}: {e}"
        failed = [(r, m) for r, m in enumerate(self._gather_objects(message, what)) if m is not None]
        if error is not None:
            raise error
        if failed:
            text = "; ".join(f"rank {r} failed: {m}" for r, m in failed)
            raise DistributedError(f"{what}: {text}")
        return result

    def on_main(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; its result (or its error) on every rank."""
        if not self.distributed:
            return fn()
        result = self.agree(what, fn if self.is_main else lambda: None)
        box = [result]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def main_first(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the other ranks (rank 0 fills a cache the others read)."""
        if not self.distributed:
            return fn()
        first = self.agree(what, fn if self.is_main else lambda: None)
        rest = self.agree(what, (lambda: first) if self.is_main else fn)
        return rest

    def barrier(self, what: str) -> None:
        self.agree(what, lambda: None)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag or'ed over the ranks (a host-side all-reduce on the gloo group: no device sync)."""
        if not self.distributed:
            return flags
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(bool(v) for v in t.tolist())

    def gather_objects(self, obj, what: str = "a gather") -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
        return self._gather_objects(obj, what) if self.distributed else [obj]

    # ---- training ----------------------------------------------------------------------------------
    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` rows."""
        if not self.distributed:
            return slice(None)
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} is not allowed with {self.world_size} ranks: batch_size is the "
                f"global batch, split evenly over the ranks, so it must be a multiple of {self.world_size}"
            )
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def windows(self, starts):
        """``(this rank's windows, which of them count)``: ``starts`` (evaluation windows) split in
        equal contiguous parts, the last padded with copies of the first window that do not count
        (every rank makes the same forward calls: the sharded tables need it)."""
        import numpy as np

        n = -(-len(starts) // self.world_size)
        padded = np.concatenate([starts, np.repeat(starts[:1], n * self.world_size - len(starts))])
        real = np.arange(n * self.world_size) < len(starts)
        mine = slice(self.rank * n, (self.rank + 1) * n)
        return padded[mine], real[mine]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor; ``t`` itself for one process)."""
        if not self.distributed:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks."""
        return self.sum(t) / self.world_size if self.distributed else t

    def seed_rank(self, seed: int) -> None:
        """After the model is built (the same on every rank): rank r > 0 draws its own random
        numbers (dropout) from ``(seed, r)``; rank 0 keeps the one-process stream."""
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank) % 2**63)

    def make_memory(self, options: dict, layout: str = "columns"):
        """A ``make_memory`` for :class:`pkmem.models.MemoryTransformer`: memories whose value tables
        are sharded over the ranks (:class:`~pkmem.distributed.values.ShardedProductKeyMemory`)."""
        from pkmem.distributed.values import ShardedProductKeyMemory

        def make(layer: int, dim: int, values):
            return ShardedProductKeyMemory(dim, **options, values=values, group=self.group, layout=layout)

        return make

    def memory_maker(self, cfg, make_memory=None):
        """The ``make_memory`` of a run of ``cfg``: ``make_memory`` itself, or on several ranks with
        ``train.shard_values`` the sharded memories of :meth:`make_memory`."""
        if not (self.distributed and cfg.train.shard_values):
            return make_memory
        if make_memory is not None:
            raise ValueError(
                "shard_values=True is not allowed with a custom make_memory: only pkmem's own memories "
                "shard their values (leave make_memory out, or set shard_values=false)"
            )
        return self.make_memory(dict(cfg.model.memory), cfg.train.shard_layout)

    def check_model(self, model: nn.Module, shard_values: bool, value_optimizer: str = "adamw") -> None:
        """On several ranks, a replicated value table must have dense gradients in ``.grad``, which DDP
        averages; row-sparse gradients (``sparse_values``, the row optimizers) need the table sharded:
        each rank then computes and updates its own part from every rank's tokens."""
        if not self.distributed or shard_values:
            return
        if value_optimizer in ("lazy_adam", "exact_adam"):
            raise ValueError(
                f"value_optimizer={value_optimizer!r} is not allowed on {self.world_size} ranks with "
                "replicated value tables (its row gradients bypass DDP's averaging): set shard_values=true "
                "(each rank keeps and updates its part of the table), or value_optimizer=adamw"
            )
        sparse = [n for n, m in model.named_modules() if getattr(m, "sparse_values", False)]
        if sparse:
            raise ValueError(
                f"memory.sparse_values=True is not allowed on {self.world_size} ranks with replicated value "
                f"tables ({sparse[0]}): set shard_values=true (each rank keeps and updates its part of the "
                "table) or sparse_values=false"
            )

    def describe(self, model: nn.Module) -> str:
        """``""`` for one process, else the ranks and how the value tables are held (for the log)."""
        if not self.distributed:
            return ""
        from pkmem.distributed.values import ShardedProductKeyMemory

        shards = [m for m in model.modules() if isinstance(m, ShardedProductKeyMemory)]
        held = (
            f"value tables sharded by {shards[0].layout} ({tuple(shards[0].values.shape)} per rank)"
            if shards
            else "value tables replicated"
        )
        return f"; {self.world_size} ranks (data parallel, {held})"

    def close(self) -> None:
        """Leave the process group if :meth:`from_env` created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that trains ``model`` on the ranks: ``model`` itself for one process, else a
        DDP wrapper (sharded value tables left to their memories; query BatchNorms synchronised)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        from pkmem.distributed.batchnorm import sync_batch_norms
        from pkmem.distributed.values import ShardedProductKeyMemory

        sync_batch_norms(model, self.group)
        shards = {id(m.values) for m in model.modules() if isinstance(m, ShardedProductKeyMemory)}
        ignored = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shards]
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        # the BatchNorm buffers are equal on every rank (global statistics): no broadcast per forward
        params = inspect.signature(DDP).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )
        return DDP(model, device_ids=ids, **no_sync)

    def accumulating(self, forward: nn.Module, accumulate: bool):
        """No gradient all-reduce for a micro-batch that is not the step's last (DDP ``no_sync``)."""
        if accumulate and hasattr(forward, "no_sync"):
            return forward.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float, value_max_norm: float | None = None):
        """:func:`pkmem.optim.clip_grad_norm` where a sharded value table's norm is taken over all
        its shards (the replicated gradients are already equal on every rank, by DDP's all-reduce);
        returns ``(rest_norm, value_norm)``, 0-dim tensors, no host sync."""
        from pkmem.distributed.values import is_shard
        from pkmem.optim import (
            _check_number,
            _grad_norm,
            _row_grads,
            _scale,
            clip_grad_norm,
            value_parameters,
        )

        values = value_parameters(model)
        if not self.distributed or not any(is_shard(p) for p in values):
            return clip_grad_norm(model, max_norm, value_max_norm)
        value_max_norm = max_norm if value_max_norm is None else value_max_norm
        _check_number("value_max_norm", value_max_norm, positive=True)
        value_ids = {id(p) for p in values}
        rest_norm, _ = clip_grad_norm([p for p in model.parameters() if id(p) not in value_ids], max_norm)
        device = next(model.parameters()).device
        parts = [p for p in values if is_shard(p)]
        whole = [p for p in values if not is_shard(p)]
        part_grads, part_rows = [p.grad for p in parts if p.grad is not None], _row_grads(parts)
        whole_grads, whole_rows = [p.grad for p in whole if p.grad is not None], _row_grads(whole)
        sq = self.sum(_grad_norm(part_grads, device, part_rows).float().square())
        value_norm = (sq + _grad_norm(whole_grads, device, whole_rows).float().square()).sqrt()
        _scale(part_grads + whole_grads, value_norm, value_max_norm, part_rows + whole_rows)
        return rest_norm, value_norm


def _cuda_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError("device=cuda is not available: this machine has no CUDA GPU (use --device cpu)")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} is not allowed: this machine has {torch.cuda.device_count()} GPUs "
            "(start at most one rank per GPU: torchrun --nproc-per-node <= the number of GPUs)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device
