"""pkmem: product-key memory layers for PyTorch (Lample et al. 2019).

The names below are imported on first use (PEP 562), so that ``import pkmem.cli`` (the ``pkmem``
command's ``--help``) and ``pkmem.__version__`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    "ProductKeyMemory": "pkmem.layer",
    "UsageStats": "pkmem.metrics",
    "UsageTracker": "pkmem.metrics",
    "track_usage": "pkmem.metrics",
    "MultiOptimizer": "pkmem.optim",
    "clip_grad_norm": "pkmem.optim",
    "make_optimizer": "pkmem.optim",
    "param_groups": "pkmem.optim",
    "value_parameters": "pkmem.optim",
}
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

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pkmem.layer import ProductKeyMemory
    from pkmem.metrics import UsageStats, UsageTracker, track_usage
    from pkmem.optim import MultiOptimizer, clip_grad_norm, make_optimizer, param_groups, value_parameters


_SUBMODULES = ("layer", "metrics", "optim", "ops", "config", "models", "train", "compat", "hf", "cli")


def __getattr__(name: str):
    if name in _SUBMODULES:  # pkmem.optim.make_optimizer after a plain ``import pkmem``
        return importlib.import_module(f"pkmem.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'pkmem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
