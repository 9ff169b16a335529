import json
import math

import pytest
import torch

from pkmem.models import MemoryTransformer, MemoryTransformerConfig
from pkmem.optim import clip_grad_norm, make_optimizer
from pkmem.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    unflatten_state,
)
from pkmem.train.loop import lr_factor


def _model(sparse_values: bool = False, **kw) -> MemoryTransformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, seq_len=12, dim=16, n_layers=2, n_heads=2, mem_layers=(2,), **kw)
    memory = dict(heads=2, num_keys=6, topk=3, k_dim=8, sparse_values=sparse_values)
    return MemoryTransformer(MemoryTransformerConfig(**cfg, memory=memory))


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (3, 13), generator=g)
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x[:, 1:].reshape(-1)).backward()
    clip_grad_norm(model, 1.0)
    opt.step()
    opt.zero_grad()


def test_flatten_round_trip():
    obj = {
        0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)},
        "groups": [{"betas": (0.9, 0.98), "lr": 1e-3, "params": [0, 1], "name": "values", "x": None}],
        "weird": [float("nan"), float("inf"), -float("inf"), True, "s"],
    }
    structure, tensors = flatten_state(obj)
    back = unflatten_state(json.loads(json.dumps(structure)), tensors)
    assert set(back) == {0, "groups", "weird"}
    assert torch.equal(back[0]["exp_avg"], obj[0]["exp_avg"]) and back[0]["step"].dim() == 0
    assert back["groups"][0]["betas"] == (0.9, 0.98) and back["groups"][0]["x"] is None
    assert math.isnan(back["weird"][0]) and back["weird"][1:] == [float("inf"), -float("inf"), True, "s"]
    with pytest.raises(TypeError, match="set"):
        flatten_state({"a": {1, 2}})


@pytest.mark.parametrize("sparse", [False, True])
def test_save_load_continues_exactly(tmp_path, sparse):
    """Model, optimizer (AdamW or AdamW + SparseAdam) and BatchNorm statistics come back bit for bit."""
    model = _model(sparse_values=sparse, tie_embeddings=True)
    opt = make_optimizer(model, 1e-2, value_lr=1e-1)
    for s in range(2):
        _step(model, opt, s)
    save_checkpoint(tmp_path, 2, model, opt, {"config": {}}, '{"type": "bytes"}')

    other = _model(sparse_values=sparse, tie_embeddings=True)
    other_opt = make_optimizer(other, 1e-2, value_lr=1e-1)
    ck = load_checkpoint(tmp_path)
    load_model_state(other, ck["model"])
    other_opt.load_state_dict(ck["optimizer"])
    assert other.head.weight is other.tok_emb.weight  # tying survives the round trip
    for s in (2, 3):
        _step(model, opt, s)
        _step(other, other_opt, s)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_keep_and_find(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {}, "{}", keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000000002", "step_000000003"]
    assert find_checkpoint(tmp_path).name == "step_000000003"
    assert find_checkpoint(tmp_path / "checkpoints" / "step_000000002").name == "step_000000002"
    save_checkpoint(tmp_path, 3, model, None, {}, "{}", keep=2)  # the same step again replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == names
    assert not list((tmp_path / "checkpoints").glob(".*"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        find_checkpoint(tmp_path / "checkpoints")


def test_corruption_is_named(tmp_path):
    model = _model()
    ck = save_checkpoint(tmp_path, 1, model, make_optimizer(model, 1e-3), {}, "{}")
    opt_file = ck / "optimizer.safetensors"
    raw = bytearray(opt_file.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    opt_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*sha256"):
        load_checkpoint(tmp_path)
    raw[-1] ^= 0xFF
    opt_file.write_bytes(bytes(raw))
    load_checkpoint(tmp_path)  # intact again
    (ck / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer.json.* is missing"):
        load_checkpoint(tmp_path)


def test_model_mismatch_is_an_error(tmp_path):
    save_checkpoint(tmp_path, 1, _model(), None, {}, "{}")
    ck = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model_state(_model(mem_mode="parallel"), ck["model"])


def test_lr_schedules():
    assert lr_factor(1, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, "cosine", 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, "cosine", 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, "cosine", 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(40, "inverse_sqrt", 10, 100) == pytest.approx(0.5)
    assert lr_factor(90, "constant", 10, 100) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(1, "linear", 0, 10)


def test_evaluate_through_a_compiled_forward():
    """A torch.compile'd model (here dynamo with the eager backend) evaluates like the model."""
    import numpy as np

    from pkmem.train.evaluate import evaluate

    model = _model()
    tokens = (np.arange(500) % 40).astype(np.uint8)
    a = evaluate(model, tokens, 12, 4, torch.device("cpu"), max_tokens=96)
    b = evaluate(
        model,
        tokens,
        12,
        4,
        torch.device("cpu"),
        max_tokens=96,
        forward=torch.compile(model, backend="eager"),
    )
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"] == 96
    assert a["memories"][0]["usage"] == b["memories"][0]["usage"] > 0
