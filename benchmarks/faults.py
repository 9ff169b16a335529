"""The fault suite: what ``pkmem`` does when a run is killed, a checkpoint is damaged, a config
value is wrong, the data is bad or a batch is not finite. CPU, tiny models; a table and a JSON of
counts per category (tried / clear error / correct / wrong).

- ``kill``: ``pkmem train`` SIGKILLed at random points (random calls of the functions that write
  checkpoints, metrics and the token cache, random steps, random times), then resumed as a user
  would (``--resume``; a run killed before its first checkpoint is started again): correct when
  the final weights, every step's loss and the final evaluation equal an uninterrupted run's bit
  for bit.
- ``checkpoint``: every file of the newest checkpoint truncated, bit-flipped, removed, swapped in
  from another run or replaced by a symbolic link, then ``pkmem train --resume`` and ``pkmem
  eval``: a clear error is one line naming the file, exit code 2, and nothing in the run changed.
- ``config``: every config key given values of a wrong type or out of range: a clear error names
  the key; the key's default written out is accepted (correct).
- ``data``: data paths that are empty, binary, not UTF-8, looping, leading out, missing: a clear
  error names the path and leaves nothing behind; a large file is prepared in bounded memory and
  links out of the directory are not read (correct).
- ``nonfinite``: NaN weights, NaN losses and NaN batches: refused, said or skipped.

A "wrong" outcome is anything else: a traceback, an unclear message, a changed file, a run that
does not come back to the same weights. ``python benchmarks/faults.py`` writes
``benchmarks/results/faults.json``; ``tests/faults/test_faults.py`` runs it in CI and requires no
wrong outcome.

    python benchmarks/faults.py [--kills 12] [--seed 0] [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

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
    "warmup_steps=2",
    "max_time_s=null",
    "tensorboard=false",
]
KILL_RUN = [
    "max_steps=8",
    "log_every=2",
    "ckpt_every=2",
    "keep_checkpoints=2",
    "eval_every=4",
    "eval_tokens=64",
    "final_eval_tokens=64",
    "dropout=0.1",
]
OUTCOMES = ("clear_error", "correct", "wrong")
CHILD_TIMEOUT = 300.0


# ---- small pieces ---------------------------------------------------------------------------------------
def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = (
        "the memory reads a few slots of a large table chosen by product keys and sums their values".split()
    )
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) + "." for _ in range(12)
        )
        (root / f"doc{i:03d}.txt").write_text(text + "\n")
    return root


def tree_digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``pkmem`` in this process: ``(exit code, stdout, stderr)``; an exception is a traceback."""
    from pkmem.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - anything escaping main is a traceback for a user
            rc = -1
            print(f"Traceback: {type(e).__name__}: {e}", file=err)
    return rc, out.getvalue(), err.getvalue()


def clear_error(rc: int, err: str, command: str, *names: str) -> bool:
    """Exit code 1 or 2, no traceback, one error line naming every one of ``names``."""
    lines = [x for x in err.splitlines() if x.startswith(f"pkmem {command}: error:")]
    return rc in (1, 2) and "Traceback" not in err and len(lines) == 1 and all(n in lines[0] for n in names)


class Tally:
    def __init__(self):
        self.categories: dict[str, dict] = {}

    def add(self, category: str, case: str, outcome: str, note: str = "") -> None:
        assert outcome in OUTCOMES
        c = self.categories.setdefault(category, {"tried": 0, **dict.fromkeys(OUTCOMES, 0), "cases": []})
        c["tried"] += 1
        c[outcome] += 1
        c["cases"].append({"case": case, "outcome": outcome, **({"note": note[:300]} if note else {})})

    def totals(self) -> dict:
        keys = ("tried", *OUTCOMES)
        return {k: sum(c[k] for c in self.categories.values()) for k in keys}


# ---- forked children: a pkmem command that can be SIGKILLed -------------------------------------------
HOOKS = {
    "train_step": ("pkmem.train.loop", "train_step"),
    "save_file": ("safetensors.torch", "save_file"),
    "write_manifest": ("pkmem.train.checkpoint", "write_manifest"),
    "os.replace": ("os", "replace"),
    "os.fsync": ("os", "fsync"),
    "rmtree": ("shutil", "rmtree"),
    "append_metrics": ("pkmem.train.loop", "_append_jsonl"),
    "token_cache_write": ("pkmem.train.data", "_SplitWriter.write"),
    "evaluate": ("pkmem.train.loop", "evaluate_split"),
}


def _install_hooks(kill: dict | None, counts: dict) -> None:
    import importlib

    for name, (module, attr) in HOOKS.items():
        owner = importlib.import_module(module)
        if "." in attr:
            cls_name, attr = attr.split(".")
            owner = getattr(owner, cls_name)
        real = getattr(owner, attr)

        def hooked(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            hit = kill and kill.get("hook") == _name and kill["call"] == counts[_name]
            if hit and kill["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = _real(*a, **k)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, attr, hooked)


def run_child(argv: list[str], log: Path, kill: dict | None = None, counts_out: Path | None = None) -> int:
    """``pkmem argv`` in a forked child (one thread, no plots); returns its exit code, -9 if killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import torch

            torch.set_num_threads(1)  # the same arithmetic in every child (and no OpenMP pool after fork)
            import pkmem.train.plot as plot

            plot.plot_runs = lambda *a, **k: []
            counts: dict = {}
            _install_hooks(kill, counts)
            if kill and "after_s" in kill:
                import threading

                threading.Timer(kill["after_s"], lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            from pkmem.cli import main

            code = main(argv)
            if counts_out is not None:
                counts_out.write_text(json.dumps(counts))
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999  # hung
        time.sleep(0.02)


def _run_state(run: Path) -> dict:
    """What a finished run computed: final weights, each step's loss, the final evaluation."""
    from safetensors.numpy import load_file

    from pkmem.train.checkpoint import list_checkpoints

    ckpt = list_checkpoints(run)[-1]
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            for i, v in enumerate(r["losses"]):
                losses[r["step"] - len(r["losses"]) + 1 + i] = v
    weights = {
        k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in load_file(ckpt / "model.safetensors").items()
    }
    final = json.loads((run / "eval_valid.json").read_text())
    return {"checkpoint": ckpt.name, "weights": weights, "losses": losses, "final_loss": final["loss"]}


# ---- kill ---------------------------------------------------------------------------------------------
def kill_suite(tally: Tally, work: Path, corpus: Path, n_kills: int, seed: int) -> None:
    rng = random.Random(seed)
    base = ["--no-progress", "--data", "text", "--data-path", str(corpus), *TINY, *KILL_RUN]
    ref = work / "kill-reference"
    counts_file = work / "kill-counts.json"
    t0 = time.perf_counter()
    rc = run_child(["train", "--out", str(ref), *base], work / "kill-reference.log", None, counts_file)
    duration = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(
            f"the reference run failed (exit {rc}): {(work / 'kill-reference.log').read_text()}"
        )
    want = _run_state(ref)
    counts = json.loads(counts_file.read_text())
    plan = []
    hooks = sorted(h for h in counts if counts[h])
    # a kill inside each step of writing a checkpoint first, then random ones
    fixed = [h for h in ("save_file", "write_manifest", "os.fsync", "os.replace", "rmtree") if h in hooks]
    for i in range(n_kills):
        if i < len(fixed):
            hook = fixed[i]
        elif i % 3 == 2:  # a random time
            plan.append({"after_s": round(rng.uniform(0.05, 0.95) * duration, 3)})
            continue
        else:  # a random call of a random writer (metrics, token cache, evaluation, steps, ...)
            hook = rng.choice(hooks)
        when = rng.choice(["before", "after"])
        plan.append({"hook": hook, "call": rng.randint(1, counts[hook]), "when": when})
    killed = 0
    for i, kill in enumerate(plan):
        run, log = work / f"kill-{i}", work / f"kill-{i}.log"
        case = json.dumps(kill)
        rc = run_child(["train", "--out", str(run), *base], log, kill)
        killed += rc == -signal.SIGKILL
        attempts = 0
        while rc != 0 and attempts < 3:  # what a user does after a crash
            attempts += 1
            from pkmem.train.checkpoint import list_checkpoints

            if list_checkpoints(run):
                rc = run_child(["train", "--out", str(run), "--resume", "--no-progress"], log)
            else:  # killed before the first checkpoint: the message says to start again
                shutil.rmtree(run, ignore_errors=True)
                rc = run_child(["train", "--out", str(run), *base], log)
        if rc != 0:
            tally.add("kill", case, "wrong", f"exit {rc} after {attempts} resumes: {log.read_text()[-300:]}")
            continue
        got = _run_state(run)
        ok = got == want
        note = "" if ok else f"differs in {[k for k in want if got.get(k) != want[k]]}"
        tally.add("kill", case, "correct" if ok else "wrong", note)
        shutil.rmtree(run, ignore_errors=True)
    tally.categories["kill"]["killed"] = killed  # trials whose run was SIGKILLed (a timer may come late)


# ---- checkpoint damage -------------------------------------------------------------------------------
def _flip(path: Path, where: float) -> None:
    raw = bytearray(path.read_bytes())
    i = min(len(raw) - 1, int(where * len(raw)))
    raw[i] ^= 0x10
    path.write_bytes(bytes(raw))


DAMAGES = {
    "truncated to half": lambda p, other: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "last byte cut": lambda p, other: p.write_bytes(p.read_bytes()[:-1]),
    "bit flipped at the start": lambda p, other: _flip(p, 0.0),
    "bit flipped in the middle": lambda p, other: _flip(p, 0.5),
    "bit flipped at the end": lambda p, other: _flip(p, 1.0),
    "removed": lambda p, other: p.unlink(),
    "swapped in from another run": lambda p, other: shutil.copyfile(other / p.name, p),
    "a symbolic link to a copy outside": lambda p, other: (p.unlink(), os.symlink(other / p.name, p)),
}


def checkpoint_suite(tally: Tally, work: Path, corpus: Path) -> None:
    from pkmem.train.checkpoint import list_checkpoints

    base = [
        "--no-progress",
        "--data",
        "text",
        "--data-path",
        str(corpus),
        *TINY,
        "max_steps=2",
        "final_eval_tokens=64",
    ]
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        runs[name] = work / f"ckpt-{name}"
        args = ["train", "--out", str(runs[name]), *base, f"seed={seed}", f"cache_dir={work / 'cache'}"]
        if run_child(args, work / f"ckpt-{name}.log") != 0:
            raise RuntimeError(f"run {name} failed: {(work / f'ckpt-{name}.log').read_text()}")
    other = list_checkpoints(runs["b"])[-1]
    names = sorted(p.name for p in list_checkpoints(runs["a"])[-1].iterdir())
    for fname in names:
        for damage, apply in DAMAGES.items():
            run = work / "ckpt-damaged"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(runs["a"], run, symlinks=True)
            ckpt = list_checkpoints(run)[-1]
            if "swapped" in damage and (ckpt / fname).read_bytes() == (other / fname).read_bytes():
                continue  # the other run's file is the same (the tokenizer, say): no damage
            apply(ckpt / fname, other)
            before = tree_digest(run)
            for command, argv in (
                ("train", ["train", "--out", str(run), "--resume", "--no-progress"]),
                ("eval", ["eval", str(run), "--max-tokens", "64"]),
            ):
                rc, _, err = cli(argv)
                unchanged = tree_digest(run) == before
                ok = clear_error(rc, err, command, fname) and unchanged
                note = "" if ok else f"exit {rc}, unchanged={unchanged}: {err.strip()[-300:]}"
                tally.add(
                    "checkpoint", f"{fname} {damage} -> {command}", "clear_error" if ok else "wrong", note
                )
    shutil.rmtree(work / "ckpt-damaged", ignore_errors=True)


# ---- config -----------------------------------------------------------------------------------------
def _bad_values(row: dict) -> list[str]:
    """Values of a wrong type for a config key, and its out-of-range values."""
    key, typ = row["key"], row["type"]
    name = key.split(".")[-1]
    vals = []
    if row["choices"]:
        vals += ["nonsense", "[1, 2]", "3.5"]
    elif typ.startswith("an int"):
        vals += ["abc", "1.5", "[1]", "{a: 1}", "true"]
    elif typ.startswith("a number"):
        vals += ["abc", "[1]", "{a: 1}", "nan", "true"]
    elif typ.startswith("true or false"):
        vals += ["maybe", "2", "[true]"]
    elif typ.startswith("a list of 2"):
        vals += ["abc", "[0.9]", "[0.9, 0.9, 0.9]", "[abc, 0.5]", "{a: 1}"]
    elif typ.startswith("a list of"):
        vals += ["abc", "[abc]", "{a: 1}", "[1.5]"]
    elif typ.startswith("a mapping"):
        vals += ["3", "[1]"]
    if "or null" not in typ and not typ.startswith("a string") and row["default"] is not None:
        vals.append("null")
    vals += RANGE.get(name, [])
    return vals


RANGE = {  # out-of-range values (the key's own constraints)
    "vocab_size": ["0", "-3"],
    "seq_len": ["0", "-1"],
    "dim": ["0", "-8"],
    "n_layers": ["0"],
    "n_heads": ["0", "3"],
    "ffn_mult": ["0", "-1"],
    "dropout": ["1.0", "-0.1"],
    "mem_layers": ["[0]", "[99]", "[2, 2]"],
    "n_memories": ["-1", "99"],
    "bpe_vocab_size": ["100", "99999999"],
    "batch_size": ["0", "-4"],
    "grad_accum": ["0"],
    "max_steps": ["0", "-1"],
    "lr": ["0", "-1e-3", "inf"],
    "value_lr": ["0", "inf"],
    "warmup_steps": ["-1"],
    "min_lr_ratio": ["-0.5", "1.5"],
    "lr_decay_steps": ["0"],
    "betas": ["[1.0, 0.9]", "[-0.1, 0.9]"],
    "value_betas": ["[0.9, 1.5]"],
    "eps": ["0", "-1"],
    "weight_decay": ["-1", "inf"],
    "value_weight_decay": ["-1"],
    "grad_clip": ["0", "-1"],
    "value_grad_clip": ["0"],
    "max_nonfinite_steps": ["0"],
    "max_time_s": ["0", "-5"],
    "log_every": ["0"],
    "eval_every": ["-1"],
    "eval_tokens": ["0"],
    "final_eval_tokens": ["0"],
    "eval_batch_size": ["0"],
    "ckpt_every": ["-2"],
    "keep_checkpoints": ["0"],
    "seed": ["-1", "1e30"],
    "heads": ["0", "-1", "abc"],
    "num_keys": ["0", "abc", "2.5"],
    "topk": ["0", "9999", "abc"],
    "k_dim": ["0", "7", "abc"],
    "v_dim": ["0", "-2"],
    "query_hidden": ["[0]", "abc", "[-3]"],
    "query_bias": ["maybe", "2"],
    "query_norm": ["bad", "3"],
    "normalize_query": ["maybe"],
    "product_keys": ["maybe"],
    "score": ["bad"],
    "temperature": ["0", "-1", "nan", "inf", "abc"],
    "gate": ["bad"],
    "input_dropout": ["1.0", "-0.5"],
    "query_dropout": ["1.5"],
    "value_dropout": ["abc"],
    "score_dropout": ["-1"],
    "sparse_values": ["maybe"],
    "zero_init_values": ["2"],
    "backend": ["cuda", "bad"],
}
EXTRA = [  # combinations and shapes of the config itself
    ("model.dim=30 n_heads=4", "n_heads"),
    ("mem_layers=[3] n_layers=2", "mem_layers"),
    ("pos_emb=rotary dim=6 n_heads=2", "n_heads"),
    ("data=stdlib data_path=/tmp/x", "data_path"),
    ("memory.sparse_values=true value_weight_decay=0.1", "value_weight_decay"),
    ("memory.bogus=1", "memory.bogus"),
    ("train.bogus=1", "bogus"),
    ("bogus=1", "bogus"),
    ("model.memory.topk.x=1", "memory.topk"),
]


def config_suite(tally: Tally) -> None:
    from pkmem.config import config_keys, load_config

    def attempt(overrides: list[str], name: str, case: str, expect_error: bool) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = load_config("tiny", overrides)
                import torch

                from pkmem.models import MemoryTransformer  # the model the config makes must build too

                with torch.device("meta"):
                    MemoryTransformer(cfg.model)
            outcome = "wrong" if expect_error else "correct"
            note = "accepted" if expect_error else ""
        except ValueError as e:
            msg = str(e)
            clear = name in msg and "\n" not in msg.strip()
            if expect_error:
                outcome, note = ("clear_error", "") if clear else ("wrong", msg[:200])
            else:
                outcome, note = "wrong", f"the default was refused: {msg[:200]}"
        except Exception as e:  # noqa: BLE001 - a traceback for a user
            outcome, note = "wrong", f"{type(e).__name__}: {e}"[:200]
        tally.add("config", case, outcome, note)

    for row in config_keys():
        key = row["key"]
        short = key.split(".")[-1] if not key.startswith("model.memory.") else "memory." + key.split(".")[-1]
        shown = short if short.startswith("memory.") else short
        for value in _bad_values(row):
            attempt([f"{key}={value}"], shown, f"{key}={value}", True)
        default = row["default"]
        if default is None:
            text = "null"
        elif isinstance(default, str):
            text = default  # a string is taken as written
        else:
            text = json.dumps(list(default) if isinstance(default, tuple) else default)
        if key not in ("train.data_path",):
            attempt([f"{key}={text}"], shown, f"{key}={text} (its default)", False)
    for overrides, name in EXTRA:
        attempt(overrides.split(), name, overrides, True)


# ---- data -------------------------------------------------------------------------------------------
def data_suite(tally: Tally, work: Path, corpus: Path, huge_mb: int) -> None:
    import gzip
    import zipfile

    d = work / "data"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n\t ")
    (d / "empty-dir").mkdir()
    (d / "md-only").mkdir()
    (d / "md-only" / "notes.md").write_text("# not text data\n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (d / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    loop = d / "loop"
    loop.mkdir()
    shutil.copy(corpus / "doc000.txt", loop / "a.txt")
    os.symlink(loop, loop / "again")
    private = work / "private"
    private.mkdir()
    (private / "secret.txt").write_text("private words never to be trained on\n" * 200)
    outside = d / "links-out"
    outside.mkdir()
    os.symlink(private / "secret.txt", outside / "secret.txt")
    (d / "enwik8-empty").write_bytes(b"")
    (d / "enwik8.gz").write_bytes(gzip.compress(random.Random(0).randbytes(100_000))[:5000])
    with zipfile.ZipFile(d / "enwik8.zip", "w") as z:
        z.writestr("a.txt", "x")
        z.writestr("b.txt", "y")
    cases = [
        ("an empty file", "text", d / "empty.txt", "is empty"),
        ("a file of white space", "text", d / "blank.txt", "is empty"),
        ("an empty directory", "text", d / "empty-dir", "holds no"),
        ("a directory without .txt / .jsonl", "text", d / "md-only", "holds no"),
        ("a binary file", "text", d / "binary.txt", "binary"),
        ("a file that is not UTF-8", "text", d / "latin1.txt", "UTF-8"),
        ("a .jsonl line that is not JSON", "text", d / "bad.jsonl", "not valid JSON"),
        ("a .jsonl line without text", "text", d / "notext.jsonl", '"text"'),
        ("a directory with a link loop", "text", loop, "loop"),
        ("a ** glob through a link loop", "text", f"{loop}/**/*.txt", "loop"),
        ("a glob that matches nothing", "text", f"{d}/md-only/**/*.nothing", "matches no file"),
        ("a directory whose only file links out", "text", outside, "follow_symlinks"),
        ("a path that does not exist", "text", d / "missing.txt", "does not exist"),
        ("an empty enwik8", "enwik8", d / "enwik8-empty", "is empty"),
        ("a truncated enwik8.gz", "enwik8", d / "enwik8.gz", "could not be read"),
        ("a zip without enwik8", "enwik8", d / "enwik8.zip", "enwik8"),
        ("a directory given as enwik8", "enwik8", d / "empty-dir", "not a file"),
    ]
    for case, source, path, what in cases:
        out = work / "data-run"
        argv = [
            "train",
            "--out",
            str(out),
            "--no-progress",
            "--data",
            source,
            "--data-path",
            str(path),
            *TINY,
        ]
        before = tree_digest(d)
        rc, _, err = cli([*argv, "max_steps=1", f"cache_dir={work / 'data-cache'}"])
        shown = str(path).split("/")[-1] if "*" not in str(path) else str(path)
        ok = (
            clear_error(rc, err, "train", what)
            and shown in err
            and not out.exists()
            and tree_digest(d) == before
        )
        tally.add(
            "data", case, "clear_error" if ok else "wrong", "" if ok else f"exit {rc}: {err.strip()[-300:]}"
        )
        shutil.rmtree(out, ignore_errors=True)

    # links out of a directory with real files: trained on the files only
    from pkmem.train.data import load_corpus

    mixed = d / "mixed"
    shutil.copytree(corpus, mixed)
    os.symlink(private / "secret.txt", mixed / "zz-secret.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_corpus("text", str(mixed)).splits
    ok = "private words" not in "".join(splits.values()) and any(
        "follow_symlinks" in str(w.message) for w in caught
    )
    tally.add("data", "a directory with a link out among its files", "correct" if ok else "wrong")

    # a large file: prepared in bounded memory (in a child, peak RSS measured)
    big = d / "big.txt"
    line = (
        " ".join(random.Random(0).choice(["memory", "keys", "values", "clé", "table"]) for _ in range(12))
        + "\n"
    ).encode()
    with open(big, "wb") as f:
        block = line * (1 << 14)
        for _ in range(max(1, (huge_mb << 20) // len(block))):
            f.write(block)
    rss = work / "rss.json"
    script = (
        "import json; from pkmem.train.data import prepare_data; "
        "hwm = lambda: next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')); "
        "b = hwm(); "
        f"prepare_data('text', {str(big)!r}, {str(work / 'big-cache')!r}, 'bytes', log=lambda *a: None); "
        f"open({str(rss)!r}, 'w').write(json.dumps({{'before_mb': b / 1024, 'peak_mb': hwm() / 1024}}))"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", script], check=False, env=os.environ)
    r = json.loads(rss.read_text()) if rss.exists() else None
    ok = r is not None and r["peak_mb"] - r["before_mb"] < 100
    tally.add(
        "data", f"a {big.stat().st_size >> 20} MB text file", "correct" if ok else "wrong", json.dumps(r)
    )
    shutil.rmtree(work / "big-cache", ignore_errors=True)
    big.unlink()


# ---- non-finite -------------------------------------------------------------------------------------
def nonfinite_suite(tally: Tally, work: Path, corpus: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from pkmem.config import load_config
    from pkmem.train.checkpoint import list_checkpoints, write_manifest
    from pkmem.train.loop import LoopState, fit, set_up

    base = [
        "--no-progress",
        "--data",
        "text",
        "--data-path",
        str(corpus),
        *TINY,
        "max_steps=2",
        "final_eval_tokens=64",
    ]
    run = work / "nf-run"
    if run_child(["train", "--out", str(run), *base, f"cache_dir={work / 'cache'}"], work / "nf.log") != 0:
        raise RuntimeError((work / "nf.log").read_text())
    ckpt = list_checkpoints(run)[-1]
    tensors = load_file(ckpt / "model.safetensors")
    pristine = dict(tensors)

    def poisoned(name: str, value: float, case: str, rc_want: int, what: str) -> None:
        save_file({**pristine, name: torch.full_like(pristine[name], value)}, ckpt / "model.safetensors")
        write_manifest(ckpt)  # checksums made to match the damage
        before = tree_digest(run)
        rc, _, err = cli(["eval", str(run), "--max-tokens", "64"])
        ok = rc == rc_want and clear_error(rc, err, "eval", what)
        tally.add(
            "nonfinite", case, "clear_error" if ok else "wrong", "" if ok else f"exit {rc}: {err[-300:]}"
        )
        for command, argv in (
            ("train", ["train", "--out", str(run), "--resume", "--no-progress", "max_steps=3"]),
        ):
            if rc_want == 2:
                rc, _, err = cli(argv)
                ok = clear_error(rc, err, command, what) and tree_digest(run) == before
                tally.add(
                    "nonfinite",
                    f"{case} -> resume",
                    "clear_error" if ok else "wrong",
                    "" if ok else err[-300:],
                )

    values = next(k for k in tensors if k.endswith("values"))
    head = next(k for k in tensors if k.startswith("head"))
    poisoned(
        values,
        float("nan"),
        "NaN weights in a checkpoint (checksums matching) -> eval",
        2,
        "non-finite weights",
    )
    poisoned(head, float("inf"), "infinite weights in a checkpoint -> eval", 2, "non-finite weights")
    poisoned(head, 3e38, "finite weights whose loss overflows -> eval", 1, "the loss is nan")
    save_file(pristine, ckpt / "model.safetensors")
    write_manifest(ckpt)

    # training: a NaN batch is skipped, a run of them stops the run; no checkpoint holds NaN
    def loop_case(case: str, bad_steps: set, expect: str, *extra: str) -> None:
        out = work / f"nf-{len(bad_steps)}-{len(extra)}"
        cfg = load_config(
            "tiny", [*TINY, "data=text", f"data_path={corpus}", f"cache_dir={work / 'cache'}", "max_steps=8",
                     "log_every=2", "ckpt_every=2", "final_eval_tokens=64", "max_nonfinite_steps=3", *extra]
        )  # fmt: skip
        r = set_up(cfg, out, None, False, lambda *a: None)
        state = LoopState(step=0, lr=cfg.train.lr)
        forward = r.forward
        r.forward = lambda x: (
            forward(x) * (float("nan") if r.model.training and state.step in bad_steps else 1.0)
        )
        lines: list[str] = []
        try:
            fit(r, state, lines.append)
            outcome = "correct" if expect == "correct" else "wrong"
        except FloatingPointError as e:
            outcome = "clear_error" if expect == "error" and "max_nonfinite_steps" in str(e) else "wrong"
        from pkmem.train.checkpoint import load_checkpoint

        finite = all(torch.isfinite(t).all() for t in load_checkpoint(out)["model"].values())
        said = expect != "correct" or any("skipped" in x for x in lines)
        tally.add(
            "nonfinite", case, outcome if finite and said else "wrong", "" if finite else "NaN checkpoint"
        )

    loop_case("a NaN loss at steps 3 and 5 (skipped, said)", {3, 5}, "correct")
    loop_case("NaN losses from step 4 on (the run stops)", set(range(4, 100)), "error")
    for values in ("lazy_adam", "exact_adam"):
        loop_case(
            f"a NaN loss at step 3, value_optimizer={values}", {3}, "correct", f"value_optimizer={values}"
        )

    # a NaN token in a training batch of a layer with BatchNorm: its running statistics stay finite
    from pkmem import ProductKeyMemory

    torch.manual_seed(0)
    mem = ProductKeyMemory(32, heads=2, num_keys=8, topk=4, k_dim=16)
    for bad in (float("nan"), float("inf")):
        mem.train()
        mem(torch.randn(2, 20, 32))
        stats = [t.clone() for t in mem.buffers()]
        x = torch.randn(2, 20, 32)
        x[0, 3, 5] = bad
        mem(x)
        kept = all(torch.equal(a, b) for a, b in zip(stats, mem.buffers()))
        mem.eval()
        finite = bool(torch.isfinite(mem(torch.randn(2, 20, 32))).all())
        case = f"a {bad} token in a BatchNorm training batch (statistics kept, eval finite)"
        tally.add("nonfinite", case, "correct" if kept and finite else "wrong")


# ---- the whole suite --------------------------------------------------------------------------------
def run_suite(out: Path | None, n_kills: int = 12, seed: int = 0, huge_mb: int = 48, log=print) -> dict:
    t0 = time.perf_counter()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="pkmem-faults-") as tmp:
        work = Path(tmp)
        corpus = make_corpus(work / "corpus")
        timings = {}
        for name, fn in (
            ("kill", lambda: kill_suite(tally, work, corpus, n_kills, seed)),  # forks first
            ("checkpoint", lambda: checkpoint_suite(tally, work, corpus)),
            ("nonfinite", lambda: nonfinite_suite(tally, work, corpus)),
            ("config", lambda: config_suite(tally)),
            ("data", lambda: data_suite(tally, work, corpus, huge_mb)),
        ):
            t = time.perf_counter()
            fn()
            timings[name] = round(time.perf_counter() - t, 1)
    import torch

    import pkmem

    result = {
        "totals": tally.totals(),
        "categories": {
            k: {
                **{m: v[m] for m in ("tried", *OUTCOMES, "killed") if m in v},
                "seconds": timings[k],
                "cases": v["cases"],
            }
            for k, v in tally.categories.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
        "pkmem": pkmem.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    log(f"{'category':<12}{'tried':>7}{'clear error':>13}{'correct':>9}{'wrong':>7}{'seconds':>9}")
    for k, v in result["categories"].items():
        log(f"{k:<12}{v['tried']:>7}{v['clear_error']:>13}{v['correct']:>9}{v['wrong']:>7}{v['seconds']:>9}")
    t = result["totals"]
    log(
        f"{'total':<12}{t['tried']:>7}{t['clear_error']:>13}{t['correct']:>9}{t['wrong']:>7}{result['seconds']:>9}"
    )
    for k, v in result["categories"].items():
        for c in v["cases"]:
            if c["outcome"] == "wrong":
                log(f"WRONG {k}: {c['case']}: {c.get('note', '')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=12, help="SIGKILL trials (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--huge-mb", type=int, default=48, help="size of the large text file (default 48)")
    p.add_argument("--out", default="benchmarks/results/faults.json")
    args = p.parse_args()
    result = run_suite(Path(args.out), args.kills, args.seed, args.huge_mb)
    sys.exit(1 if result["totals"]["wrong"] else 0)


if __name__ == "__main__":
    main()
