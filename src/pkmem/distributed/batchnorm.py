"""The query network's BatchNorm over the global batch: :class:`SyncMaskedBatchNorm`.

A memory's query BatchNorm normalises with the mean and variance of the batch. With the batch split
over ``N`` ranks, each rank alone would see ``1/N`` of it: different statistics per rank, a training
that differs from one process at the global batch, and running statistics that drift apart between
ranks. :class:`SyncMaskedBatchNorm` computes them over the real (unmasked) rows of every rank, as
``torch.nn.SyncBatchNorm`` does for plain BatchNorms: two all-reduces of ``C`` floats forward (the
sums, then the squared deviations from the global mean: a two-pass variance) and their two
all-reduces backward (the gradient of a sum over ranks is the sum over ranks of the gradients). In eval
the running statistics are used, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pkmem.ops.reference import LOW_PRECISION, acc_dtype, update_running_stats

__all__ = ["SyncMaskedBatchNorm", "sync_batch_norms"]


class SyncMaskedBatchNorm(nn.BatchNorm1d):
    """A ``BatchNorm1d`` of a memory's query network whose training statistics are those of the
    rows of all ranks of ``group`` (same parameters, buffers and state dict as ``BatchNorm1d``)."""

    def __init__(self, num_features: int, *args, group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.group = group

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm1d, group=None) -> SyncMaskedBatchNorm:
        """A copy of ``bn`` (its parameters and buffers, the same tensors) that synchronises."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, group=group)
        new.weight, new.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    def masked_batch_norm(
        self, x: torch.Tensor, mask: torch.Tensor | None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """BatchNorm of ``x + shift`` (T, C) with the statistics of the real rows of every rank
        (:func:`pkmem.layer.masked_batch_norm` calls it in training); updates the running statistics."""
        w, b = self.weight, self.bias
        dt = acc_dtype(x, *[t for t in (w, b, shift) if t is not None])
        with torch.autocast(device_type=x.device.type, enabled=False):
            xs = x.to(dt) if shift is None else x.to(dt) + shift.to(dt)
            m = None if mask is None else mask.reshape(-1, 1)
            n_local = xs.new_full((1,), xs.shape[0]) if m is None else m.sum().to(dt).reshape(1)
            total = _all_reduce_sum(torch.cat([_where(m, xs).sum(0), n_local]), group=self.group)
            n = total[-1].detach()
            mean = total[:-1] / n.clamp(min=1)
            d = xs - mean
            var = _all_reduce_sum(_where(m, d).pow(2).sum(0), group=self.group) / n.clamp(min=1)
            y = d * torch.rsqrt(var + self.eps)
            y = y if w is None else y * w.to(dt)
            y = y if b is None else y + b.to(dt)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_((n > 0).to(self.num_batches_tracked.dtype))
                momentum = self.momentum
                if momentum is None:  # cumulative average
                    momentum = 1.0 / self.num_batches_tracked.clamp(min=1)
                update_running_stats(
                    self.running_mean, self.running_var, mean.detach(), var.detach(), n, momentum
                )
        return y.to(x.dtype) if x.dtype in LOW_PRECISION else y


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` summed over the ranks of ``group``, differentiably (every rank's loss reaches ``x``)."""
    return _AllReduceSum.apply(x, group)


def _where(m: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # where, not a product: NaN / inf in padded rows must not reach the statistics
    return x if m is None else torch.where(m, x, 0.0)


def sync_batch_norms(model: nn.Module, group=None) -> int:
    """Replace the BatchNorm of every memory's query network in ``model`` by a
    :class:`SyncMaskedBatchNorm` over ``group`` (the same parameters and buffers); returns how many."""
    from pkmem.layer import QueryNetwork

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sync_batch_norms needs an initialised torch.distributed process group")
    count = 0
    for module in model.modules():
        if isinstance(module, QueryNetwork) and module.norms is not None:
            for i, bn in enumerate(module.norms):
                if type(bn) is nn.BatchNorm1d:
                    module.norms[i] = SyncMaskedBatchNorm.from_batch_norm(bn, group)
                    count += 1
    return count
