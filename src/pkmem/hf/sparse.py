"""Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning").

To teach a model with memories new facts without forgetting, train only the memory slots that the
new data reads much more than the background (pretraining-like) data does:

1. :func:`slot_counts` runs the model on background batches and counts, for every slot of every
   value table, how many batches read it (its document frequency ``df(i)``, out of ``N`` batches).
2. For each new batch, :func:`top_slots` ranks the slots by TF-IDF,
   ``tf(i) * idf(i)`` with ``tf(i) = c(i) / sum_j c(j)`` (``c(i)``: how often the batch read slot
   ``i``, over all tokens and heads) and ``idf(i) = log(N / (1 + df(i)))``, and keeps the top ``t``.
3. :class:`SparseMemoryFinetuner` updates only those value rows; every other parameter is frozen
   (SGD by default: the paper found it better than AdamW here).

This works for any model whose memories are :class:`~pkmem.ProductKeyMemory` layers (a
``transformers`` model after :func:`pkmem.hf.add_memory`, or a :class:`pkmem.models.MemoryTransformer`
with ``loss_fn``/``forward_fn`` given). Memories that share one value table are ranked together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from pkmem._util import atomic_write_bytes
from pkmem.hf.train import causal_lm_loss, move_batch
from pkmem.layer import ProductKeyMemory
from pkmem.metrics import UsageStats, UsageTracker

__all__ = ["SlotCounts", "slot_counts", "tfidf_scores", "top_slots", "SparseMemoryFinetuner", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


def _value_tables(model: nn.Module) -> dict[str, tuple[nn.Parameter, list[str]]]:
    """``{name: (value table, names of its memories)}``; a table is named after its first memory."""
    if not isinstance(model, nn.Module):
        raise _bad("model", type(model).__name__, "an nn.Module holding pkmem.ProductKeyMemory layers")
    tables: dict[int, tuple[str, nn.Parameter, list[str]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ProductKeyMemory):
            entry = tables.setdefault(id(m.values), (name or "memory", m.values, []))
            entry[2].append(name or "memory")
    if not tables:
        raise ValueError(f"model={type(model).__name__} holds no pkmem.ProductKeyMemory: nothing to count")
    return {name: (table, members) for name, table, members in tables.values()}


def _forward(model: nn.Module, batch) -> object:
    """Run ``model`` on a batch of token ids (a tensor) or of model inputs (a dict, labels dropped)."""
    batch = move_batch(batch, model)
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


# ---- background counts -----------------------------------------------------------------------------
class SlotCounts:
    """Per value table: how many of ``num_batches`` background batches read each slot (``batches_read``,
    the document frequency) and how often it was read in all (``reads``); int64 ``(num_slots,)`` each."""

    def __init__(
        self, num_batches: int, batches_read: dict[str, torch.Tensor], reads: dict[str, torch.Tensor]
    ):
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise _bad("num_batches", num_batches, "a positive int (the number of background batches)")
        if set(batches_read) != set(reads):
            raise ValueError(
                f"batches_read {sorted(batches_read)} and reads {sorted(reads)} must name the same tables"
            )
        self.num_batches = num_batches
        self.batches_read = dict(batches_read)
        self.reads = dict(reads)

    def idf(self, name: str) -> torch.Tensor:
        """``log(num_batches / (1 + batches_read))`` per slot of table ``name`` (float64)."""
        return torch.log(self.num_batches / (1.0 + self.batches_read[name].double()))

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temporary file, flushed to disk, renamed into place)."""
        from safetensors.torch import save

        tensors = {f"batches_read/{n}": t.contiguous().cpu() for n, t in self.batches_read.items()}
        tensors.update({f"reads/{n}": t.contiguous().cpu() for n, t in self.reads.items()})
        meta = {"format": "pkmem.SlotCounts", "num_batches": str(self.num_batches)}
        atomic_write_bytes(Path(path), save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SlotCounts:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "pkmem.SlotCounts":
                raise _bad("path", str(path), "a file written by SlotCounts.save")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        split = {"batches_read": {}, "reads": {}}
        for key, t in tensors.items():
            kind, _, name = key.partition("/")
            split[kind][name] = t
        return cls(int(meta["num_batches"]), split["batches_read"], split["reads"])

    def __repr__(self) -> str:
        return f"SlotCounts(num_batches={self.num_batches}, tables={list(self.reads)})"


@torch.no_grad()
def slot_counts(
    model: nn.Module,
    batches: Iterable,
    *,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
) -> SlotCounts:
    """Count slot reads of every value table of ``model`` over background ``batches``.

    Each batch is a tensor of token ids or a dict of model inputs (``input_ids``, ``attention_mask``:
    padded tokens read nothing), or anything ``forward_fn(model, batch)`` takes. The model runs in
    eval mode without gradients (its mode is restored after). The counts stay on the model's device
    until the end.

    Each batch is one "document" of the TF-IDF (:func:`tfidf_scores`): keep them small (a sequence or
    a few). When every background batch reads most slots, their idf is zero or below and the ranking
    picks rows the new data barely reads (``benchmarks/continual.py`` saw it with 32 sequences per
    batch and 16,384 slots).
    """
    tables = _value_tables(model)
    tracker = UsageTracker(model)
    forward_fn = forward_fn or _forward
    batches_read = {
        n: torch.zeros(t.shape[0], dtype=torch.int64, device=t.device) for n, (t, _) in tables.items()
    }
    reads = {n: torch.zeros_like(b) for n, b in batches_read.items()}
    was_training = model.training
    model.eval()
    n = 0
    try:
        with tracker:
            for batch in batches:
                tracker.reset()
                forward_fn(model, batch)
                for name, (_, members) in tables.items():
                    c = _batch_reads(tracker, members, reads[name])
                    batches_read[name] += c > 0
                    reads[name] += c
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise _bad("batches", "empty", "one or more background batches")
    return SlotCounts(n, batches_read, reads)


def _batch_reads(tracker: UsageTracker, members: list[str], like: torch.Tensor) -> torch.Tensor:
    """Reads per slot of one table in the tracker's current batch, summed over its memories."""
    total = torch.zeros_like(like)
    for m in members:
        r = tracker.stats[m].reads
        if r is not None:
            total += r.to(total.device)
    return total


# ---- ranking ---------------------------------------------------------------------------------------------
def tfidf_scores(counts: torch.Tensor, batches_read: torch.Tensor, num_batches: int) -> torch.Tensor:
    """TF-IDF score of every slot, ``counts / counts.sum() * log(num_batches / (1 + batches_read))``.

    ``counts``: the new batch's reads per slot; ``batches_read``: the background batches that read
    each slot, out of ``num_batches``. Slots the batch did not read score ``-inf`` (never chosen).
    """
    if counts.shape != batches_read.shape or counts.dim() != 1:
        shapes = (tuple(counts.shape), tuple(batches_read.shape))
        raise ValueError(f"counts and batches_read have shapes {shapes}: they must be 1-D of one size")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise _bad("num_batches", num_batches, "a positive int")
    c = counts.double()
    tf = c / c.sum().clamp(min=1)
    idf = torch.log(num_batches / (1.0 + batches_read.to(c.device).double()))
    return torch.where(c > 0, tf * idf, -math.inf)


def top_slots(counts: torch.Tensor, batches_read: torch.Tensor, num_batches: int, top_t: int) -> torch.Tensor:
    """The (at most) ``top_t`` slots the batch read with the highest :func:`tfidf_scores`, best first
    (ties: lower slot first); int64 on ``counts``' device."""
    if not isinstance(top_t, int) or isinstance(top_t, bool) or top_t < 1:
        raise _bad("top_t", top_t, "a positive int (slots trained per value table and step)")
    scores = tfidf_scores(counts, batches_read, num_batches)
    order = torch.sort(scores, descending=True, stable=True).indices[:top_t]
    return order[torch.isfinite(scores[order])]  # one host sync: how many slots were read


# ---- finetuning ----------------------------------------------------------------------------------------
class SparseMemoryFinetuner:
    """Trains only the top-``top_t`` value rows of each value table per step; the rest of ``model`` is frozen.

    Args:
        model: a model with :class:`~pkmem.ProductKeyMemory` layers.
        background: :func:`slot_counts` of the model on background data (same tables).
        top_t: rows trained per value table and step (the paper's ``t``).
        lr: learning rate of the rows.
        optimizer: "sgd" (default, the paper's choice) or "adamw" (moments kept per row; a row's
            bias correction counts its own updates; decoupled weight decay on the rows updated).
        betas, eps, weight_decay: AdamW's (``weight_decay`` also applies to SGD, on the rows updated).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default :func:`pkmem.hf.causal_lm_loss`.
        train_mode: run the forward in train mode (dropout, BatchNorm batch statistics and their
            running averages). Default False: eval mode, so that nothing but the chosen rows changes.

    Creating it sets ``requires_grad=False`` on every parameter but the value tables;
    :meth:`restore` sets the flags back. Only rows read by the batch can be chosen.
    """

    def __init__(
        self,
        model: nn.Module,
        background: SlotCounts,
        top_t: int,
        lr: float,
        *,
        optimizer: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
        train_mode: bool = False,
    ):
        self.tables = _value_tables(model)
        if not isinstance(background, SlotCounts):
            raise _bad("background", type(background).__name__, "a SlotCounts (from pkmem.hf.slot_counts)")
        for name, (table, _) in self.tables.items():
            got = background.batches_read.get(name)
            if got is None or got.shape != (table.shape[0],):
                have = {n: tuple(t.shape) for n, t in background.batches_read.items()}
                raise ValueError(
                    f"background has tables {have}: it must count the model's table {name!r} "
                    f"({table.shape[0]} slots); count it with slot_counts(model, ...)"
                )
        if not isinstance(top_t, int) or isinstance(top_t, bool) or top_t < 1:
            raise _bad("top_t", top_t, "a positive int (rows trained per value table and step)")
        for key, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            positive = key != "weight_decay"
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if positive else v >= 0)
            if not ok:
                raise _bad(key, v, "a number > 0" if key != "weight_decay" else "a number >= 0")
        if optimizer not in OPTIMIZERS:
            raise _bad("optimizer", optimizer, f"one of {OPTIMIZERS}")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise _bad("betas", betas, "two numbers in [0, 1)")
        self.model, self.background, self.top_t, self.lr = model, background, top_t, float(lr)
        self.optimizer, self.betas, self.eps, self.weight_decay = optimizer, tuple(betas), eps, weight_decay
        self.loss_fn = loss_fn or causal_lm_loss
        self.train_mode = train_mode
        self.tracker = UsageTracker(model)
        self.usage = {n: UsageStats(m.num_slots) for n, m in self.tracker.memories.items()}  # over all steps
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        values = {id(t) for t, _ in self.tables.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in values)
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # AdamW: exp_avg, exp_avg_sq, step per row
        self._idf = {n: background.idf(n).to(t.device) for n, (t, _) in self.tables.items()}

    def restore(self) -> None:
        """Set every parameter's ``requires_grad`` back to what it was before this finetuner."""
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def usage_report(self, reset: bool = False) -> dict[str, dict]:
        """Memory usage and KL of every memory over the steps so far (:meth:`pkmem.UsageStats.compute`)."""
        report = {n: s.compute() for n, s in self.usage.items()}
        if reset:
            for s in self.usage.values():
                s.reset()
        return report

    def rank(self, counts: torch.Tensor, name: str) -> torch.Tensor:
        """Rows of table ``name`` chosen for a batch with ``counts`` reads per slot (:func:`top_slots`)."""
        bg = self.background
        return top_slots(counts, bg.batches_read[name].to(counts.device), bg.num_batches, self.top_t)

    def step(self, batch) -> dict:
        """One update on ``batch``: loss, backward, TF-IDF ranking, update of the chosen rows.

        Returns ``{"loss": 0-dim tensor, "slots": {table name: chosen rows, best first}, "skipped":
        bool}``; a step whose loss or gradients are not finite changes nothing (``skipped`` True).
        """
        was_training = self.model.training
        self.model.train(self.train_mode)
        for t, _ in self.tables.values():
            t.grad = None
        try:
            with self.tracker:
                loss = self.loss_fn(self.model, batch)
                loss.backward()
        finally:
            self.model.train(was_training)
        for name, stats in self.tracker.stats.items():
            self.usage[name].merge(stats)
        chosen = {}
        with torch.no_grad():
            grads = [t.grad for t, _ in self.tables.values() if t.grad is not None]
            finite = torch.isfinite(loss.detach()).all()
            for g in grads:
                finite &= torch.isfinite(g.coalesce()._values() if g.is_sparse else g).all()
            skipped = not bool(finite)  # one host sync: a non-finite step changes nothing
            for name, (table, members) in self.tables.items():
                zeros = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)
                counts = _batch_reads(self.tracker, members, zeros)
                rows = self.rank(counts, name)
                chosen[name] = rows
                if table.grad is not None and rows.numel() and not skipped:
                    self._update(name, table, rows)
                table.grad = None
        return {"loss": loss.detach(), "slots": chosen, "skipped": skipped}

    def _update(self, name: str, table: nn.Parameter, rows: torch.Tensor) -> None:
        grad = table.grad
        g = grad.coalesce().index_select(0, rows).to_dense() if grad.is_sparse else grad.index_select(0, rows)
        g = g.float()
        p = table.index_select(0, rows).float()
        if self.weight_decay:
            p.mul_(1 - self.lr * self.weight_decay)
        if self.optimizer == "sgd":
            p.add_(g, alpha=-self.lr)
        else:
            st = self.state.get(name)
            if st is None:
                zeros = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
                st = self.state[name] = {
                    "exp_avg": zeros,
                    "exp_avg_sq": zeros.clone(),
                    "step": torch.zeros(table.shape[0], dtype=torch.float32, device=table.device),
                }
            b1, b2 = self.betas
            m = st["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
            v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            k = st["step"].index_select(0, rows).add_(1)
            st["exp_avg"].index_copy_(0, rows, m)
            st["exp_avg_sq"].index_copy_(0, rows, v)
            st["step"].index_copy_(0, rows, k)
            m_hat = m / (1 - b1**k)[:, None]
            v_hat = v / (1 - b2**k)[:, None]
            p.addcdiv_(m_hat, v_hat.sqrt_().add_(self.eps), value=-self.lr)
        table.index_copy_(0, rows, p.to(table.dtype))

    def state_dict(self) -> dict:
        """The AdamW moments and per-row step counts (empty for SGD), for resuming."""
        return {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            if name not in self.tables:
                raise ValueError(f"state names table {name!r}: the model's tables are {list(self.tables)}")
            table = self.tables[name][0]
            self.state[name] = {k: v.to(table.device).clone() for k, v in s.items()}
