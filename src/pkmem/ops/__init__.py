"""Pure functions on tensors: the product-key search, the weighted value gather, the BatchNorm.

``pkmem.ops.reference`` holds the PyTorch versions; the functions exported here dispatch to the
fastest implementation available (``backend="auto" | "torch" | "triton"``).
"""

from pkmem.ops.dispatch import BACKENDS, batch_norm, flat_topk, product_lookup, product_topk, weighted_gather

__all__ = ["BACKENDS", "batch_norm", "flat_topk", "product_lookup", "product_topk", "weighted_gather"]
