"""A value table split across the ranks of a process group: :class:`ShardedProductKeyMemory`.

Each of the ``N`` ranks holds ``1/N`` of the table (``layout="columns"``: all rows, ``v_dim / N``
columns; ``layout="rows"``: ``num_slots / N`` rows, all columns); everything else in the layer
(query network, keys, BatchNorm, projections) is replicated. A read of the table is::

    columns (the default, as Memory Layers at Scale):
      all-gather (indices, weights) of every rank's tokens            (N*T, J) each
      local weighted gather of the own columns for all N*T tokens     (N*T, v/N)
      all-to-all: each rank gets its own tokens' N column blocks      (T, v)
    rows:
      all-gather (indices, weights); indices outside the own rows -> -1 (skipped)
      local weighted gather of the own rows for all N*T tokens         (N*T, v) partial sums
      reduce-scatter (an all-to-all and a sum): each rank gets its own tokens' sums  (T, v)

and the backward is the same communication reversed. Per rank and read, columns move
``(N-1)/N * T * v`` output floats each way, rows ``(N-1) * T * v`` (an ``N``-times larger reduce);
both move ``(N-1) * T * J`` index and weight pairs. docs/distributed.md has the arithmetic and the
measurements behind the default.

The gradient a shard receives is that of the mean loss over all ranks, as the replicated parameters
get from DDP: every rank's tokens read every shard, so the backward divides the output gradient by
``N`` before the local gather (and the weights' gradient is multiplied back). Row-sparse gradients
(``sparse_values=True``) and row-sparse optimizers work on the local shard as on a whole table.

Collectives are ``torch.distributed`` calls (``all_gather_into_tensor``, ``all_to_all_single``) that
run on NCCL and gloo; every rank must read the table the same number of times with the same number
of tokens (the training loop gives every rank an equal slice of each batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pkmem import ops
from pkmem.layer import ProductKeyMemory

__all__ = ["LAYOUTS", "ShardedProductKeyMemory", "sharded_read", "shard_bounds", "is_shard"]

LAYOUTS = ("columns", "rows")
_SHARD_ATTR = "_pkmem_shard"  # on a shard Parameter: (layout, full shape), to share it between memories


def is_shard(param: torch.Tensor) -> bool:
    """Whether ``param`` is the local part of a sharded value table."""
    return getattr(param, _SHARD_ATTR, None) is not None


def _all_gather_tensor(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s part of ``size`` items split evenly over ``world``."""
    step = size // world
    return rank * step, (rank + 1) * step


class _AllGatherRows(torch.autograd.Function):
    """``(T, J) -> (N*T, J)``: every rank's rows, in rank order. Backward: each rank's block of the
    gradient summed over ranks (an all-to-all and a sum), times ``scale``."""

    @staticmethod
    def forward(ctx, x, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        out = x.new_empty(world * x.shape[0], *x.shape[1:])
        _all_gather_tensor(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(recv, grad.contiguous(), group=ctx.group)
        g = recv.view(ctx.world, -1, *grad.shape[1:]).sum(0)
        return (g * ctx.scale if ctx.scale != 1 else g), None, None, None


class _ColumnsToTokens(torch.autograd.Function):
    """``(N*T, v/N)`` (this rank's columns of every rank's tokens) ``-> (T, v)`` (every column of
    this rank's tokens), by one all-to-all. Backward: the inverse all-to-all, times ``scale``."""

    @staticmethod
    def forward(ctx, part, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        recv = torch.empty_like(part, memory_format=torch.contiguous_format)
        dist.all_to_all_single(recv, part.contiguous(), group=group)
        NT, c = recv.shape
        return recv.view(world, NT // world, c).transpose(0, 1).reshape(NT // world, world * c)

    @staticmethod
    def backward(ctx, grad):
        T, v = grad.shape
        blocks = grad.reshape(T, ctx.world, v // ctx.world).transpose(0, 1).contiguous()
        send = blocks.view(ctx.world * T, v // ctx.world)
        if ctx.scale != 1:
            send = send * ctx.scale
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv, None, None, None


class _ReduceToTokens(torch.autograd.Function):
    """``(N*T, v)`` partial sums of every rank's tokens ``-> (T, v)``: this rank's tokens summed over
    ranks (a reduce-scatter, as an all-to-all and a sum: gloo has no reduce-scatter). Backward: an
    all-gather of the gradient, times ``scale``."""

    @staticmethod
    def forward(ctx, part, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        recv = torch.empty_like(part, memory_format=torch.contiguous_format)
        dist.all_to_all_single(recv, part.contiguous(), group=group)
        return recv.view(world, -1, part.shape[1]).sum(0)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.world * grad.shape[0], grad.shape[1])
        _all_gather_tensor(out, grad, ctx.group)
        return (out * ctx.scale if ctx.scale != 1 else out), None, None, None


def sharded_read(
    shard: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    layout: str,
    num_slots: int,
    group=None,
    sparse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The weighted gather ``(T, J), (T, J) -> (T, v_dim)`` float32 of a table of ``num_slots`` rows
    split across ``group`` (this rank holds ``shard``, see the module docstring). Every rank of the
    group calls it with the same ``T`` and ``J``."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    idx_all = indices.new_empty(world * indices.shape[0], indices.shape[1])
    _all_gather_tensor(idx_all, indices, group)
    # the gradient reaching the shard is divided by N (the mean over ranks' losses); the weights'
    # gradient goes back to its own rank, where that division is undone
    w_all = _AllGatherRows.apply(weights, group, world, float(world))
    if layout == "columns":
        part = ops.weighted_gather(shard, idx_all, w_all, sparse, backend)  # (N*T, v/N)
        return _ColumnsToTokens.apply(part, group, world, 1.0 / world)
    lo, hi = shard_bounds(num_slots, rank, world)
    local = torch.where((idx_all >= lo) & (idx_all < hi), idx_all - lo, -1)
    part = ops.weighted_gather(shard, local, w_all, sparse, backend)  # (N*T, v): this rank's rows
    return _ReduceToTokens.apply(part, group, world, 1.0 / world)


class ShardedProductKeyMemory(ProductKeyMemory):
    """A :class:`pkmem.ProductKeyMemory` whose value table is split over the ranks of ``group``.

    Takes ProductKeyMemory's arguments plus ``group`` (default: the whole world) and ``layout``
    (``"columns"``, the default, or ``"rows"``). It is built as the unsharded layer (the same random
    numbers: a run on N ranks starts from the parameters of the same run on one process), then keeps
    its own part of the table as ``values`` (``(num_slots, v_dim / N)`` or ``(num_slots / N, v_dim)``).
    ``values=`` another sharded memory's ``values`` shares that table. ``full_shape`` is the whole
    table's shape. Checkpoints: :mod:`pkmem.distributed.checkpoint` saves and loads the shards as
    parts of the whole table (any number of ranks, or one process with an unsharded model).
    """

    def __init__(self, dim: int, *args, group=None, layout: str = "columns", values=None, **kwargs):
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not allowed: layout must be one of {LAYOUTS}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "ShardedProductKeyMemory needs an initialised torch.distributed process group "
                "(start with torchrun, or call torch.distributed.init_process_group first)"
            )
        shared = values
        if shared is not None:
            info = getattr(shared, _SHARD_ATTR, None)
            if info is None or info[0] != layout:
                raise ValueError(
                    "values is not allowed: a sharded memory shares only another sharded memory's values "
                    f"with the same layout ({layout!r})"
                )
            values = nn.Parameter(torch.empty(info[1], device="meta"))  # passes the shape check
        super().__init__(dim, *args, values=values, **kwargs)
        self.group, self.layout = group, layout
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.full_shape = (self.num_slots, self.v_dim)
        size, name = (self.v_dim, "v_dim") if layout == "columns" else (self.num_slots, "num_keys**2")
        if size % self.world:
            raise ValueError(
                f"{name}={size} is not allowed with layout={layout!r} over {self.world} ranks: "
                f"{name} must be a multiple of the number of ranks"
            )
        if shared is not None:
            self.values = shared
            return
        lo, hi = shard_bounds(size, self.rank, self.world)
        full = self.values
        part = full.detach()[:, lo:hi] if layout == "columns" else full.detach()[lo:hi]
        self.values = nn.Parameter(part.clone(), requires_grad=full.requires_grad)
        setattr(self.values, _SHARD_ATTR, (layout, self.full_shape))
        del full, part

    def shard_slice(self, dim_size: int | None = None) -> tuple[int, slice]:
        """``(dim, slice)``: where this rank's shard sits in the whole table."""
        d = 1 if self.layout == "columns" else 0
        size = self.full_shape[d] if dim_size is None else dim_size
        lo, hi = shard_bounds(size, self.rank, self.world)
        return d, slice(lo, hi)

    def read_values(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sharded_read(
            self.values,
            indices,
            weights,
            self.layout,
            self.num_slots,
            self.group,
            self.sparse_values,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, sharded over {self.world} ranks by {self.layout} "
            f"(this rank: {tuple(self.values.shape)})"
        )
