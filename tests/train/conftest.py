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


TINY = [
    "dim=32",
    "n_heads=2",
    "n_layers=2",
    "seq_len=32",
    "mem_layers=[2]",
    "memory.num_keys=8",
    "memory.topk=4",
    "memory.k_dim=16",
    "memory.heads=2",
    "batch_size=4",
    "log_every=2",
    "warmup_steps=2",
    "eval_tokens=128",
    "final_eval_tokens=128",
    "max_time_s=null",
    "tensorboard=false",
    "track_usage=false",
]  # a model small enough that a few steps take well under a second on a CPU


def quick_train(run_dir: Path, corpus: Path, cache_dir: Path, *overrides: str, make_memory=None) -> dict:
    """``pkmem train`` of a tiny model on ``corpus`` in-process, quietly and without plots."""
    from unittest import mock

    from pkmem.config import load_config
    from pkmem.train.loop import train

    args = [*TINY, "data=text", f"data_path={corpus}", f"cache_dir={cache_dir}", "max_steps=2", *overrides]
    with mock.patch("pkmem.train.plot.plot_runs", lambda *a, **k: []):
        return train(
            load_config("tiny", args), run_dir, progress=False, log=lambda *a: None, make_memory=make_memory
        )
