"""Product-key memories in Hugging Face ``transformers`` models, their training, and sparse memory
finetuning (see docs/hf.md).

Importing ``pkmem`` does not import this package; this package imports ``transformers`` only where
it needs it (:func:`from_pretrained`).
"""

from pkmem.hf.model import MODES, MemoryMLP, add_memory, from_pretrained, memory_modules
from pkmem.hf.sparse import SlotCounts, SparseMemoryFinetuner, slot_counts, tfidf_scores, top_slots
from pkmem.hf.train import causal_lm_loss, finetune, tokenize, window_batch

__all__ = [
    "MODES",
    "MemoryMLP",
    "SlotCounts",
    "SparseMemoryFinetuner",
    "add_memory",
    "causal_lm_loss",
    "finetune",
    "from_pretrained",
    "memory_modules",
    "slot_counts",
    "tfidf_scores",
    "tokenize",
    "top_slots",
    "window_batch",
]
