"""docs/hf.md: every Python block runs as written, in order, in one namespace, and every `pkmem` command
of its bash blocks in the same directory at its place."""

import pathlib
import re
import shlex

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pkmem.cli import main  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def _commands(bash: str) -> list[list[str]]:
    """The ``pkmem`` command lines of a bash block (lines continued with a backslash joined)."""
    lines = bash.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("pkmem ")]


def test_every_python_block_and_pkmem_command_of_docs_hf_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(), re.S)
    assert sum(kind == "python" for kind, _ in blocks) >= 6
    monkeypatch.chdir(tmp_path)  # the blocks write model-with-memory/, background.safetensors, ...
    namespace: dict = {}
    commands = 0
    for i, (kind, code) in enumerate(blocks):
        if kind == "python":
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
            continue
        for argv in _commands(code):
            assert main([*argv, "--no-progress"]) == 0, argv
            commands += 1
    assert commands >= 4
    assert (tmp_path / "notes-run" / "model" / "config.json").is_file()
    assert (tmp_path / "model-with-memory" / "config.json").is_file()
    assert (tmp_path / "background.safetensors").is_file()
    assert namespace["loss_on"](namespace["fact"]) < namespace["fact_before"]
