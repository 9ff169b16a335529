"""Data is read only where the user pointed (symbolic links, loops, globs) and prepared in bounded
memory (streamed: the same token ids as the whole text at once)."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pkmem.train import data as data_lib
from pkmem.train.data import load_corpus, prepare_data

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """A corpus directory and, outside it, a private directory with a text file."""
    corpus, private = tmp_path / "corpus", tmp_path / "private"
    corpus.mkdir()
    private.mkdir()
    (corpus / "a.txt").write_text("the corpus itself\n" * 20)
    (private / "secret.txt").write_text("not for training\n" * 20)
    return corpus, private


def test_links_out_of_the_directory_are_not_followed(tmp_path):
    corpus, private = _tree(tmp_path)
    os.symlink(private / "secret.txt", corpus / "file-link.txt")
    os.symlink(private, corpus / "dir-link")
    with pytest.warns(UserWarning, match=r"2 symbolic link\(s\) leading out of .*follow_symlinks=true"):
        text = load_corpus("text", str(corpus)).splits
    assert "not for training" not in "".join(text.values())
    with pytest.warns(UserWarning, match="symbolic link"):  # the glob's directory too
        text = load_corpus("text", str(corpus / "**" / "*.txt")).splits
    assert "not for training" not in "".join(text.values())
    # asked for: followed (the file once, though two links lead to it)
    corpus_data = load_corpus("text", str(corpus), follow_symlinks=True)
    assert corpus_data.info["files"] == 2 and "not for training" in "".join(corpus_data.splits.values())


def test_a_directory_of_links_only_says_why_it_is_empty(tmp_path):
    corpus, private = _tree(tmp_path)
    (corpus / "a.txt").unlink()
    os.symlink(private / "secret.txt", corpus / "b.txt")
    with pytest.raises(
        FileNotFoundError, match=r"holds no .txt or .jsonl file \(1 symbolic link.*follow_symlinks"
    ):
        load_corpus("text", str(corpus))


def test_links_inside_the_directory_are_read_once(tmp_path):
    corpus, _ = _tree(tmp_path)
    (corpus / "sub").mkdir()
    (corpus / "sub" / "b.txt").write_text("inside\n" * 10)
    os.symlink(corpus / "sub", corpus / "sub-again")
    os.symlink(corpus / "a.txt", corpus / "sub" / "a-again.txt")
    c = load_corpus("text", str(corpus))
    assert c.info["files"] == 2


@pytest.mark.parametrize("follow", [False, True])
def test_link_loops_are_a_clear_error(tmp_path, follow):
    corpus, _ = _tree(tmp_path)
    (corpus / "sub").mkdir()
    os.symlink(corpus, corpus / "sub" / "up")
    for path in (str(corpus), str(corpus / "**" / "*.txt")):
        with pytest.raises(ValueError, match=r"'.*sub/up' leads back to .*\(a loop\)"):
            load_corpus("text", path, follow_symlinks=follow)


def test_globs(tmp_path):
    corpus, _ = _tree(tmp_path)
    (corpus / "deep" / "er").mkdir(parents=True)
    (corpus / "deep" / "er" / "c.txt").write_text("deep text\n" * 10)
    (corpus / ".hidden.txt").write_text("hidden\n" * 10)
    assert data_lib._text_files(str(corpus / "*.txt")) == [corpus / "a.txt"]
    assert data_lib._text_files(str(corpus / "**" / "*.txt")) == [corpus / "a.txt", corpus / "deep/er/c.txt"]
    assert data_lib._text_files(str(corpus / "deep" / "*" / "c.tx?")) == [corpus / "deep/er/c.txt"]
    assert data_lib._text_files(str(corpus / ".*.txt")) == [corpus / ".hidden.txt"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data_lib._text_files(str(corpus / "**" / "*.md"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data_lib._text_files(str(tmp_path / "nowhere" / "*.txt"))


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    """A raw U+2028 inside a JSON string is text (str.splitlines used to cut the line there)."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\r\n" + '{"text": "three"}\n')
    assert sorted(t for _, t in data_lib._jsonl_documents(f)) == ["one\u2028two", "three"]


def test_the_stream_is_cut_as_the_whole_text():
    rng = random.Random(0)
    text = "".join(rng.choice(["word ", "é ", "\n", "\n\n", "鍵"]) for _ in range(50_000))
    chunker, out = data_lib._Chunker(size=997), []
    pos = 0
    while pos < len(text):
        n = rng.choice([1, 5, 300, 2000, 5000])
        out += chunker.feed(text[pos : pos + n])
        pos += n
    out += chunker.finish()
    assert out == list(data_lib._chunks(text, 997))


def test_streamed_preparation_gives_the_ids_of_the_whole_text(tmp_path, monkeypatch):
    """Pieces smaller than a chunk (as a long file gives them) change no token and no count."""
    rng = random.Random(1)
    big = tmp_path / "big.txt"
    big.write_text("".join(rng.choice(["memory ", "clé ", "ключ ", "key\n", "\n\n"]) for _ in range(40_000)))
    whole = prepare_data("text", str(big), tmp_path / "a", "bpe", bpe_vocab_size=300, log=lambda *a: None)
    monkeypatch.setattr(data_lib, "READ_SIZE", 1000)  # many pieces per chunk of the tokenizer
    streamed = prepare_data("text", str(big), tmp_path / "b", "bpe", bpe_vocab_size=300, log=lambda *a: None)
    assert streamed.meta["splits"] == whole.meta["splits"]
    for s in ("train", "valid", "test"):
        assert np.array_equal(streamed.tokens(s), whole.tokens(s))
    n = len(big.read_text())
    assert whole.meta["splits"]["train"]["bytes"] == len(big.read_text()[: int(n * 0.9)].encode())


RSS_SCRIPT = textwrap.dedent(
    """
    import json, random, resource, sys
    from pathlib import Path
    from pkmem.train.data import prepare_data

    def peak_mb():  # this process's own peak (ru_maxrss also counts the parent's pages at fork)
        try:
            with open("/proc/self/status") as f:
                return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    size, tok, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzé"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    line = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) + ".\\n"
    lines = [line().encode() for _ in range(3000)]
    path = out / "corpus.txt"
    with open(path, "wb") as f:
        n = 0
        while n < size:
            block = b"".join(lines)
            f.write(block)
            n += len(block)
            lines = lines[1000:] + lines[:1000]
    before = peak_mb()
    d = prepare_data("text", str(path), out / "cache", tok, 512, log=lambda *a: None)
    after = peak_mb()
    tokens = d.meta["splits"]["train"]["tokens"]
    print(json.dumps({"bytes": n, "before_mb": before, "peak_mb": after, "tokens": tokens}))
    """
)


def _peak_rss(tmp_path: Path, size: int, tok: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(size), tok, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "size, tok, bound_mb",
    [
        (24 << 20, "bytes", 60),
        pytest.param(200 << 20, "bytes", 60, marks=pytest.mark.slow),
        (3 << 20, "bpe", 500),
    ],
)
def test_preparing_data_takes_bounded_memory(tmp_path, size, tok, bound_mb):
    """Peak RSS above the interpreter's own (torch imported) stays under a bound that does not grow
    with the file (the whole text at once took 14-18x its size). BPE: training and encoding 1M-character
    chunks (two at a time) cost a few hundred MB, whatever the size (docs/reliability.md)."""
    r = _peak_rss(tmp_path, size, tok)
    assert r["bytes"] >= size and r["tokens"] > 0.8 * size * (0.9 if tok == "bytes" else 0.2)
    assert r["peak_mb"] - r["before_mb"] < bound_mb, r
