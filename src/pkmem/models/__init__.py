"""Language models that use product-key memories."""

from pkmem.models.transformer import (
    KVCache,
    MakeMemory,
    MemoryTransformer,
    MemoryTransformerConfig,
    default_memory_layers,
)

__all__ = ["KVCache", "MakeMemory", "MemoryTransformer", "MemoryTransformerConfig", "default_memory_layers"]
