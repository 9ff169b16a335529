"""Settings every test shares: runs made by tests cache their data away from the user's home, and a
fixed CPU thread count (runs compared bit for bit must use the same one; pkmem otherwise chooses it
from the machine's load)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_and_threads(tmp_path_factory):
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()))
        yield
