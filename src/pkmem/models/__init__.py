"""Language models that use product-key memories."""

from pkmem.models.transformer import (
    MakeMemory,
    MemoryTransformer,
    MemoryTransformerConfig,
    default_memory_layers,
)

__all__ = ["MakeMemory", "MemoryTransformer", "MemoryTransformerConfig", "default_memory_layers"]
