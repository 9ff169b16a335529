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

import collections
import contextlib

import torch
import torch.distributed as dist
from torch import nn

from pkmem import ops
from pkmem.layer import ProductKeyMemory

__all__ = [
    "LAYOUTS",
    "ShardedProductKeyMemory",
    "sharded_read",
    "shard_bounds",
    "is_shard",
    "draw_part",
    "count_traffic",
]

LAYOUTS = ("columns", "rows")
_SHARD_ATTR = "_pkmem_shard"  # on a shard Parameter: (layout, full shape), to share it between memories


def is_shard(param: torch.Tensor) -> bool:
    """Whether ``param`` is the local part of a sharded value table."""
    return getattr(param, _SHARD_ATTR, None) is not None


_traffic: collections.Counter | None = None


@contextlib.contextmanager
def count_traffic():
    """Within it, the sharded reads add the bytes this rank sends to the other ranks to the yielded
    ``Counter``, by what they carry (``indices``, ``weights``, ``outputs`` forward; ``output_grads``,
    ``weight_grads`` backward): the messages' sizes as issued, whatever the backend makes of them."""
    global _traffic
    previous, _traffic = _traffic, collections.Counter()
    try:
        yield _traffic
    finally:
        _traffic = previous


def _count(what: str, nbytes: int) -> None:
    if _traffic is not None:
        _traffic[what] += int(nbytes)


def _all_gather_tensor(out: torch.Tensor, x: torch.Tensor, group, what: str) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    world = dist.get_world_size(group)
    _count(what, (world - 1) * x.numel() * x.element_size())  # its own rows, to every other rank
    gather(out, x.contiguous(), group=group)


def _all_to_all(recv: torch.Tensor, send: torch.Tensor, group, world: int, what: str) -> None:
    _count(what, send.numel() * send.element_size() * (world - 1) // world)  # all but its own block
    dist.all_to_all_single(recv, send, group=group)


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
        _all_gather_tensor(out, x, group, "weights")
        return out

    @staticmethod
    def backward(ctx, grad):
        recv = torch.empty_like(grad, memory_format=torch.contiguous_format)
        _all_to_all(recv, grad.contiguous(), ctx.group, ctx.world, "weight_grads")
        g = recv.view(ctx.world, -1, *grad.shape[1:]).sum(0)
        return (g * ctx.scale if ctx.scale != 1 else g), None, None, None


class _ColumnsToTokens(torch.autograd.Function):
    """``(N*T, v/N)`` (this rank's columns of every rank's tokens) ``-> (T, v)`` (every column of
    this rank's tokens), by one all-to-all. Backward: the inverse all-to-all, times ``scale``."""

    @staticmethod
    def forward(ctx, part, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        recv = torch.empty_like(part, memory_format=torch.contiguous_format)
        _all_to_all(recv, part.contiguous(), group, world, "outputs")
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
        _all_to_all(recv, send, ctx.group, ctx.world, "output_grads")
        return recv, None, None, None


class _ReduceToTokens(torch.autograd.Function):
    """``(N*T, v)`` partial sums of every rank's tokens ``-> (T, v)``: this rank's tokens summed over
    ranks (a reduce-scatter, as an all-to-all and a sum: gloo has no reduce-scatter). Backward: an
    all-gather of the gradient, times ``scale``."""

    @staticmethod
    def forward(ctx, part, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        recv = torch.empty_like(part, memory_format=torch.contiguous_format)
        _all_to_all(recv, part.contiguous(), group, world, "outputs")
        return recv.view(world, -1, part.shape[1]).sum(0)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.world * grad.shape[0], grad.shape[1])
        _all_gather_tensor(out, grad, ctx.group, "output_grads")
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
    small = indices.to(torch.int32) if num_slots < 2**31 else indices  # half the bytes to send
    idx_all = small.new_empty(world * indices.shape[0], indices.shape[1])
    _all_gather_tensor(idx_all, small, group, "indices")
    idx_all = idx_all.to(indices.dtype)
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


def draw_part(shape: tuple[int, int], std: float, dim: int, part: slice, chunk_elements: int = 1 << 24):
    """``torch.empty(shape).normal_(0, std)[part along dim]`` without the whole tensor: the normal
    numbers are drawn in row blocks of a multiple of 16 elements (the last at least 16) and only the
    part is kept. torch's CPU generator then gives the same numbers as one draw of the whole tensor
    (its float32 normal fills and transforms 16 numbers at a time), and ends in the same state: the
    random numbers drawn after it are those of one process too. Float32, on the CPU."""
    rows, cols = shape
    keep_rows = range(rows)[part] if dim == 0 else range(rows)
    out = (
        torch.empty(len(keep_rows), cols, dtype=torch.float32)
        if dim == 0
        else torch.empty(rows, len(range(cols)[part]), dtype=torch.float32)
    )
    step = max(16, (chunk_elements // max(cols, 1)) // 16 * 16)  # rows per block: step * cols % 16 == 0
    if rows * cols <= 16 or step >= rows:
        whole = torch.empty(rows, cols, dtype=torch.float32).normal_(0, std)
        out.copy_(whole[part] if dim == 0 else whole[:, part])
        return out
    buf = torch.empty(2 * step, cols, dtype=torch.float32)
    start = 0
    while start < rows:
        stop = min(rows, start + step)
        if 0 < (rows - stop) * cols < 16:  # a tail under 16 numbers joins this block
            stop = rows
        block = buf[: stop - start]
        block.normal_(0, std)
        if dim == 1:
            out[start:stop] = block[:, part]
        else:
            lo, hi = max(start, keep_rows.start), min(stop, keep_rows.stop)
            if lo < hi:
                out[lo - keep_rows.start : hi - keep_rows.start] = block[lo - start : hi - start]
        start = stop
    return out


class ShardedProductKeyMemory(ProductKeyMemory):
    """A :class:`pkmem.ProductKeyMemory` whose value table is split over the ranks of ``group``.

    Takes ProductKeyMemory's arguments plus ``group`` (default: the whole world) and ``layout``
    (``"columns"``, the default, or ``"rows"``). Its ``values`` is its part of the table
    (``(num_slots, v_dim / N)`` or ``(num_slots / N, v_dim)``), with the numbers the unsharded
    layer's table would get, and every other parameter is drawn as the unsharded layer draws it: a
    run on N ranks starts from the parameters of the same run on one process. The whole table is
    never built (:func:`draw_part` draws it block by block).
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
        self.group, self.layout = group, layout  # plain attributes: _new_values reads them in super()
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        shared = values
        if shared is not None:
            info = getattr(shared, _SHARD_ATTR, None)
            if info is None or info[0] != layout:
                raise ValueError(
                    "values is not allowed: a sharded memory shares only another sharded memory's values "
                    f"with the same layout ({layout!r})"
                )
            values = nn.Parameter(
                torch.empty(info[1], device="meta", dtype=shared.dtype)
            )  # passes the checks
        super().__init__(dim, *args, values=values, **kwargs)
        self.full_shape = (self.num_slots, self.v_dim)
        self.shard_slice()  # checks the split
        if shared is not None:
            self.values = shared

    def _new_values(self, zero_init: bool, dtype: torch.dtype) -> nn.Parameter:
        """This rank's part of a new table of ``dtype``: the numbers the whole table would get
        (:func:`draw_part`, in float32, then rounded)."""
        full = (self.num_slots, self.v_dim)
        d, part = self.shard_slice(full)
        if zero_init:
            shape = (full[0], part.stop - part.start) if d == 1 else (part.stop - part.start, full[1])
            table = torch.zeros(shape)
        else:
            table = draw_part(full, self.v_dim**-0.5, d, part)
        values = nn.Parameter(table.to(dtype))
        setattr(values, _SHARD_ATTR, (self.layout, full))
        return values

    def shard_slice(self, full_shape: tuple[int, int] | None = None) -> tuple[int, slice]:
        """``(dim, slice)``: where this rank's shard sits in the whole table."""
        d = 1 if self.layout == "columns" else 0
        size = (self.full_shape if full_shape is None else full_shape)[d]
        if size % self.world:
            name = "v_dim" if d == 1 else "num_keys**2"
            raise ValueError(
                f"{name}={size} is not allowed with layout={self.layout!r} over {self.world} ranks: "
                f"{name} must be a multiple of the number of ranks"
            )
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
