import random
from pathlib import Path

import pytest

WORDS = (
    "the memory layer reads a few slots of a large table selected by product keys and adds their "
    "values weighted by a softmax over the scores of the selected keys while the rest of the network "
    "stays a plain transformer with attention and feed forward blocks"
).split()


def make_corpus(root: Path, n_docs: int = 100, seed: int = 0) -> Path:
    """A directory of small deterministic text documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(12)]
        (root / f"doc{i:03d}.txt").write_text(" ".join(sentences).capitalize() + "\n")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session (the stdlib is tokenised once)."""
    return tmp_path_factory.mktemp("pkmem-cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))
