"""pkmem: product-key memory layers for PyTorch (Lample et al. 2019)."""

from pkmem.layer import ProductKeyMemory
from pkmem.metrics import UsageStats, UsageTracker, track_usage
from pkmem.optim import MultiOptimizer, clip_grad_norm, make_optimizer, param_groups, value_parameters

__version__ = "0.1.0"
__all__ = [
    "MultiOptimizer",
    "ProductKeyMemory",
    "UsageStats",
    "UsageTracker",
    "__version__",
    "clip_grad_norm",
    "make_optimizer",
    "param_groups",
    "track_usage",
    "value_parameters",
]
