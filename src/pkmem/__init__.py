"""pkmem: product-key memory layers for PyTorch (Lample et al. 2019)."""

from pkmem.layer import ProductKeyMemory

__version__ = "0.1.0"
__all__ = ["ProductKeyMemory", "__version__"]
