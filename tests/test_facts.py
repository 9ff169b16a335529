"""pkmem.tasks.facts (the synthetic fact task) and benchmarks/facts.py (the capacity benchmark)."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pkmem.tasks import HELDOUT_TEMPLATE, SEPARATOR, TRAIN_TEMPLATES, FactSet, evaluate_recall, make_facts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "facts.py"


# ---- the generator --------------------------------------------------------------------------------
def test_make_facts_is_seeded_unique_and_nested():
    a, b = make_facts(600, 20, seed=3), make_facts(600, 20, seed=3)
    assert a.names == b.names and a.values == b.values and np.array_equal(a.answers, b.answers)
    assert len(set(a.names)) == 600 and len(set(a.values)) == 20
    assert len({len(v.encode()) for v in a.values}) == 1 and a.value_bytes == 7
    assert set(a.answers.tolist()) <= set(range(20)) and len(set(a.answers.tolist())) == 20
    c = make_facts(600, 20, seed=4)
    assert c.names != a.names and not np.array_equal(c.answers, a.answers)
    small = make_facts(250, 20, seed=3)  # nested: a prefix of the larger set
    assert small.names == a.names[:250] and np.array_equal(small.answers, a.answers[:250])
    assert small.values == a.values and make_facts(10, 5, seed=3).values == a.values[:5]


def test_names_and_cities_are_pronounceable_words():
    f = make_facts(2000, 50, seed=0)
    word = re.compile(r"^[BDFGHKLMNPRSTVZ][aeiou](?:[bdfghklmnprstvz][aeiou])+[nls]?$")
    city_words = set(f.values)
    for name in f.names:
        first, last = name.split(" ")
        assert word.match(first) and word.match(last), name
        assert first not in city_words and last not in city_words
        assert 9 <= len(name) <= 15
    assert all(re.match(r"^[A-Z][a-z]{6}$", v) and v[-1] in "rtmk" for v in f.values)


def test_bad_arguments_name_the_argument():
    for kwargs, name in [
        ({"n_facts": 0}, "n_facts"),
        ({"n_facts": 10, "n_values": 1}, "n_values"),
        ({"n_facts": 10, "seed": -1}, "seed"),
        ({"n_facts": 2.5}, "n_facts"),
        ({"n_facts": 10, "templates": ("{name} lives somewhere",)}, "templates"),
        ({"n_facts": 10, "heldout_template": "{value} is home to {name}."}, "heldout_template"),
        ({"n_facts": 10, "heldout_template": TRAIN_TEMPLATES[0]}, "heldout_template"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}="):
            make_facts(**kwargs)
    with pytest.raises(ValueError, match="^names="):
        FactSet(["Ab", "Ab"], ["xy", "zw"], [0, 1])
    with pytest.raises(ValueError, match="^values="):
        FactSet(["Ab", "Cd"], ["xy", "zwv"], [0, 1])
    with pytest.raises(ValueError, match="^answers="):
        FactSet(["Ab", "Cd"], ["xy", "zw"], [0, 2])
    f = make_facts(20, 5)
    with pytest.raises(ValueError, match="^step="):
        f.batch(-1, 2, 8)
    with pytest.raises(ValueError, match="^batch_size="):
        f.batch(0, 0, 8)
    with pytest.raises(ValueError, match="^ids="):
        f.subset([0, 0])
    with pytest.raises(ValueError, match="^template="):
        f.prompt(0, 7)


def test_sentences_prompts_and_text_agree():
    f = make_facts(40, 6, seed=1)
    text = f.text(seed=5)
    lines = text.split(SEPARATOR)
    assert lines[-1] == "" and len(lines) - 1 == 40 * len(TRAIN_TEMPLATES)
    expected = {f.sentence(i, t) for i in range(40) for t in range(len(TRAIN_TEMPLATES))}
    assert set(lines[:-1]) == expected and f.text(seed=5) == text and f.text(seed=6) != text
    assert "resident" not in text  # the held-out phrasing is never trained on
    for i in (0, 17, 39):
        name, value = f.fact(i)
        for t in [*range(len(TRAIN_TEMPLATES)), "heldout"]:
            sentence = f.sentence(i, t)
            assert name in sentence and sentence.endswith(value + ".")
            assert f.prompt(i, t) + value + "." == SEPARATOR + sentence
    assert f.prompt(3, "heldout") == SEPARATOR + HELDOUT_TEMPLATE.split("{value}")[0].format(name=f.names[3])
    sub = f.subset([5, 2])
    assert sub.names == (f.names[5], f.names[2]) and sub.fact(1) == f.fact(2) and sub.values == f.values


def test_batch_is_a_pure_function_of_seed_and_step():
    f = make_facts(300, 10, seed=0)
    b = f.batch(7, 16, 40, seed=1)
    assert b.shape == (16, 41) and b.dtype == np.int64 and b.min() >= 0 and b.max() < 256
    assert np.array_equal(b, make_facts(300, 10, seed=0).batch(7, 16, 40, seed=1))  # a fresh set too
    assert not np.array_equal(b, f.batch(8, 16, 40, seed=1))
    assert not np.array_equal(b, f.batch(7, 16, 40, seed=2))
    assert np.array_equal(f.batch(3, 4, 40), f.batch(3, 4, 40))
    sentences = {f.sentence(i, t) for i in range(300) for t in range(len(TRAIN_TEMPLATES))}
    for row in f.batch(2, 32, 120):
        parts = bytes(row.astype(np.uint8)).decode().split(SEPARATOR)
        assert all(p in sentences for p in parts[1:-1])  # every whole line is a training sentence
        assert any(s.endswith(parts[0]) for s in sentences) and any(
            s.startswith(parts[-1]) for s in sentences
        )


def test_query_ids():
    f = make_facts(100, 5)
    assert np.array_equal(f.query_ids(), np.arange(100)) and np.array_equal(f.query_ids(500), np.arange(100))
    q = f.query_ids(30, seed=2)
    assert (
        len(set(q.tolist())) == 30 and np.all(np.diff(q) > 0) and np.array_equal(q, f.query_ids(30, seed=2))
    )
    assert not np.array_equal(q, f.query_ids(30, seed=3))


# ---- recall ---------------------------------------------------------------------------------------
class Oracle:
    """Knows every fact: at the prompt of fact i (any template) it predicts the bytes of its value."""

    def __init__(self, facts: FactSet, templates):
        self.answer = {
            f.prompt(i, t).encode(): f.fact(i)[1].encode()
            for f in [facts]
            for i in range(len(facts))
            for t in templates
        }
        self.calls = 0

    def __call__(self, idx):
        self.calls += 1
        logits = torch.zeros(*idx.shape, 256)
        for b, row in enumerate(idx.tolist()):
            raw = bytes(row)
            for p in {len(k) for k in self.answer}:
                value = self.answer.get(raw[:p])
                if value is not None:
                    for k, byte in enumerate(value):
                        logits[b, p - 1 + k, byte] = 10.0
        return logits


def test_recall_of_a_model_that_knows_the_facts_is_one():
    f = make_facts(30, 7, seed=2)
    oracle = Oracle(f, [0, "heldout"])
    for template in (0, "heldout"):
        r = evaluate_recall(oracle, f, template, batch_size=20)  # 2 queries (x 7 values) per call
        assert r.recall == 1.0 and r.n_queries == 30 and r.margin_nats > 10
        assert r.answer_nats_per_byte == pytest.approx(math.log(1 + 255 * math.exp(-10)), rel=1e-4)
        assert r.facts_recalled == 30 and r.facts_above_chance == 30 and r.stderr == 0.0
    assert oracle.calls == 2 * 15
    r = evaluate_recall(Oracle(f, [1]), f, 0)  # knows the facts in another phrasing only: guesses
    assert r.recall < 1.0


def test_recall_of_a_uniform_model_is_chance_with_ties_split():
    f = make_facts(50, 8, seed=0)
    r = evaluate_recall(lambda x: torch.zeros(*x.shape, 256), f, ids=f.query_ids(20))
    assert r.recall == pytest.approx(1 / 8) and r.chance == 1 / 8 and np.allclose(r.correct, 1 / 8)
    assert r.margin_nats == 0.0 and r.answer_nats_per_byte == pytest.approx(math.log(256))
    assert r.facts_above_chance == 0.0 and r.n_queries == 20 and r.n_facts == 50


def test_recall_hand_computed():
    f = FactSet(
        ["Ab", "Cd"],
        ["xy", "zw"],
        [0, 1],
        templates=["{name} is in {value}."],
        heldout_template="{name}: {value}",
    )

    def model(idx):  # every position: logit 1 for "x", 2 for "y", 0 for the rest
        logits = torch.zeros(*idx.shape, 256)
        logits[..., ord("x")], logits[..., ord("y")] = 1.0, 2.0
        return logits

    lse = math.log(254 + math.e + math.e**2)
    xy, zw = (1 - lse) + (2 - lse), -2 * lse  # log-likelihoods of the two values
    r = evaluate_recall(model, f)
    assert r.recall == 0.5 and r.correct.tolist() == [1.0, 0.0]  # "Ab" -> xy ranks first; "Cd" -> zw does not
    assert r.margin_nats == pytest.approx(((xy - zw) + (zw - xy)) / 2)
    assert r.answer_nats_per_byte == pytest.approx(-(xy + zw) / 2 / 2)
    assert r.template == "{name} is in {value}." and r.to_dict()["recall"] == 0.5


def test_recall_on_a_memory_transformer_is_deterministic_and_keeps_train_mode():
    from pkmem.models import MemoryTransformer, MemoryTransformerConfig

    torch.manual_seed(0)
    cfg = MemoryTransformerConfig(
        seq_len=48,
        dim=32,
        n_layers=2,
        n_heads=2,
        mem_layers=(2,),
        memory={"heads": 2, "num_keys": 8, "topk": 4, "k_dim": 16},
    )
    model = MemoryTransformer(cfg)
    f = make_facts(12, 5, seed=0)
    a = evaluate_recall(model, f, "heldout", batch_size=25)
    b = evaluate_recall(model, f, "heldout", batch_size=25)
    assert model.training and a.recall == b.recall and np.array_equal(a.correct, b.correct)
    assert 0 <= a.recall <= 1 and a.answer_nats_per_byte > 0 and math.isfinite(a.margin_nats)
    with pytest.raises(ValueError, match="^model returned"):
        evaluate_recall(lambda x: torch.zeros(*x.shape, 10), f)
    with pytest.raises(ValueError, match="^ids="):
        evaluate_recall(model, f, ids=[12])
    with pytest.raises(ValueError, match="^facts="):
        evaluate_recall(model, [("Ab", "xy")])


def test_import_stays_light():
    code = "import sys, pkmem.tasks; assert 'triton' not in sys.modules and 'matplotlib' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---- the benchmark --------------------------------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("facts_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_matches_ffn_widths():
    bench = _bench()
    s = bench.DEFAULT
    assert bench.variant_names(s) == ["ffn", "ffn-flops", "ffn-params", "mem-64k", "mem-256k", "mem-1M"]
    assert (
        bench.model_config(s, "mem-1M").memory["num_keys"] == 1024
        and bench.model_config(s, "ffn").memory_layers() == ()
    )
    flops = bench.flops_per_token(bench.model_config(s, "ffn-flops"))
    assert flops == pytest.approx(bench.flops_per_token(bench.model_config(s, "mem-1M")), rel=1e-3)
    params = bench.num_params(bench.model_config(s, "ffn-params"))[0]
    assert params == pytest.approx(bench.num_params(bench.model_config(s, "mem-64k"))[0], rel=1e-3)
    with pytest.raises(ValueError, match="^variant="):
        bench.model_config(s, "mem-2M")


def test_benchmark_tiny_cpu_run_writes_results_and_resumes(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out"
    argv = ["--out", str(out), "--device", "cpu", "--tiny", "--variants", "ffn,mem-64"]
    assert bench.main([*argv, "--n-facts", "32"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"ffn", "mem-64"} and res["versions"]["torch"] and res["device"]
    run = res["runs"]["mem-64"]["32"]
    assert run["value_params"] == 64 * 32 and run["steps"] == 4 and len(run["curve"]) == 2
    for kind in ("train_template", "heldout_template"):
        assert 0 <= run["final"][kind]["recall"] <= 1 and run["final"][kind]["n_queries"] == 16
        assert kind in run["curve"][-1]
    assert "| mem-64 |" in (out / "results.md").read_text()
    assert (out / "facts.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    capsys.readouterr()
    # resumes: only mem-64 at N = 48 runs, in a worker process (the path of --jobs > 1)
    assert bench.main([*argv, "--n-facts", "32,48", "--variants", "mem-64", "--jobs", "2"]) == 0
    said = capsys.readouterr().out
    assert said.count("done already") == 1 and "mem-64 N=48: finished" in said and said.count("finished") == 1
    assert all((out / "runs" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert "step 4/4" in (out / "logs" / "mem-64-48.log").read_text()
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"mem-64"} and set(res["runs"]["mem-64"]) == {"32", "48"}
    capsys.readouterr()
    assert bench.main([*argv, "--n-facts", "32", "--variants", "ffn", "--steps", "3"]) == 0  # new settings
    said = capsys.readouterr().out
    assert "done already" not in said and "ffn N=32 step 3/3" in said
    # --report-only trains nothing: the finished runs in the table, the others named as not run
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert bench.main([*argv, "--n-facts", "32,48,64", "--report-only"]) == 0
    said = capsys.readouterr().out
    assert "mem-64 N=64: not run" in said and "ffn N=32: not run" in said and "step 4/4" not in said
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamps
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]["mem-64"]) == {"32", "48"} and res["jobs"] is None
    assert "Not run ('-'): ffn N=32, ffn N=48, ffn N=64, mem-64 N=64." in (out / "results.md").read_text()


def test_benchmark_estimate(capsys):
    assert _bench().main(["--tiny", "--estimate", "--jobs", "3"]) == 0
    said = capsys.readouterr().out
    assert "mem-256" in said and "min on one H200 with --jobs 3" in said
