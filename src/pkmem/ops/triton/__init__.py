"""Triton kernels of pkmem (imported lazily by :mod:`pkmem.ops.dispatch`: importing it imports triton).

- :mod:`.search`: fused exact product-key search, forward and backward;
- :mod:`.gather`: weighted gather of value rows, forward and deterministic backward;
- :mod:`.norm`: BatchNorm over the (masked) rows, forward and backward.
"""

from pkmem.ops.triton._common import INTERPRET
from pkmem.ops.triton.gather import weighted_gather
from pkmem.ops.triton.norm import batch_norm
from pkmem.ops.triton.search import product_lookup, product_topk

__all__ = ["INTERPRET", "batch_norm", "product_lookup", "product_topk", "weighted_gather"]
