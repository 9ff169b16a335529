"""Continued training of a causal language model with memories: the pieces and a small explicit loop.

- :func:`tokenize`: texts -> one 1-D tensor of token ids (documents joined by the EOS token);
- :func:`window_batch`: a batch of random windows of a token stream, a pure function of ``(seed, step)``;
- :func:`causal_lm_loss`: the model's next-token loss on a batch (padding ignored);
- :func:`finetune`: AdamW with the memory values in their own group (:func:`pkmem.make_optimizer`),
  warmup, separate gradient clipping of the values (:func:`pkmem.clip_grad_norm`), memory usage and KL
  (:mod:`pkmem.metrics`) in the logged records; or, given a ``sparse`` finetuner, sparse memory finetuning
  (:class:`~pkmem.hf.SparseMemoryFinetuner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pkmem.metrics import UsageTracker
from pkmem.optim import clip_grad_norm, make_optimizer

if TYPE_CHECKING:
    from pkmem.hf.sparse import SparseMemoryFinetuner

__all__ = ["tokenize", "window_batch", "causal_lm_loss", "move_batch", "finetune"]


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


def tokenize(tokenizer, texts: str | Iterable[str], eos: bool = True) -> torch.Tensor:
    """One int64 tensor of the token ids of ``texts`` (a string or several), each followed by the
    tokenizer's EOS token when ``eos`` and the tokenizer has one."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos else None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def _as_tokens(data) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    elif isinstance(data, (list, tuple)):
        data = torch.tensor(data)
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.is_floating_point():
        what = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise _bad("data", what, "a 1-D sequence of token ids, or a function step -> batch")
    return data.long()


def window_batch(
    tokens: torch.Tensor | Sequence[int], batch_size: int, seq_len: int, seed: int, step: int
) -> dict:
    """``{"input_ids", "labels"}`` (both ``(batch_size, seq_len)``, equal: the model shifts the labels)
    from windows of ``tokens`` at random starts drawn from ``(seed, step)`` alone."""
    tokens = _as_tokens(tokens)
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(name, v, "a positive int")
    if tokens.numel() < seq_len:
        raise _bad("seq_len", seq_len, f"<= the number of tokens ({tokens.numel()})")
    rng = np.random.default_rng([seed, step])
    starts = torch.from_numpy(rng.integers(0, tokens.numel() - seq_len + 1, size=batch_size))
    ids = tokens[starts[:, None] + torch.arange(seq_len)]
    return {"input_ids": ids, "labels": ids.clone()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def move_batch(batch, model: nn.Module):
    """``batch`` (a tensor or a dict of tensors) on the model's device."""
    device = _device(model)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise _bad("batch", type(batch).__name__, "a tensor of token ids or a dict of model inputs")


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """The model's mean next-token loss on ``batch``: a tensor of token ids, or a dict with
    ``input_ids`` (and ``attention_mask``, ``labels``; without labels, the ids with padding at -100)."""
    batch = move_batch(batch, model)
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        if batch.get("attention_mask") is not None:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        batch = {**batch, "labels": labels}
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
    if loss is None:
        raise _bad("model", type(model).__name__, "a causal LM that returns a loss when given labels")
    return loss


def _autocast_call(fn, model, batch, device: torch.device, dtype: torch.dtype | None):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return fn(model, batch)


def finetune(
    model: nn.Module,
    data: torch.Tensor | Sequence[int] | np.ndarray | Callable[[int], object],
    *,
    steps: int,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 1e-4,
    value_lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    value_max_grad_norm: float | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    log_every: int = 10,
    callback: Callable[[dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    sparse: SparseMemoryFinetuner | None = None,
    on_step: Callable[[int, torch.Tensor], bool | None] | None = None,
) -> list[dict]:
    """Train ``model`` (a causal LM with memories) up to step ``steps``; returns the log records.

    ``data``: a 1-D sequence of token ids (batches are :func:`window_batch` of it), or a function
    ``step -> batch`` (:func:`causal_lm_loss` takes the batch). Step ``s`` (1-based) uses batch ``s``,
    so a run resumed with ``start_step`` and the saved ``optimizer`` sees the batches the
    uninterrupted run would have.

    Dense training (default): AdamW over every trainable parameter, the values at ``value_lr``
    (:func:`pkmem.make_optimizer`, or your ``optimizer``), linear warmup over ``warmup_steps`` then
    constant rates, gradients clipped to ``max_grad_norm`` (values apart, ``value_max_grad_norm``).
    A step whose gradient norm is not finite is skipped (counted in the records).

    Sparse memory finetuning (``sparse``, a :class:`~pkmem.hf.SparseMemoryFinetuner` of ``model``):
    each step is ``sparse.step(batch)``, which trains only the top-t value rows by TF-IDF, at the
    finetuner's ``lr`` (warmed up likewise); ``optimizer`` must be None, and ``lr``, ``value_lr``,
    ``weight_decay`` and the clipping are not used. Save ``sparse.state_dict()`` to resume, and call
    ``sparse.restore()`` when done to unfreeze the model.

    Every ``log_every`` steps (and at the last) a record is appended to the returned list and passed
    to ``callback``: ``{"step", "loss"`` (mean since the last record), ``"lr"`` (``lr``, or the
    finetuner's, times the warmup factor), ``"grad_norm", "value_grad_norm"`` (sparse mode:
    ``"slots"``, the rows updated per table), ``"skipped", "memory": {name: {"usage", "kl"}}}``.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast on the model's device.

    ``on_step(step, loss)`` is called after every step with its loss (a 0-dim tensor on the model's
    device: reading it waits for the device). If it returns True, training ends after this step (with a
    record of it): a caller checkpoints, evaluates or stops there, and goes on with ``start_step``.
    """
    from pkmem.hf.sparse import SparseMemoryFinetuner

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise _bad("steps", steps, "a positive int")
    if not isinstance(start_step, int) or not 0 <= start_step <= steps:
        raise _bad("start_step", start_step, f"an int in [0, steps={steps}]")
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
        raise _bad("log_every", log_every, "a positive int")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise _bad("warmup_steps", warmup_steps, "an int >= 0")
    if callable(data) and not isinstance(data, torch.Tensor):
        batch_of = data
    else:
        tokens = _as_tokens(data)
        window_batch(tokens, batch_size, seq_len, seed, 0)  # checks the sizes once

        def batch_of(step: int):
            return window_batch(tokens, batch_size, seq_len, seed, step)

    device = _device(model)

    def loss_of(m: nn.Module, batch) -> torch.Tensor:
        return _autocast_call(causal_lm_loss, m, batch, device, autocast_dtype)

    if sparse is not None:
        if not isinstance(sparse, SparseMemoryFinetuner) or sparse.model is not model:
            raise _bad("sparse", type(sparse).__name__, "None or a SparseMemoryFinetuner of this model")
        if optimizer is not None:
            raise _bad(
                "optimizer", type(optimizer).__name__, "None with sparse (the finetuner updates the rows)"
            )
        tracker = sparse.tracker  # the finetuner tracks the memories itself (its .usage accumulates)
        sparse_lr, sparse_loss = sparse.lr, sparse.loss_fn
        if autocast_dtype is not None:
            sparse.loss_fn = lambda m, b: _autocast_call(sparse_loss, m, b, device, autocast_dtype)
    else:
        if optimizer is None:
            optimizer = make_optimizer(model, lr, value_lr, weight_decay=weight_decay)
        tracker = UsageTracker(model)
    base_lrs = [] if sparse else [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    was_training = model.training
    records: list[dict] = []
    total = torch.zeros((), device=device)
    count, skipped = 0, 0
    norms = (torch.zeros(()), torch.zeros(()))
    slots: dict = {}
    model.train()
    try:
        if sparse is None:
            tracker.start()
        for step in range(start_step + 1, steps + 1):
            factor = min(1.0, step / warmup_steps) if warmup_steps else 1.0
            batch = batch_of(step)
            if sparse is not None:
                sparse.lr = sparse_lr * factor
                out = sparse.step(batch)
                loss, slots = out["loss"], {n: int(r.numel()) for n, r in out["slots"].items()}
                skipped += out["skipped"]
            else:
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * factor
                loss = loss_of(model, batch)
                loss.backward()
                norms = clip_grad_norm(model, max_grad_norm, value_max_grad_norm)
                if math.isfinite(float(norms[0] + norms[1])):
                    optimizer.step()
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
            count += 1
            stop = bool(on_step(step, loss.detach())) if on_step is not None else False
            if step % log_every == 0 or step == steps or stop:
                record = {"step": step, "loss": float(total) / count, "skipped": skipped}
                if sparse is None:
                    record.update(lr=lr * factor, grad_norm=float(norms[0]), value_grad_norm=float(norms[1]))
                    report = tracker.report()
                    tracker.reset()
                else:
                    record.update(lr=sparse_lr * factor, slots=slots)
                    report = sparse.usage_report(reset=True)
                record["memory"] = {n: {"usage": r["usage"], "kl": r["kl"]} for n, r in report.items()}
                records.append(record)
                if callback is not None:
                    callback(record)
                total.zero_()
                count = 0
            if stop:
                break
    finally:
        if sparse is None:
            tracker.stop()
        else:
            sparse.lr, sparse.loss_fn = sparse_lr, sparse_loss
        model.train(was_training)
    return records
