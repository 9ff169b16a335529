"""Drop-in APIs of other product-key memory libraries, on pkmem's ops.

``from pkmem.compat import PKM`` replaces ``from product_key_memory import PKM`` (lucidrains'
product-key-memory 0.3.0): see ``docs/compat.md``.
"""

from pkmem.compat.lucidrains import PKM, fetch_optimizer_parameters, fetch_pkm_value_parameters

ProductKeyMemory = PKM  # as product_key_memory/__init__.py (not pkmem.ProductKeyMemory)

__all__ = ["PKM", "ProductKeyMemory", "fetch_optimizer_parameters", "fetch_pkm_value_parameters"]
