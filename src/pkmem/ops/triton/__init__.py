"""Triton kernels of pkmem (imported lazily by :mod:`pkmem.ops.dispatch`: importing it imports triton).

- :mod:`.search`: fused exact product-key search, forward and backward;
- :mod:`.gather`: weighted gather of value rows, forward and deterministic backward;
- :mod:`.norm`: BatchNorm over the (masked) rows, forward and backward.
"""

from pkmem.ops.triton._common import INTERPRET, float32_precision
from pkmem.ops.triton.gather import weighted_gather
from pkmem.ops.triton.norm import batch_norm, normalize
from pkmem.ops.triton.search import lookup, prepare_search, product_lookup, product_topk

__all__ = [
    "INTERPRET",
    "batch_norm",
    "float32_precision",
    "lookup",
    "normalize",
    "prepare_search",
    "product_lookup",
    "product_topk",
    "weighted_gather",
]
