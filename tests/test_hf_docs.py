"""docs/hf.md: every Python block runs as written, in order, in one namespace."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def test_every_python_block_of_docs_hf_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)  # the blocks write model-with-memory/, background.safetensors, ...
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
    assert (tmp_path / "model-with-memory" / "config.json").is_file()
    assert (tmp_path / "background.safetensors").is_file()
    assert namespace["loss_on"](namespace["fact"]) < namespace["fact_before"]
