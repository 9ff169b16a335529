import gzip
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pkmem.train.data import eval_windows, load_corpus, prepare_data, sample_batch, unigram_bits
from pkmem.train.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

ENWIK8 = Path(os.environ.get("PKMEM_ENWIK8", Path(__file__).resolve().parents[3] / "shared/data/enwik8.gz"))
if not ENWIK8.is_file():
    ENWIK8 = Path("/work/shared/data/enwik8.gz")


# ---- edge cases of user data: each is a clear error naming the path -----------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus("text", str(tmp_path / "nothing.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus("enwik8", str(tmp_path / "enwik8.gz"))
    with pytest.raises(ValueError, match="needs --data-path"):
        load_corpus("text", None)
    with pytest.raises(ValueError, match="data='wiki' is not allowed"):
        load_corpus("wiki", "x")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus("text", str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus("text", str(tmp_path / "blank.jsonl"))
    (tmp_path / "enwik8").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus("enwik8", str(tmp_path / "enwik8"))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "notes.md").write_text("not a .txt")
    with pytest.raises(FileNotFoundError, match="holds no .txt or .jsonl"):
        load_corpus("text", str(d))


def test_binary_and_non_utf8(tmp_path):
    binary = tmp_path / "model.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"model.txt.*looks binary"):
        load_corpus("text", str(binary))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème ".encode("latin-1") * 10)
    with pytest.raises(ValueError, match=r"latin1.txt.*not valid UTF-8 \(byte 3\)"):
        load_corpus("text", str(latin))


def test_jsonl_without_text(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r'data.jsonl.* line 2 has no string "text" field'):
        load_corpus("text", str(f))
    f.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_corpus("text", str(f))
    f.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_corpus("text", str(f))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_corpus("text", str(tmp_path / "*.txt"))


def test_too_little_text_for_seq_len(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("a few words only\n" * 10)
    with pytest.raises(ValueError, match=r"split has \d+ tokens, fewer than the 1025 needed"):
        prepare_data("text", str(f), tmp_path / "cache", "bytes", min_tokens=1025)


# ---- sources and splits ---------------------------------------------------------------------------
def test_text_sources_and_deterministic_split(corpus, tmp_path):
    c1 = load_corpus("text", str(corpus))
    assert c1.info["documents"] == 100 and c1.info["split"] == "documents hashed"
    assert all(c1.splits[s] for s in ("train", "valid", "test"))
    total = sum(len(t) for t in c1.splits.values())
    assert len(c1.splits["train"]) > 0.7 * total
    c2 = load_corpus("text", str(corpus / "*.txt"))  # the same files through a glob
    assert c2.splits == c1.splits
    # no document is in two splits
    docs = {p.read_text() for p in corpus.glob("*.txt")}
    for d in docs:
        assert sum(d in c1.splits[s] for s in c1.splits) == 1
    # jsonl: each line a document
    lines = [json.dumps({"text": p.read_text(), "id": i}) for i, p in enumerate(sorted(corpus.glob("*.txt")))]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    c3 = load_corpus("text", str(tmp_path / "docs.jsonl"))
    assert c3.info["documents"] == 100 and all(c3.splits[s] for s in c3.splits)
    for d in docs:
        assert sum(d in c3.splits[s] for s in c3.splits) == 1
    # the split depends on the names relative to the corpus, not on where it lies
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, moved)
    assert load_corpus("text", str(moved)).splits == c1.splits
    # a single small file is cut by position, 90 / 5 / 5
    one = tmp_path / "one.txt"
    one.write_text("x" * 1000)
    c4 = load_corpus("text", str(one))
    assert [len(c4.splits[s]) for s in ("train", "valid", "test")] == [900, 50, 50]


def test_stdlib_source(cache_dir):
    data = prepare_data("stdlib", None, cache_dir, "bytes", min_tokens=129)
    meta = data.meta
    assert meta["info"]["files"] > 500
    assert meta["splits"]["train"]["tokens"] > 10 * meta["splits"]["valid"]["tokens"] > 0
    assert data.tokens("train").dtype == np.uint8 and data.tokenizer.vocab_size == 256
    # every valid byte decodes as UTF-8 Python source
    assert "def " in bytes(data.tokens("valid")[:100000]).decode("utf-8")
    again = prepare_data("stdlib", None, cache_dir, "bytes")
    assert again.directory == data.directory  # cached


def test_cache_is_keyed_by_source_and_tokenizer(corpus, tmp_path):
    a = prepare_data("text", str(corpus), tmp_path, "bytes")
    b = prepare_data("text", str(corpus), tmp_path, ByteTokenizer())
    assert a.directory == b.directory
    c = prepare_data("text", str(corpus), tmp_path, "bpe", bpe_vocab_size=300)
    assert c.directory != a.directory and c.tokenizer.vocab_size <= 300
    d = prepare_data("text", str(corpus), tmp_path, c.tokenizer)  # the trained BPE finds its cache
    assert d.directory == c.directory
    (corpus / "doc000.txt").write_text((corpus / "doc000.txt").read_text() + " more.\n")
    e = prepare_data("text", str(corpus), tmp_path, "bytes")
    assert e.directory != a.directory  # the source changed


def _fake_enwik8(n: int) -> bytes:
    return bytes((i * 7 + i // 13) % 95 + 32 for i in range(n))


@pytest.mark.parametrize("kind", ["plain", "gz", "zip"])
def test_enwik8_formats_and_split(tmp_path, kind):
    raw = _fake_enwik8(20000)
    if kind == "plain":
        path = tmp_path / "enwik8"
        path.write_bytes(raw)
    elif kind == "gz":
        path = tmp_path / "enwik8.gz"
        path.write_bytes(gzip.compress(raw))
    else:
        path = tmp_path / "enwik8.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("enwik8", raw)
    c = load_corpus("enwik8", str(path))
    assert c.splits == {"train": raw[:18000], "valid": raw[18000:19000], "test": raw[19000:]}


def test_enwik8_bad_file(tmp_path):
    bad = tmp_path / "enwik8.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="could not be read as enwik8"):
        load_corpus("enwik8", str(bad))
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a", b"1")
        f.writestr("b", b"2")
    with pytest.raises(ValueError, match="expected one file named enwik8"):
        load_corpus("enwik8", str(z))


@pytest.mark.skipif(not ENWIK8.is_file(), reason=f"enwik8 not found at {ENWIK8} (set PKMEM_ENWIK8)")
def test_real_enwik8_standard_split(tmp_path):
    data = prepare_data("enwik8", str(ENWIK8), tmp_path, "bytes")
    sizes = [data.meta["splits"][s]["tokens"] for s in ("train", "valid", "test")]
    assert sizes == [90_000_000, 5_000_000, 5_000_000]
    assert bytes(data.tokens("train")[:15]) == b"<mediawiki xmln"


# ---- tokenizers -------------------------------------------------------------------------------------
def test_bpe_round_trip(corpus, tmp_path):
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    tok = train_bpe(texts, 320)
    assert 256 < tok.vocab_size <= 320
    for s in ["the memory layer reads", "ünïcödé — ✓ 漢字 emoji 🚀", "  leading spaces\n\ttabs\r\n", ""]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode())  # it learned merges
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.fingerprint() == tok.fingerprint() and again.encode(texts[1]) == tok.encode(texts[1])
    data = prepare_data("text", str(corpus), tmp_path / "cache", "bpe", bpe_vocab_size=320)
    assert data.tokens("train").dtype == np.uint16
    assert (
        data.tokenizer.decode(data.tokens("valid").tolist())
        == load_corpus("text", str(corpus)).splits["valid"]
    )
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9] and tok.decode([0xC3, 0xA9]) == "é"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character does not raise


# ---- batches ----------------------------------------------------------------------------------------
def test_batches_are_a_function_of_the_step():
    tokens = np.arange(1000, dtype=np.uint16) % 256
    a = sample_batch(tokens, 4, 16, seed=0, step=5)
    assert a.shape == (4, 17) and a.dtype == np.int64
    assert np.array_equal(a, sample_batch(tokens, 4, 16, seed=0, step=5))
    assert not np.array_equal(a, sample_batch(tokens, 4, 16, seed=0, step=6))
    assert not np.array_equal(a, sample_batch(tokens, 4, 16, seed=1, step=5))
    assert not np.array_equal(a, sample_batch(tokens, 4, 16, seed=0, step=5, micro=1))
    assert all(np.array_equal(np.diff(row) % 256, np.ones(16) % 256) for row in a)  # contiguous windows
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(tokens[:10], 1, 16, 0, 0)


def test_eval_windows():
    starts = eval_windows(1001, 100)
    assert list(starts) == list(range(0, 1000, 100))  # every target token exactly once
    few = eval_windows(100001, 100, max_tokens=1000)
    assert len(few) == 10 and few[0] == 0 and few[-1] > 80000  # spread over the split
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(50, 100)


def test_unigram_baseline():
    train = np.array([0, 0, 0, 1], dtype=np.uint8)
    bits = unigram_bits(train, np.array([0, 1]), vocab_size=2)
    p0, p1 = 4 / 6, 2 / 6  # add-one
    assert bits == pytest.approx(-(np.log2(p0) + np.log2(p1)) / 2)
