"""Training on several GPUs (or CPU processes) with ``torch.distributed``: data parallel (DDP), the
query BatchNorm over the global batch, value tables sharded across the ranks, and checkpoints that
move between world sizes (``torch.distributed.checkpoint``).

``torchrun --nproc-per-node N -m pkmem train ...`` uses all of it (docs/distributed.md); in Python:

- :class:`Parallel`: the ranks of a run (``Parallel.from_env()`` under torchrun), the DDP wrap,
  per-rank batch rows, agreement on errors;
- :class:`ShardedProductKeyMemory`: a ``ProductKeyMemory`` whose value table is split over the ranks;
- :class:`SyncMaskedBatchNorm` / :func:`sync_batch_norms`: the query BatchNorm over all ranks' rows;
- :mod:`pkmem.distributed.checkpoint`: DCP checkpoints that load on any number of ranks or one process.
"""

from pkmem.distributed.batchnorm import SyncMaskedBatchNorm, sync_batch_norms
from pkmem.distributed.parallel import DistributedError, Parallel
from pkmem.distributed.values import LAYOUTS, ShardedProductKeyMemory, sharded_read

__all__ = [
    "LAYOUTS",
    "DistributedError",
    "Parallel",
    "ShardedProductKeyMemory",
    "SyncMaskedBatchNorm",
    "sharded_read",
    "sync_batch_norms",
]
