"""`pkmem eval` (progress, --max-tokens), `pkmem generate` (KV cache, sampling, streaming),
`pkmem train --help-config` and the plots' labels."""

import json

import pytest
from conftest import TINY

from pkmem.cli import build_parser, main

FAST = [*TINY, "eval_tokens=256", "final_eval_tokens=512", "track_usage=true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir, corpus):
    """A tiny run on the small text corpus (its test split evaluates whole in a moment)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["train", "--out", str(out), "--no-progress", "--data", "text", "--data-path", str(corpus)]
    assert main([*argv, *FAST, f"cache_dir={cache_dir}", "max_steps=6"]) == 0
    return out


def test_eval_progress_goes_to_stderr_and_json_stays_clean(run, capsys):
    assert main(["eval", str(run), "--json", "--max-tokens", "2048"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)  # stdout is the JSON alone
    assert res["tokens"] >= 2048 and res["split_tokens"] > res["tokens"]
    assert "eval" in captured.err and "tok" in captured.err  # the tqdm bar


def test_eval_max_tokens_default_and_all(run, capsys):
    args = build_parser().parse_args(["eval", "RUN"])
    assert args.max_tokens == 262_144  # about a minute on 2 busy cores for the main job's run
    assert build_parser().parse_args(["eval", "RUN", "--max-tokens", "all"]).max_tokens is None
    assert build_parser().parse_args(["eval", "RUN", "--max-tokens", "1_000"]).max_tokens == 1000
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "RUN", "--max-tokens", bad])
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--max-tokens", "all", "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("tokens"))
    n, total = [int(v.replace(",", "")) for v in line.split() if v.replace(",", "").isdigit()]
    assert total - 32 <= n <= total  # the whole split (whole windows of seq_len 32)
    assert "bits per byte" in out and "tokens/s (= bytes/s)" in out and "words/s" not in out
    assert "text / test" in out


def test_generate_streams_with_a_kv_cache_and_sampling_options(run, capsys):
    from pkmem.train.generate import stream_text

    greedy = ["generate", str(run), "--prompt", "def f(", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(greedy) == 0
    cached = capsys.readouterr().out
    assert main([*greedy, "--no-cache"]) == 0  # 6 + 20 tokens fit the 32-token window: the same text
    assert capsys.readouterr().out == cached and cached.startswith("def f(")
    pieces = list(stream_text(str(run), "x = ", 12, temperature=0.0))
    assert len(pieces) > 1  # streamed as it is generated
    nucleus = [
        "generate",
        str(run),
        "--prompt",
        "a",
        "--max-new-tokens",
        "8",
        "--top-p",
        "0.9",
        "--top-k",
        "0",
    ]
    assert main([*nucleus, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*nucleus, "--seed", "3"]) == 0 and capsys.readouterr().out == first  # seeded
    assert main([*nucleus[:-4], "--top-p", "1.5"]) == 2
    assert "--top-p 1.5 is not allowed" in capsys.readouterr().err


def test_stream_holds_back_half_characters(run, monkeypatch):
    """A character whose UTF-8 bytes are split across tokens is printed whole."""
    import torch

    from pkmem.models import MemoryTransformer
    from pkmem.train.generate import stream_text

    euro = list("€".encode())  # 3 bytes

    def fake_stream(self, idx, n, *a, **k):
        for b in [*euro, ord("!")][:n]:
            yield torch.tensor([[b]])

    monkeypatch.setattr(MemoryTransformer, "stream", fake_stream)
    assert list(stream_text(str(run), "x", 4)) == ["€", "!"]


def test_help_config_shows_the_values_the_command_uses(capsys):
    assert main(["train", "--help-config", "--config", "tiny", "lr=0.01", "--max-steps", "20"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    assert lines["model.dim"].split()[1] == "*128" and "model width" in lines["model.dim"]
    assert lines["train.lr"].split()[1] == "*0.01" and lines["train.max_steps"].split()[1] == "*20"
    assert lines["train.max_time_s"].split()[1] == "*240.0"
    assert lines["train.grad_clip"].split()[1] == "1.0"  # a default: no mark
    assert "[one of softmax, relu, none]" in lines["model.memory.score"]
    assert "(paper)" in lines["model.memory.score"]  # from ProductKeyMemory's docstring
    assert lines["model.memory.topk"].split()[1] == "*16" and "[an int]" in lines["model.memory.topk"]
    assert "[one of null, swilu]" in lines["model.memory.gate"]
    assert "[one of pre, post]" in lines["model.norm_position"]
    assert main(["train", "--help-config", "--config", "enwik8-small"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    assert lines["model.seq_len"].split()[1] == "*512" and lines["model.mem_layers"].split()[1] == "*[5]"
    assert lines["model.dim"].split()[1] == "512"  # the preset's value is the default: no mark


def test_plots_label_units_layers_and_each_runs_data(run, tmp_path, corpus, capsys):
    import matplotlib

    matplotlib.use("Agg")
    from pkmem.train.plot import loss_figure, memory_figure, read_metrics, speed_figure

    other = tmp_path / "bpe"
    argv = ["train", "--out", str(other), "--no-progress", *FAST, "max_steps=3", "--data", "text"]
    argv += ["--data-path", str(corpus), "tokenizer=bpe", "bpe_vocab_size=300", f"cache_dir={tmp_path / 'c'}"]
    assert main(argv) == 0
    runs = [(d, read_metrics(d)) for d in (run, other)]
    ax = loss_figure(runs).axes[0]
    assert ax.get_ylabel() == "loss (bits per token (each run's tokenizer))"
    assert "not comparable" in ax.get_title()
    labels = ax.get_legend_handles_labels()[1]
    assert any(f"tiny (text:{corpus.name}) train" == x for x in labels)
    assert any(f"(text:{corpus.name}, BPE)" in x for x in labels)
    assert loss_figure(runs[:1]).axes[0].get_ylabel() == "loss (bits per byte)"
    axes = memory_figure(runs).axes
    assert (
        axes[0].get_ylabel() == "usage (% of slots read)" and axes[1].get_ylabel() == "KL to uniform (nats)"
    )
    assert "layer 2" in axes[2].get_xticklabels()[0].get_text()
    fig = speed_figure(runs)
    assert len(fig.axes) == 2  # one panel per data set: no perplexity axis shared across data
    panels = {a.get_ylabel(): a for a in fig.axes}
    assert set(panels) == {"validation perplexity (per byte)", "validation perplexity (per token)"}
    assert panels["validation perplexity (per byte)"].get_xlabel() == "inference tokens/s (1 token = 1 byte)"
    assert "bpe tokenizer" in panels["validation perplexity (per token)"].get_title()
    assert all("words" not in a.get_xlabel() for a in fig.axes)


def test_generate_benchmark_times_the_three_ways(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_benchmark", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--new-tokens", "3", "--repeats", "1", "--out", str(tmp_path / "g.json")])
    assert set(res["seconds"]) == {"before", "no_cache", "kv_cache"} and res["greedy_equal_tokens"] == 3
    assert json.loads((tmp_path / "g.json").read_text())["speedup"]["kv_cache_vs_before"] > 0
    assert "speed-up" in capsys.readouterr().out
