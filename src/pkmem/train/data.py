"""Corpora, deterministic train / valid / test splits, token-id memmaps and batches.

Sources (``TrainConfig.data``):

- ``stdlib``: the running Python's standard-library ``.py`` files (no download needed), sorted by
  path; a file goes to train / valid / test by a hash of its relative path (90 / 5 / 5 %);
  files that are not UTF-8 are skipped.
- ``enwik8``: a path to ``enwik8``, ``enwik8.gz`` or ``enwik8.zip``; the standard split, the
  first 90 % / next 5 % / last 5 % of the bytes (90M / 5M / 5M for the 10^8-byte file).
- ``text``: a file, a directory (its ``.txt`` and ``.jsonl`` files, recursively) or a glob;
  ``.jsonl`` lines are objects with a ``"text"`` field. Documents (files, jsonl lines) go to a split
  by a hash of their path relative to the files' common directory (and line number); with too few
  documents for that, the concatenated text is cut 90/5/5 %.

Token ids are cached as raw numpy arrays (``<split>.bin``, read back with ``np.memmap``) in a
directory named by a hash of the source and the tokenizer, under ``cache_dir``; ``meta.json`` is
written last, so an interrupted preparation is simply redone.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkmem._util import atomic_write_bytes
from pkmem.train.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = ["TokenData", "prepare_data", "load_corpus", "sample_batch", "eval_windows", "unigram_bits"]

SPLITS = ("train", "valid", "test")
FRACTIONS = (0.9, 0.05, 0.05)
TEXT_SUFFIXES = (".txt", ".jsonl")
MIN_HASH_DOCS = 40  # fewer documents than this: split the concatenated text by position
DOC_SEP = "\n\n"


# ---- corpora ----------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The three splits of a source as text (``str``) or raw bytes (enwik8), and its fingerprint."""

    splits: dict  # split -> str | bytes
    fingerprint: str  # identifies the source's content (paths, sizes, mtimes)
    description: str
    info: dict


def _split_of(name: str) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "train" if h < FRACTIONS[0] else ("valid" if h < FRACTIONS[0] + FRACTIONS[1] else "test")


def _positional_split(text):
    n = len(text)
    a, b = int(n * FRACTIONS[0]), int(n * (FRACTIONS[0] + FRACTIONS[1]))
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"data='stdlib': no .py files found under {str(root)!r}")
    return root, files


def _stdlib_fingerprint() -> str:
    root, files = _stdlib_files()
    h = hashlib.sha256(sys.version.encode())
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return "stdlib-" + h.hexdigest()[:16]


def _load_stdlib() -> Corpus:
    root, files = _stdlib_files()
    docs = {s: [] for s in SPLITS}
    skipped = 0
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip() and "\x00" not in text:
            docs[_split_of(rel)].append(text)
    splits = {s: DOC_SEP.join(d) for s, d in docs.items()}
    info = {"root": str(root), "files": len(files) - skipped, "skipped_files": skipped}
    desc = f"Python {sys.version.split()[0]} standard library ({len(files) - skipped} .py files)"
    return Corpus(splits, _stdlib_fingerprint(), desc, info)


def _file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_enwik8(path: Path) -> bytes:
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.namelist() if not m.endswith("/")]
                member = next((m for m in members if Path(m).name == "enwik8"), None)
                if member is None and len(members) == 1:
                    member = members[0]
                if member is None:
                    raise ValueError(
                        f"data_path={str(path)!r}: the zip holds {members[:5]}, "
                        "expected one file named enwik8"
                    )
                return z.read(member)
        return path.read_bytes()
    except (OSError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile) as e:
        raise ValueError(f"data_path={str(path)!r} could not be read as enwik8: {e}") from None


def _load_enwik8(path: str) -> Corpus:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data_path={path!r} (data='enwik8') does not exist or is not a file")
    data = _read_enwik8(p)
    if not data:
        raise ValueError(f"data_path={path!r} (data='enwik8') is empty")
    splits = _positional_split(data)
    info = {"path": str(p.resolve()), "bytes": len(data)}
    return Corpus(splits, "enwik8-" + _file_fingerprint([p]), f"enwik8 ({len(data):,} bytes)", info)


def _text_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(path), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"data_path={path!r} (data='text'): the glob matches no file")
        return files
    if p.is_dir():
        # pkmem's own run directories under the corpus (metrics.jsonl, ...) are not text to train on
        runs = {m.parent for m in p.rglob("metrics.jsonl") if (m.parent / "config.json").is_file()}
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES and not runs.intersection(f.parents)
        )
        if not files:
            raise FileNotFoundError(
                f"data_path={path!r} (data='text'): the directory holds no {' or '.join(TEXT_SUFFIXES)} file"
            )
        return files
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"data_path={path!r} (data='text') does not exist")


def _decode(p: Path, raw: bytes) -> str:
    if b"\x00" in raw:
        raise ValueError(f"data_path file {str(p)!r} looks binary (it contains NUL bytes): give text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data_path file {str(p)!r} is not valid UTF-8 (byte {e.start}): re-encode it as UTF-8"
        ) from None


def _documents(p: Path, name: str) -> list[tuple[str, str]]:
    """``(name, text)`` documents of one file: the file, or each line of a .jsonl (``name:line``)."""
    text = _decode(p, p.read_bytes())
    if p.suffix.lower() != ".jsonl":
        return [(name, text)] if text.strip() else []
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data_path file {str(p)!r} line {n} is not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'data_path file {str(p)!r} line {n} has no string "text" field')
        if obj["text"].strip():
            docs.append((f"{name}:{n}", obj["text"]))
    return docs


def _load_text(path: str) -> Corpus:
    files = _text_files(path)
    # documents are named relative to the files' common directory: the split survives a move
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    docs = [d for f in files for d in _documents(f, f.resolve().relative_to(root).as_posix())]
    if not docs:
        raise ValueError(f"data_path={path!r} (data='text') is empty: its {len(files)} file(s) hold no text")
    parts = {s: [] for s in SPLITS}
    for name, text in docs:
        parts[_split_of(name)].append(text)
    splits = {s: DOC_SEP.join(d) for s, d in parts.items()}
    total = sum(len(t) for t in splits.values())
    how = "documents hashed"
    if len(docs) < MIN_HASH_DOCS or min(len(t) for t in splits.values()) < 0.01 * total:
        splits, how = _positional_split(DOC_SEP.join(t for _, t in docs)), "cut by position"
    info = {"files": len(files), "documents": len(docs), "split": how}
    fp = "text-" + _file_fingerprint(files)
    return Corpus(splits, fp, f"text {path!r} ({len(files)} files, {len(docs)} documents)", info)


def _check_source(source: str, path: str | None) -> None:
    if source not in ("stdlib", "enwik8", "text"):
        raise ValueError(f"data={source!r} is not allowed: data must be one of ('stdlib', 'enwik8', 'text')")
    if source != "stdlib" and not path:
        raise ValueError(f"data={source!r} needs --data-path (data_path=...)")


def load_corpus(source: str, path: str | None = None) -> Corpus:
    """The splits of ``source`` ("stdlib", "enwik8", "text") read from ``path``."""
    _check_source(source, path)
    if source == "stdlib":
        return _load_stdlib()
    if source == "enwik8":
        return _load_enwik8(path)
    return _load_text(path)


def source_fingerprint(source: str, path: str | None = None) -> str:
    """A cheap fingerprint of the source's files (no reading): names, sizes, mtimes."""
    _check_source(source, path)
    if source == "stdlib":
        return _stdlib_fingerprint()
    if source == "enwik8":
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data_path={path!r} (data='enwik8') does not exist or is not a file")
        return "enwik8-" + _file_fingerprint([p])
    return "text-" + _file_fingerprint(_text_files(path))


# ---- tokenisation and the cache ---------------------------------------------------------------------
def _dtype_for(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else (np.uint16 if vocab_size <= 2**16 else np.uint32)


def _chunks(text: str, size: int = 1 << 20):
    """Pieces of about ``size`` characters cut after a newline."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


def _encode(tok, data) -> np.ndarray:
    dtype = _dtype_for(tok.vocab_size)
    if isinstance(tok, ByteTokenizer):
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8).copy()
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    out = [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(list(_chunks(text)))]
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _count_words(data) -> int:
    if isinstance(data, bytes):
        arr = np.frombuffer(data, dtype=np.uint8)
        space = np.isin(arr, np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8))
        return int((~space[1:] & space[:-1]).sum() + (len(arr) > 0 and not space[0]))
    return len(data.split())


@dataclass
class TokenData:
    """Token ids of the three splits (numpy memmaps), the tokenizer and statistics per split."""

    splits: dict  # split -> np.ndarray (memmap)
    tokenizer: ByteTokenizer | BPETokenizer
    meta: dict  # {"source", "description", "splits": {split: {"tokens", "bytes", "words"}}, ...}
    directory: Path

    def tokens(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not allowed: split must be one of {SPLITS}")
        return self.splits[split]


def _cache_key(fingerprint: str, tok_spec: str) -> str:
    return hashlib.sha256(f"{fingerprint}|{tok_spec}".encode()).hexdigest()[:20]


def _open_cached(d: Path) -> TokenData | None:
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tok = load_tokenizer(d / "tokenizer.json")
        splits = {}
        for s in SPLITS:
            n = meta["splits"][s]["tokens"]
            f = d / f"{s}.bin"
            if f.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
                return None
            splits[s] = (
                np.memmap(f, dtype=meta["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, meta["dtype"])
            )
        return TokenData(splits, tok, meta, d)
    except (OSError, ValueError, KeyError):
        return None


def prepare_data(
    source: str,
    path: str | None,
    cache_dir: str | os.PathLike,
    tokenizer: str | ByteTokenizer | BPETokenizer = "bytes",
    bpe_vocab_size: int = 4096,
    min_tokens: int = 2,
    log=print,
) -> TokenData:
    """Tokenised splits of ``source`` (cached under ``cache_dir``).

    ``tokenizer`` is "bytes", "bpe" (trained on the training split with ``bpe_vocab_size`` tokens)
    or a tokenizer object (e.g. the run's own, for evaluating on other data). Every split must have
    at least ``min_tokens`` tokens (``seq_len + 1`` for training).
    """
    if isinstance(tokenizer, str):
        if tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"tokenizer={tokenizer!r} is not allowed: tokenizer must be 'bytes' or 'bpe'")
        specs = ["bytes"] if tokenizer == "bytes" else [f"bpe-train-{bpe_vocab_size}"]
    elif tokenizer.is_bytes:
        specs = ["bytes"]
    else:  # a given BPE: the cache of the run that trained it, or one made for it
        specs = [f"bpe-train-{tokenizer.vocab_size}", "tok-" + tokenizer.fingerprint()]
    fingerprint = source_fingerprint(source, path)
    cached = None
    for spec in specs:
        d = Path(cache_dir) / f"{source}-{_cache_key(fingerprint, spec)}"
        cached = _open_cached(d)
        if cached is not None and not isinstance(tokenizer, str):
            if cached.tokenizer.fingerprint() != tokenizer.fingerprint():
                cached = None
        if cached is not None:
            break
    if cached is None:
        corpus = load_corpus(source, path)
        log(f"preparing {corpus.description} -> {d}")
        if isinstance(tokenizer, str):
            if tokenizer == "bytes":
                tok = ByteTokenizer()
            else:
                train = corpus.splits["train"]
                train = train.decode("utf-8", errors="replace") if isinstance(train, bytes) else train
                tok = train_bpe(_chunks(train), bpe_vocab_size)
        else:
            tok = tokenizer
        dtype = _dtype_for(tok.vocab_size)
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}."))
        try:
            stats = {}
            for s in SPLITS:
                ids = _encode(tok, corpus.splits[s]).astype(dtype, copy=False)
                ids.tofile(tmp / f"{s}.bin")
                raw = corpus.splits[s]
                nbytes = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8"))
                stats[s] = {"tokens": int(len(ids)), "bytes": nbytes, "words": _count_words(raw)}
            tok.save(tmp / "tokenizer.json")
            meta = {
                "source": source,
                "data_path": None if path is None else str(path),
                "fingerprint": corpus.fingerprint,
                "description": corpus.description,
                "info": corpus.info,
                "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size,
                "dtype": np.dtype(dtype).name,
                "splits": stats,
            }
            atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cached = _open_cached(d)
        if cached is None:
            raise RuntimeError(f"token cache {str(d)!r} could not be read back after writing it")
    for s in SPLITS:
        n = cached.meta["splits"][s]["tokens"]
        if n < min_tokens:
            where = f"data={source!r}" + (f" data_path={path!r}" if path else "")
            raise ValueError(
                f"{where}: the {s} split has {n} tokens, fewer than the {min_tokens} needed "
                f"(seq_len + 1): give more text or a smaller seq_len"
            )
    return cached


# ---- batches --------------------------------------------------------------------------------------
def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0):
    """Random windows of ``seq_len + 1`` tokens, a pure function of ``(seed, step, micro)``.

    Returns an int64 numpy array ``(batch_size, seq_len + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``.
    Being a function of the step, the data position of a resumed run is just its step.
    """
    high = len(tokens) - seq_len - 1
    if high < 0:
        raise ValueError(
            f"the split has {len(tokens)} tokens: at least seq_len + 1 = {seq_len + 1} are needed"
        )
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, high + 1, size=batch_size)
    return np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)


def eval_windows(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows of ``seq_len + 1`` tokens (stride ``seq_len``).

    With ``max_tokens``, about ``max_tokens / seq_len`` windows evenly spread over the split.
    """
    total = (n_tokens - 1) // seq_len
    if total < 1:
        raise ValueError(f"the split has {n_tokens} tokens: at least seq_len + 1 = {seq_len + 1} are needed")
    n = total if max_tokens is None else max(1, min(total, math.ceil(max_tokens / seq_len)))
    return (np.arange(n, dtype=np.int64) * total // n) * seq_len


def unigram_bits(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Bits per token of an add-one unigram model of ``train`` on ``targets`` (a baseline)."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[np.asarray(targets, dtype=np.int64)].mean())
