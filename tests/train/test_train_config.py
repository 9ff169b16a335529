import pytest
import torch

from pkmem.cli import main
from pkmem.config import PRESETS, config_from_dict, config_keys, list_presets, load_config
from pkmem.models import MemoryTransformer, MemoryTransformerConfig

SHRINK = [
    "dim=32",
    "n_heads=2",
    "n_layers=6",
    "seq_len=16",
    "memory.num_keys=8",
    "memory.topk=4",
    "memory.k_dim=16",
    "bpe_vocab_size=300",
]


def test_presets_are_shipped():
    assert sorted(PRESETS) == list_presets()


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_parses_and_builds(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.model.memory_layers(), "every preset has a memory"
    small = load_config(name, SHRINK)
    model = MemoryTransformer(small.model)
    assert [layer for layer, _, _ in model.memories()] == list(small.model.memory_layers())
    if cfg.model.mem_layers is not None:
        assert small.model.memory_layers() == cfg.model.memory_layers()
    logits = model(torch.randint(0, small.model.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, small.model.vocab_size)


def test_preset_contents_follow_the_paper_and_issue():
    ab = load_config("paper-ablation")
    mem = ab.model.memory
    assert (ab.model.n_layers, ab.model.memory_layers(), mem["num_keys"] ** 2) == (6, (5,), 512**2)
    assert (mem["heads"], mem["topk"], ab.model.n_heads) == (4, 32, 8)
    assert ab.train.betas == (0.9, 0.98) and ab.train.schedule == "inverse_sqrt" and ab.train.value_lr == 1e-3
    big = load_config("paper-12l-1024")
    assert (big.model.n_layers, big.model.dim, big.model.memory_layers()) == (12, 1024, (6,))
    e8 = load_config("enwik8-small")
    assert (e8.model.n_layers, e8.model.dim, e8.model.seq_len, e8.model.memory_layers()) == (
        6,
        512,
        512,
        (5,),
    )
    assert (e8.model.n_heads, e8.model.memory["k_dim"], e8.model.memory["num_keys"]) == (8, 512, 512)
    assert e8.model.mem_mode == "replace" and e8.train.data == "enwik8"
    tiny = load_config("tiny")
    assert tiny.train.data == "stdlib" and tiny.model.memory_layers()


def test_overrides_are_typed():
    cfg = load_config(
        "tiny",
        [
            "model.dim=64",
            "n_heads=2",
            "lr=1e-3",
            "mem_layers=[1,3]",
            "memory.gate=none",
            "model.memory.query_hidden=[64]",
            "compile=true",
            "betas=[0.8, 0.9]",
            "max_time_s=none",
            "data=text",
            "data_path=some/file.txt",
            "warmup_steps=1e2",
        ],
    )
    assert cfg.model.dim == 64 and cfg.model.n_heads == 2
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.mem_layers == (1, 3)
    assert cfg.model.memory["gate"] is None and cfg.train.compile is True
    assert cfg.model.memory["query_hidden"] == [64] and cfg.model.memory["topk"] == 16  # the preset's
    assert cfg.train.betas == (0.8, 0.9) and cfg.train.max_time_s is None
    assert cfg.train.data_path == "some/file.txt" and cfg.train.warmup_steps == 100
    globbed = load_config("tiny", ["data=text", "data_path=corpus/*.txt", "cache_dir=[x]: y"])
    assert globbed.train.data_path == "corpus/*.txt" and globbed.train.cache_dir == "[x]: y"  # as written
    assert load_config("tiny", ["data=text", "data_path=null"]).train.data_path is None
    assert load_config("tiny", ["mem_layers=3"]).model.mem_layers == (3,)
    assert load_config("tiny", ["mem_layers=[]"]).model.memory_layers() == ()


@pytest.mark.parametrize(
    "override, match",
    [
        ("dimension=3", "unknown config key 'dimension'"),
        ("lr=1e999", "lr=inf is not allowed: lr must be a finite number > 0"),
        ("max_steps=0", "max_steps=0 is not allowed"),
        ("seed=99999999999999999999", "seed=99999999999999999999 is not allowed"),
        (
            "data_path=corpus.txt",
            "data_path='corpus.txt' is not allowed: data_path must be null with data='stdlib'",
        ),
        ("model.lr=3", "model has no field 'lr'"),
        ("optim.lr=3", "unknown config section"),
        ("dim=abc", "dim='abc' is not allowed"),
        ("dim=1.5", "dim=1.5 is not allowed"),
        ("lr=fast", "lr='fast' is not allowed"),
        ("compile=maybe", "compile='maybe' is not allowed"),
        ("compile_mode=fast", "compile_mode='fast' is not allowed: compile_mode must be one of"),
        (
            "compile_mode=reduce-overhead",
            "compile_mode='reduce-overhead' is not allowed: compile_mode must be 'default' with compile=f",
        ),
        ("betas=[0.9]", "betas"),
        ("schedule=linear", "schedule='linear' is not allowed"),
        ("batch_size=0", "batch_size=0 is not allowed"),
        ("mem_mode=sideways", "mem_mode"),
        ("memory.topk=999", "memory.topk=999 is not allowed: memory.topk must be <= 128"),
        ("memory.query_norm=group", "memory.query_norm='group' is not allowed"),
        ("memory.topkk=3", "unknown config key 'memory.topkk'"),
        ("memory.dim=3", "unknown config key 'memory.dim'"),
        ("memory=3", "memory=3 is not allowed: memory must be a mapping"),
        ("model.dim.x=3", "model.dim has no fields"),
        ("mem_impl=product-key-memory", "mem_impl='product-key-memory' is not allowed"),
        ("n_heads=3", "n_heads=3 is not allowed"),
        ("lr", "must be key=value"),
    ],
)
def test_override_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", [override])


def test_cuda_graph_modes_refuse_gradient_accumulation():
    """A CUDA-graph replay would overwrite the gradients being accumulated: refused by name."""
    ok = load_config("tiny", ["compile=true", "compile_mode=max-autotune-no-cudagraphs", "grad_accum=2"])
    assert ok.train.compile_mode == "max-autotune-no-cudagraphs"
    for mode in ("reduce-overhead", "max-autotune"):
        match = f"compile_mode='{mode}' is not allowed: compile_mode must be 'default' or .* grad_accum=2"
        with pytest.raises(ValueError, match=match):
            load_config("tiny", ["compile=true", f"compile_mode={mode}", "grad_accum=2"])


def test_unknown_preset_and_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="presets are"):
        load_config("huge")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    good = tmp_path / "mine.yaml"
    good.write_text("model:\n  dim: 64\n  n_heads: 4\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(str(good))
    assert cfg.name == "mine" and cfg.model.dim == 64 and cfg.train.lr == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 64\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key model.dimm"):
        load_config(str(bad))
    worse = tmp_path / "worse.yaml"
    worse.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(worse))


def test_round_trip_through_dict():
    cfg = load_config("enwik8-small", ["data_path=x.gz"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    again = config_from_dict(cfg.to_dict(), overrides=["dim=256"])
    assert again.model.dim == 256 and cfg.model.dim == 512


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "dimension=3"], "unknown config key 'dimension'"),
        (["train", "dim=abc"], "dim='abc' is not allowed"),
        (["train", "--config", "huge"], "presets are"),
        (["train", "--max-steps", "0"], "max_steps=0 is not allowed"),
        (["train", "--data", "text"], "needs --data-path"),
        (["train", "--resume"], "--resume needs --out"),
        (["eval", "/does/not/exist"], "does not exist"),
        (["generate", "/does/not/exist"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "bench", "plot", "generate"):
        assert cmd in out
    assert main(["train", "--help-config"]) == 0  # the values the command would use, then no training
    out = capsys.readouterr().out
    assert "model.mem_layers" in out and "train.lr" in out and "tiny" in out
    assert "model.memory.topk" in out and "slots read per head" in out  # the layer's own docstring
    assert "one of cosine, inverse_sqrt, constant" in out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "wikipedia"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["plot", "a", "--bogus"])
    assert e.value.code == 2


def test_every_key_has_a_description():
    rows = config_keys()
    assert all(r["help"] for r in rows), [r["key"] for r in rows if not r["help"]]
    keys = {r["key"]: r for r in rows}
    assert keys["train.schedule"]["choices"] == ("cosine", "inverse_sqrt", "constant")
    assert keys["model.mem_layers"]["type"] == "a list of ints such as [1, 2] or null"
    assert keys["model.memory.num_keys"]["default"] == 512
    assert "model.memory.values" not in keys and "model.memory.dim" not in keys
    tiny = {r["key"]: r["default"] for r in config_keys(load_config("tiny"))}  # a preset's values
    assert (
        tiny["model.dim"] == 128
        and tiny["model.memory.topk"] == 16
        and tiny["model.memory.score"] == "softmax"
    )


OLD_MODEL = {"dim": 32, "n_heads": 2, "mem_layers": [2], "mem_impl": "pkmem", "mem_heads": 2}
OLD_MODEL.update(mem_num_keys=8, mem_topk=4, mem_k_dim=16, mem_query_norm="layernorm", mem_gate=None)


def test_old_flat_memory_keys_are_translated_with_one_notice(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "model:\n" + "".join(f"  {k}: {'null' if v is None else v}\n" for k, v in OLD_MODEL.items())
    )
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(str(old), ["mem_score=relu", "model.mem_temperature=2"])
    assert len(record) == 1  # one notice per load, naming the keys and where they were
    msg = str(record[0].message)
    assert (
        "mem_heads, mem_num_keys" in msg
        and "old.yaml" in msg
        and "mem_score, mem_temperature in overrides" in msg
    )
    expected = dict(heads=2, num_keys=8, topk=4, k_dim=16, query_norm="layernorm", gate=None, score="relu")
    assert cfg.model.memory == {**expected, "temperature": 2}
    assert cfg.model.mem_layers == (2,) and not hasattr(cfg.model, "mem_topk")
    with pytest.warns(FutureWarning):
        again = load_config(str(old))
    assert again.model.memory == {k: v for k, v in expected.items() if k != "score"}
    with pytest.raises(ValueError, match="mem_topk and memory.topk are both set"):
        load_config("tiny", ["mem_topk=4", "memory.topk=4"])
    with pytest.raises(ValueError, match="mem_impl='product-key-memory' is not allowed: .*make_memory"):
        config_from_dict({"model": {**OLD_MODEL, "mem_impl": "product-key-memory"}})


def test_new_configs_give_no_notice(recwarn):
    load_config("tiny", ["memory.topk=8", "mem_layers=[2]", "mem_mode=after", "mem_share_values=true"])
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def _memory_model(sparse_values: bool = False):
    cfg = MemoryTransformerConfig(vocab_size=20, seq_len=8, dim=16, n_layers=1, n_heads=2, mem_layers=(1,))
    cfg.memory = dict(heads=1, num_keys=4, topk=2, k_dim=8, sparse_values=sparse_values)
    return MemoryTransformer(cfg)


@pytest.mark.parametrize("value_schedule", ["same", "constant"])
def test_value_schedule(value_schedule):
    from pkmem.optim import make_optimizer
    from pkmem.train.loop import lr_factor, set_lr

    cfg = load_config("tiny", [f"value_schedule={value_schedule}", "warmup_steps=10", "max_steps=100"])
    opt = make_optimizer(_memory_model(), lr=1.0, value_lr=1.0)
    lrs = {}
    for step in (1, 5, 10, 11, 50, 100):
        base = set_lr(opt, cfg, step)
        lrs[step] = {g["name"]: g["lr"] for g in opt.param_groups}
        assert base == lrs[step]["decay"] == cfg.train.lr * lr_factor(step, "cosine", 10, 100, 0.1)
    for step in (1, 5, 10):  # the warm-up is shared
        assert lrs[step]["values"] == pytest.approx(cfg.train.value_lr * step / 10)
    for step in (11, 50, 100):
        same = cfg.train.value_lr * lr_factor(step, "cosine", 10, 100, 0.1)
        expected = same if value_schedule == "same" else cfg.train.value_lr
        assert lrs[step]["values"] == pytest.approx(expected)


@pytest.mark.parametrize("sparse", [False, True])
def test_value_betas(sparse):
    from pkmem.optim import make_optimizer

    cfg = load_config("tiny", ["value_betas=[0.5, 0.9]", "betas=[0.8, 0.95]"])
    assert cfg.train.value_betas == (0.5, 0.9) and load_config("tiny").train.value_betas is None
    opt = make_optimizer(
        _memory_model(sparse), lr=1e-3, betas=cfg.train.betas, value_betas=cfg.train.value_betas
    )
    betas = {g["name"]: g["betas"] for g in opt.param_groups}
    assert betas == {"decay": (0.8, 0.95), "no_decay": (0.8, 0.95), "values": (0.5, 0.9)}
    default = make_optimizer(_memory_model(sparse), lr=1e-3, betas=(0.8, 0.95))
    assert {g["betas"] for g in default.param_groups} == {(0.8, 0.95)}
    with pytest.raises(ValueError, match="value_betas=.* is not allowed"):
        load_config("tiny", ["value_betas=[0.5, 1.5]"])
    with pytest.raises(ValueError, match="value_betas=\\(1.0, 0.5\\) is not allowed"):
        make_optimizer(_memory_model(), lr=1e-3, value_betas=(1.0, 0.5))
