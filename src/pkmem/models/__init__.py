"""Language models that use product-key memories."""

from pkmem.models.transformer import MemoryTransformer, MemoryTransformerConfig, default_memory_layers

__all__ = ["MemoryTransformer", "MemoryTransformerConfig", "default_memory_layers"]
