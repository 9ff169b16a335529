"""Clear errors of the command and the model where there were tracebacks."""

import json

import torch

from pkmem.cli import main
from pkmem.models import MemoryTransformer, MemoryTransformerConfig


def test_plot_of_records_without_tokens(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 2, "loss": 3.0}) + "\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.jsonl' line 1: a train record without 'tokens'" in err and len(err.splitlines()) == 1
    (run / "metrics.jsonl").write_text("[1, 2]\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 2
    assert "line 1 is not a record" in capsys.readouterr().err


def test_a_tiny_temperature_samples_greedily():
    torch.manual_seed(0)
    cfg = MemoryTransformerConfig(vocab_size=40, seq_len=12, dim=16, n_layers=1, n_heads=2, mem_layers=[])
    model = MemoryTransformer(cfg).eval()
    idx = torch.randint(0, 40, (2, 5))
    greedy = model.generate(idx, 6, temperature=0)
    for t in (1e-39, 1e-45, 5e-324):
        out = model.generate(idx, 6, temperature=t, top_k=5, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, greedy)
