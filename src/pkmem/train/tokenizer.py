"""Tokenizers: raw UTF-8 bytes (vocab 256) or byte-level BPE trained with the ``tokenizers`` library.

Both have ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``is_bytes`` and
``save(path)``; :func:`load_tokenizer` reads what ``save`` wrote (a JSON file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pkmem._util import atomic_write_bytes

__all__ = ["ByteTokenizer", "BPETokenizer", "load_tokenizer", "train_bpe"]


class ByteTokenizer:
    """Token = one byte of the UTF-8 encoding; bits per token are bits per byte."""

    vocab_size = 256
    is_bytes = True
    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> bytes:
        return data

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "vocab_size": 256})

    def fingerprint(self) -> str:
        return "bytes"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.to_json().encode())


class BPETokenizer:
    """Byte-level BPE (``tokenizers``): every string round-trips exactly."""

    is_bytes = False
    kind = "bpe"

    def __init__(self, tok):
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (in parallel; without the offsets, which need memory, when the
        library can leave them out)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.to_json().encode())


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` (the training split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved at ``path`` by ``save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON ({e}): is it truncated?") from None
    if isinstance(data, dict) and data.get("type") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    try:
        return BPETokenizer(Tokenizer.from_str(text))
    except Exception as e:  # the library raises its own exception type
        raise ValueError(f"tokenizer file {str(path)!r} is not a tokenizer: {e}") from None
