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

Only what the user pointed at is read: a directory walk (or a glob's, from the directory before its
first wildcard) does not follow symbolic links that lead out of it unless ``follow_symlinks``, and
a link back to a directory above it (a loop) is an error.

Preparing a source streams it: the files are read in pieces of about a million characters (a
first pass validates them and counts characters, a BPE is trained from an iterator over the
training split, and the token ids are written to the cache as they are made), so memory use does
not grow with the data (a .jsonl line is read whole). Token ids are cached as raw numpy arrays
(``<split>.bin``, read back with ``np.memmap``) in a directory named by a hash of the source and
the tokenizer, under ``cache_dir``; ``meta.json`` is written last, so an interrupted preparation is
simply redone.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkmem._util import atomic_write_bytes
from pkmem.train.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = [
    "TokenData",
    "Source",
    "prepare_data",
    "open_source",
    "load_corpus",
    "sample_batch",
    "eval_windows",
    "unigram_bits",
]

SPLITS = ("train", "valid", "test")
FRACTIONS = (0.9, 0.05, 0.05)
TEXT_SUFFIXES = (".txt", ".jsonl")
MIN_HASH_DOCS = 40  # fewer documents than this: split the concatenated text by position
DOC_SEP = "\n\n"
READ_SIZE = 1 << 20  # bytes read from a file at a time
CHUNK = 1 << 20  # characters a BPE tokenises at a time (cut after a newline): part of the token ids
ENCODE_BATCH = 2  # chunks a BPE encodes at once, in parallel (each takes ~150 MB while it is encoded)


# ---- finding files: only where the user pointed ------------------------------------------------------
def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Walk:
    """The files under ``root``: symbolic links are followed only where they stay inside ``root``
    (anywhere with ``follow``); each real directory is read once, a link back to a directory above
    it (a loop) is a ValueError, and links that lead out are collected in ``skipped``."""

    def __init__(self, root: Path, follow: bool, what: str, max_depth: int | None = None):
        self.root, self.follow, self.what, self.max_depth = root, follow, what, max_depth
        self.root_real = os.path.realpath(root)
        self.files: list[Path] = []
        self.skipped: list[Path] = []
        self._seen_files: set[str] = set()
        self._seen_dirs: set[str] = set()
        self._visit(root, self.root_real, (), 0)

    def _visit(self, d: Path, real: str, ancestors: tuple, depth: int) -> None:
        if real in self._seen_dirs:
            return
        self._seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f"{self.what}: the directory {str(d)!r} cannot be read ({e.strerror})") from None
        for e in entries:
            path = Path(e.path)
            if e.is_symlink():
                target = os.path.realpath(path)
                if not self.follow and not _within(target, self.root_real):
                    self.skipped.append(path)
                    continue
                if os.path.isdir(target):
                    if target in ancestors or target == real:
                        raise ValueError(
                            f"{self.what}: the symbolic link {str(path)!r} leads back to {target!r}, a "
                            "directory it is in (a loop): remove the link or point data_path elsewhere"
                        )
                    if self.max_depth is None or depth < self.max_depth:
                        self._visit(path, target, (*ancestors, real), depth + 1)
                elif os.path.isfile(target):
                    self._add(path, target)
            elif e.is_dir(follow_symlinks=False):
                if self.max_depth is None or depth < self.max_depth:
                    self._visit(path, os.path.join(real, e.name), (*ancestors, real), depth + 1)
            elif e.is_file(follow_symlinks=False):
                self._add(path, os.path.join(real, e.name))

    def _add(self, path: Path, real: str) -> None:
        if real not in self._seen_files:  # a file reached twice (through a link inside) is read once
            self._seen_files.add(real)
            self.files.append(path)


def _match(parts: tuple, pattern: tuple) -> bool:
    """Whether the relative path ``parts`` matches the glob components ``pattern`` (``**``: any
    number of directories; as :mod:`glob`, a name starting with '.' needs a pattern that does)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        for i in range(len(parts) + 1):
            if i and parts[i - 1].startswith("."):
                break
            if _match(parts[i:], pattern[1:]):
                return True
        return False
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _glob(path: str, follow: bool) -> tuple[list[Path], list[Path], Path]:
    """``(files, links not followed, base directory)`` of a glob: the walk starts at the directory
    before the first component with a wildcard."""
    parts = Path(os.path.expanduser(path)).parts
    first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    base = Path(*parts[:first]) if first else Path(".")
    pattern = parts[first:]
    what = f"data_path={path!r} (data='text')"
    if not base.is_dir():
        raise FileNotFoundError(f"{what}: the glob matches no file ({str(base)!r} is not a directory)")
    depth = None if "**" in pattern else len(pattern) - 1
    walk = _Walk(base, follow, what, depth)
    files = sorted(f for f in walk.files if _match(f.relative_to(base).parts, pattern))
    return files, walk.skipped, base


def _text_files(path: str, follow_symlinks: bool = False) -> list[Path]:
    """The files ``data_path`` names: a file, a directory's .txt / .jsonl files, or a glob's files.

    Symbolic links leading out of the directory (a glob's: the directory before its first wildcard)
    are not followed unless ``follow_symlinks``; a link loop is a ValueError.
    """
    p = Path(path).expanduser()
    what = f"data_path={path!r} (data='text')"
    if any(c in path for c in "*?["):
        files, skipped, base = _glob(path, follow_symlinks)
        if not files:
            raise FileNotFoundError(f"{what}: the glob matches no file{_skipped_note(skipped, base)}")
    elif p.is_dir():
        walk = _Walk(p, follow_symlinks, what)
        skipped, base = walk.skipped, p
        # pkmem's own run directories under the corpus (metrics.jsonl, ...) are not text to train on
        runs = {
            f.parent for f in walk.files if f.name == "metrics.jsonl" and (f.parent / "config.json").is_file()
        }
        files = sorted(
            f for f in walk.files if f.suffix.lower() in TEXT_SUFFIXES and not runs.intersection(f.parents)
        )
        if not files:
            raise FileNotFoundError(
                f"{what}: the directory holds no {' or '.join(TEXT_SUFFIXES)} file{_skipped_note(skipped, p)}"
            )
    elif p.is_file():
        return [p]
    else:
        raise FileNotFoundError(f"{what} does not exist")
    if skipped:
        warnings.warn(
            f"{what}: {len(skipped)} symbolic link(s) leading out of {str(base)!r} were not followed "
            f"(e.g. {str(skipped[0])!r}); set follow_symlinks=true to read them",
            stacklevel=3,
        )
    return files


def _skipped_note(skipped: list[Path], base: Path) -> str:
    if not skipped:
        return ""
    return (
        f" ({len(skipped)} symbolic link(s) leading out of {str(base)!r}, e.g. {str(skipped[0])!r}, were "
        "not followed: set follow_symlinks=true to read them)"
    )


# ---- reading documents in pieces ----------------------------------------------------------------------
def _decoded(p: Path):
    """The text of file ``p`` in pieces of at most ``READ_SIZE`` characters (NUL bytes and invalid
    UTF-8 are ValueErrors naming the file and the byte)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(p, "rb") as f:
        while True:
            raw = f.read(READ_SIZE)
            if raw and b"\x00" in raw:
                raise ValueError(
                    f"data_path file {str(p)!r} looks binary (it contains NUL bytes): give text files"
                )
            pending = len(dec.getstate()[0])
            try:
                text = dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"data_path file {str(p)!r} is not valid UTF-8 (byte {offset - pending + e.start}): "
                    "re-encode it as UTF-8"
                ) from None
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _jsonl_documents(p: Path):
    """``(line number, text)`` of the non-blank ``"text"`` fields of a .jsonl file, line by line."""
    offset = 0
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if b"\x00" in raw:
                raise ValueError(
                    f"data_path file {str(p)!r} looks binary (it contains NUL bytes): give text files"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = offset + e.start
                raise ValueError(
                    f"data_path file {str(p)!r} is not valid UTF-8 (byte {where}): re-encode it as UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data_path file {str(p)!r} line {n} is not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'data_path file {str(p)!r} line {n} has no string "text" field')
            if obj["text"].strip():
                yield n, obj["text"]


# ---- sources: the three splits as a stream of pieces --------------------------------------------------
class Source:
    """A corpus read in pieces: :meth:`pieces` yields ``(split, piece)`` whose concatenation per split
    is that split's text (``str``, or ``bytes`` for enwik8), reading the files again at each call;
    memory use does not grow with the data."""

    is_bytes = False
    fingerprint: str
    description: str
    info: dict

    def pieces(self, only: str | None = None):
        """``(split, piece)`` in order; ``only``: just that split's pieces."""
        raise NotImplementedError


def _split_of(name: str) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "train" if h < FRACTIONS[0] else ("valid" if h < FRACTIONS[0] + FRACTIONS[1] else "test")


def _position_cuts(n: int) -> tuple[int, int]:
    return int(n * FRACTIONS[0]), int(n * (FRACTIONS[0] + FRACTIONS[1]))


def _cut(piece, pos: int, cuts: tuple[int, int]):
    """``(split, part)`` of a piece that starts at ``pos`` of a stream cut at ``cuts``."""
    a, b = cuts
    end = pos + len(piece)
    for split, lo, hi in (("train", 0, a), ("valid", a, b), ("test", b, math.inf)):
        lo, hi = max(lo, pos), min(hi, end)
        if lo < hi:
            yield split, piece[lo - pos : hi - pos]


class _Documents(Source):
    """Text documents (stdlib files, text files, .jsonl lines), each to a split by a hash of its name
    or, with too few for that, their concatenation (``DOC_SEP`` between them) cut by position. The
    first pass reads every document (validating it and counting characters) to decide."""

    def __init__(self, docs, fingerprint: str, hashed: bool | None = None):
        self._docs = docs  # () -> iterator of (name, () -> iterator of str)
        self.fingerprint = fingerprint
        self._blank: set[str] = set()
        chars, started = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, False)
        self.n_docs = self.total_chars = 0
        for name, read in docs():
            length, blank = 0, True
            for text in read():
                length += len(text)
                blank = blank and not text.strip()
            if blank:  # a file of white space is no document
                self._blank.add(name)
                continue
            split = _split_of(name)
            chars[split] += length + (len(DOC_SEP) if started[split] else 0)
            started[split] = True
            self.total_chars += length + (len(DOC_SEP) if self.n_docs else 0)
            self.n_docs += 1
        if hashed is None:
            few = self.n_docs < MIN_HASH_DOCS or min(chars.values()) < 0.01 * sum(chars.values())
            hashed = not few
        self.hashed = hashed

    def _each(self):
        for name, read in self._docs():
            if name not in self._blank:
                yield name, read

    def pieces(self, only: str | None = None):
        if self.hashed:
            started = dict.fromkeys(SPLITS, False)
            for name, read in self._each():
                split = _split_of(name)
                if only is None or split == only:
                    if started[split]:
                        yield split, DOC_SEP
                    for text in read():
                        yield split, text
                started[split] = True
            return
        cuts, pos = _position_cuts(self.total_chars), 0
        for i, (_, read) in enumerate(self._each()):
            for text in _after_separator(i, read):
                for split, part in _cut(text, pos, cuts):
                    if only is None or split == only:
                        yield split, part
                pos += len(text)
            if only == "train" and pos >= cuts[0]:
                return


def _after_separator(i: int, read):
    if i:
        yield DOC_SEP
    yield from read()


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


def _stdlib_source() -> Source:
    root, files = _stdlib_files()
    skipped = set()

    def docs():
        for p in files:
            rel = p.relative_to(root).as_posix()
            try:
                text = p.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped.add(rel)
                continue
            if "\x00" not in text:
                yield rel, lambda text=text: iter((text,))

    src = _Documents(docs, _stdlib_fingerprint(), hashed=True)
    n = len(files) - len(skipped)
    src.info = {"root": str(root), "files": n, "skipped_files": len(skipped)}
    src.description = f"Python {sys.version.split()[0]} standard library ({n} .py files)"
    return src


def _file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _text_source(path: str, follow_symlinks: bool = False) -> Source:
    files = _text_files(path, follow_symlinks)
    # documents are named relative to the files' common directory: the split survives a move
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    names = [f.resolve().relative_to(root).as_posix() for f in files]

    def docs():
        for f, name in zip(files, names):
            if f.suffix.lower() == ".jsonl":
                for n, text in _jsonl_documents(f):
                    yield f"{name}:{n}", lambda text=text: iter((text,))
            else:
                yield name, lambda f=f: _decoded(f)

    src = _Documents(docs, "text-" + _file_fingerprint(files))
    if not src.n_docs:
        raise ValueError(f"data_path={path!r} (data='text') is empty: its {len(files)} file(s) hold no text")
    how = "documents hashed" if src.hashed else "cut by position"
    src.info = {"files": len(files), "documents": src.n_docs, "split": how}
    src.description = f"text {path!r} ({len(files)} files, {src.n_docs} documents)"
    return src


class _Enwik8(Source):
    """The bytes of enwik8 (plain, .gz or .zip), cut 90 / 5 / 5 % by position."""

    is_bytes = True

    def __init__(self, path: str):
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data_path={path!r} (data='enwik8') does not exist or is not a file")
        self.path, self.shown = p, path
        name = p.name.lower()
        if name.endswith(".zip"):
            with self._guard(), zipfile.ZipFile(p) as z:
                self.size = z.getinfo(self._member(z)).file_size
        elif name.endswith(".gz"):
            self.size = sum(len(raw) for raw in self._read())
        else:
            self.size = p.stat().st_size
        if not self.size:
            raise ValueError(f"data_path={path!r} (data='enwik8') is empty")
        self.fingerprint = "enwik8-" + _file_fingerprint([p])
        self.description = f"enwik8 ({self.size:,} bytes)"
        self.info = {"path": str(p.resolve()), "bytes": self.size}

    def _guard(self):
        return _ReadErrors(f"data_path={str(self.path)!r} could not be read as enwik8")

    def _member(self, z: zipfile.ZipFile) -> str:
        members = [m for m in z.namelist() if not m.endswith("/")]
        member = next((m for m in members if Path(m).name == "enwik8"), None)
        if member is None and len(members) == 1:
            member = members[0]
        if member is None:
            raise ValueError(
                f"data_path={str(self.path)!r}: the zip holds {members[:5]}, expected one file named enwik8"
            )
        return member

    def _read(self):
        name = self.path.name.lower()
        with self._guard():
            if name.endswith(".zip"):
                with zipfile.ZipFile(self.path) as z, z.open(self._member(z)) as f:
                    yield from iter(lambda: f.read(READ_SIZE), b"")
            else:
                opener = gzip.open if name.endswith(".gz") else open
                with opener(self.path, "rb") as f:
                    yield from iter(lambda: f.read(READ_SIZE), b"")

    def pieces(self, only: str | None = None):
        cuts, pos = _position_cuts(self.size), 0
        for raw in self._read():
            for split, part in _cut(raw, pos, cuts):
                if only is None or split == only:
                    yield split, part
            pos += len(raw)
            if only == "train" and pos >= cuts[0]:
                return


class _ReadErrors:
    """Turns the errors of reading a compressed file into a ValueError with ``message``."""

    def __init__(self, message: str):
        self.message = message

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, (OSError, EOFError, zipfile.BadZipFile, zlib.error)):
            raise ValueError(f"{self.message}: {e}") from None
        return False


def _check_source(source: str, path: str | None) -> None:
    if source not in ("stdlib", "enwik8", "text"):
        raise ValueError(f"data={source!r} is not allowed: data must be one of ('stdlib', 'enwik8', 'text')")
    if source != "stdlib" and not path:
        raise ValueError(f"data={source!r} needs --data-path (data_path=...)")


def open_source(source: str, path: str | None = None, follow_symlinks: bool = False) -> Source:
    """The :class:`Source` of ``source`` ("stdlib", "enwik8", "text") read from ``path`` (the files
    are found and validated now; their content is read when :meth:`Source.pieces` is iterated)."""
    _check_source(source, path)
    if source == "stdlib":
        return _stdlib_source()
    if source == "enwik8":
        return _Enwik8(path)
    return _text_source(path, follow_symlinks)


@dataclass
class Corpus:
    """The three splits of a source as text (``str``) or raw bytes (enwik8), in memory."""

    splits: dict  # split -> str | bytes
    fingerprint: str  # identifies the source's content (paths, sizes, mtimes)
    description: str
    info: dict


def load_corpus(source: str, path: str | None = None, follow_symlinks: bool = False) -> Corpus:
    """The splits of ``source`` held in memory (for inspection; :func:`prepare_data` streams them)."""
    src = open_source(source, path, follow_symlinks)
    parts = {s: [] for s in SPLITS}
    for split, piece in src.pieces():
        parts[split].append(piece)
    empty = b"" if src.is_bytes else ""
    return Corpus({s: empty.join(p) for s, p in parts.items()}, src.fingerprint, src.description, src.info)


def source_fingerprint(source: str, path: str | None = None, follow_symlinks: bool = False) -> str:
    """A cheap fingerprint of the source's files (no reading): names, sizes, mtimes."""
    _check_source(source, path)
    if source == "stdlib":
        return _stdlib_fingerprint()
    if source == "enwik8":
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data_path={path!r} (data='enwik8') does not exist or is not a file")
        return "enwik8-" + _file_fingerprint([p])
    return "text-" + _file_fingerprint(_text_files(path, follow_symlinks))


# ---- tokenisation and the cache, as the pieces come ----------------------------------------------------
def _dtype_for(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else (np.uint16 if vocab_size <= 2**16 else np.uint32)


def _chunks(text: str, size: int = CHUNK):
    """Pieces of about ``size`` characters cut after a newline (what a BPE encodes at a time)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


class _Chunker:
    """Cuts a stream of text into the pieces :func:`_chunks` cuts the whole text into."""

    def __init__(self, size: int = CHUNK):
        self.size, self.buf, self.n = size, [], 0

    def feed(self, piece: str) -> list[str]:
        self.buf.append(piece)
        self.n += len(piece)
        if self.n <= self.size:
            return []
        text, start, out = "".join(self.buf), 0, []
        while len(text) - start > self.size:
            end = start + self.size
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
            out.append(text[start:end])
            start = end
        rest = text[start:]
        self.buf, self.n = ([rest] if rest else []), len(rest)
        return out

    def finish(self) -> list[str]:
        text = "".join(self.buf)
        self.buf, self.n = [], 0
        return [text] if text else []


def _text_chunks(pieces, is_bytes: bool):
    """The :func:`_chunks` of a split given as pieces (bytes decoded, undecodable bytes replaced)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace") if is_bytes else None
    chunker = _Chunker()
    for piece in pieces:
        yield from chunker.feed(dec.decode(piece) if dec else piece)
    if dec:
        yield from chunker.feed(dec.decode(b"", final=True))
    yield from chunker.finish()


_SPACE_BYTES = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)


class _SplitWriter:
    """Token ids of one split written to ``path`` as its pieces come; counts tokens, bytes, words."""

    def __init__(self, tok, path: Path, is_bytes: bool):
        self.tok, self.dtype, self.is_bytes = tok, _dtype_for(tok.vocab_size), is_bytes
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.tokens = self.bytes = self.words = 0
        self.after_space = True  # the stream so far ends in white space (or is empty)
        bpe = not isinstance(tok, ByteTokenizer)
        self.chunker = _Chunker() if bpe else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if bpe and is_bytes else None
        self.pending: list[str] = []

    def write(self, piece) -> None:
        if not piece:
            return
        raw = piece if self.is_bytes else piece.encode("utf-8")
        self.bytes += len(raw)
        self._count_words(piece)
        if self.chunker is None:
            self._ids(np.frombuffer(raw, dtype=np.uint8))
            return
        text = self.decoder.decode(piece) if self.decoder else piece
        self.pending += self.chunker.feed(text)
        if len(self.pending) >= ENCODE_BATCH:
            self._encode()

    def _count_words(self, piece) -> None:
        """Words as ``str.split`` (bytes: ASCII white space) counts them, across piece boundaries."""
        if self.is_bytes:
            space = np.isin(np.frombuffer(piece, dtype=np.uint8), _SPACE_BYTES)
            self.words += int((~space[1:] & space[:-1]).sum() + (self.after_space and not space[0]))
            self.after_space = bool(space[-1])
        else:
            n = len(piece.split())
            if n and not self.after_space and not piece[0].isspace():
                n -= 1  # the first word goes on from the last piece
            self.words += n
            self.after_space = piece[-1].isspace()

    def _encode(self) -> None:
        for ids in self.tok.encode_batch(self.pending):
            self._ids(np.asarray(ids, dtype=self.dtype))
        self.pending = []

    def _ids(self, ids: np.ndarray) -> None:
        ids.astype(self.dtype, copy=False).tofile(self.file)
        self.tokens += len(ids)

    def close(self) -> dict:
        if self.chunker is not None:
            if self.decoder:
                self.pending += self.chunker.feed(self.decoder.decode(b"", final=True))
            self.pending += self.chunker.finish()
            self._encode()
        self.file.close()
        return {"tokens": self.tokens, "bytes": self.bytes, "words": self.words}


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
    follow_symlinks: bool = False,
) -> TokenData:
    """Tokenised splits of ``source`` (cached under ``cache_dir``), prepared in bounded memory.

    ``tokenizer`` is "bytes", "bpe" (trained on the training split with ``bpe_vocab_size`` tokens)
    or a tokenizer object (e.g. the run's own, for evaluating on other data). Every split must have
    at least ``min_tokens`` tokens (``seq_len + 1`` for training). ``follow_symlinks``: follow
    symbolic links that lead out of a ``text`` directory (or a glob's directory).
    """
    if isinstance(tokenizer, str):
        if tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"tokenizer={tokenizer!r} is not allowed: tokenizer must be 'bytes' or 'bpe'")
        specs = ["bytes"] if tokenizer == "bytes" else [f"bpe-train-{bpe_vocab_size}"]
    elif tokenizer.is_bytes:
        specs = ["bytes"]
    else:  # a given BPE: the cache of the run that trained it, or one made for it
        specs = [f"bpe-train-{tokenizer.vocab_size}", "tok-" + tokenizer.fingerprint()]
    fingerprint = source_fingerprint(source, path, follow_symlinks)
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
        src = open_source(source, path, follow_symlinks)
        log(f"preparing {src.description} -> {d}")
        if isinstance(tokenizer, str):
            if tokenizer == "bytes":
                tok = ByteTokenizer()
            else:
                train = (piece for _, piece in src.pieces(only="train"))
                tok = train_bpe(_text_chunks(train, src.is_bytes), bpe_vocab_size)
        else:
            tok = tokenizer
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}."))
        try:
            writers = {s: _SplitWriter(tok, tmp / f"{s}.bin", src.is_bytes) for s in SPLITS}
            try:
                for split, piece in src.pieces():
                    writers[split].write(piece)
            finally:
                stats = {s: w.close() for s, w in writers.items()}
            tok.save(tmp / "tokenizer.json")
            meta = {
                "source": source,
                "data_path": None if path is None else str(path),
                "fingerprint": src.fingerprint,
                "description": src.description,
                "info": src.info,
                "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size,
                "dtype": np.dtype(_dtype_for(tok.vocab_size)).name,
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
