"""Synthetic tasks for measuring what a model with memories can store (no download, all seeded)."""

from pkmem.tasks.facts import (
    HELDOUT_TEMPLATE,
    SEPARATOR,
    TRAIN_TEMPLATES,
    FactSet,
    Recall,
    evaluate_recall,
    make_facts,
)

__all__ = [
    "FactSet",
    "HELDOUT_TEMPLATE",
    "Recall",
    "SEPARATOR",
    "TRAIN_TEMPLATES",
    "evaluate_recall",
    "make_facts",
]
