"""PNG plots of runs: loss curves, memory usage and KL per layer, speed vs perplexity (Figure 4 style).

Every curve and point is labelled with its run and the run's data (``stdlib``, ``enwik8``, the text
files' name) and tokenizer; losses are in bits per byte for byte-level runs and bits per token
otherwise, and runs on different data or tokenizers never share a perplexity axis unlabelled:
speed vs perplexity gets one panel per data set. Memory layers are 1-based, as in configs.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from pkmem._util import atomic_write_bytes

__all__ = ["read_metrics", "plot_runs", "run_info", "loss_figure", "memory_figure", "speed_figure"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a line cut by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory: {str(path)!r} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{str(path)!r} line {n} is not a record: not a metrics file of pkmem train")
        needed = {"train": ("step", "tokens"), "eval": ("step", "loss")}.get(rec.get("type"), ())
        missing = [k for k in needed if not isinstance(rec.get(k), (int, float))]
        if rec.get("type") == "train" and not ("loss" in rec or rec.get("losses")):
            missing.append("loss")
        if missing:
            raise ValueError(
                f"{str(path)!r} line {n}: a {rec['type']} record without {', '.join(map(repr, missing))}: "
                "not a metrics file written by pkmem train"
            )
        out.append(rec)
    return out


def _final_eval(run_dir: Path, records: list[dict]) -> dict | None:
    path = run_dir / "eval_valid.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    evals = [r for r in records if r.get("type") == "eval"]
    return evals[-1] if evals else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def run_info(run_dir: str | os.PathLike) -> dict:
    """``{"name", "data", "tokenizer", "per"}`` of a run: its directory's name, its data as a short
    label (``stdlib``, ``enwik8``, ``text:<file or directory name>``), its tokenizer, and what a
    token is (``byte`` or ``token``); read from the run's ``config.json`` (unknown: ``?``)."""
    run_dir = Path(run_dir)
    train = _read_json(run_dir / "config.json").get("train", {})
    data = train.get("data", "?")
    if data == "text" and train.get("data_path"):
        data = f"text:{Path(str(train['data_path']).rstrip('/*')).name or train['data_path']}"
    tokenizer = train.get("tokenizer", "bytes" if data != "?" else "?")
    return {
        "name": run_dir.name or str(run_dir),
        "data": data,
        "tokenizer": tokenizer,
        "per": "byte" if tokenizer == "bytes" else "token",
    }


def _label(info: dict, final: dict | None = None) -> str:
    label = f"{info['name']} ({info['data']}" + (", BPE" if info["tokenizer"] == "bpe" else "") + ")"
    if final and final.get("stopped_early"):
        label += f", stopped at step {final.get('step')}"
        label += f" of {final['max_steps']}" if final.get("max_steps") else ""
    return label


def _save(fig, path: Path) -> Path:
    """The figure as a PNG, written atomically (the file gets the user's umask)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _unit(infos: list[dict]) -> str:
    """The loss unit of these runs: bits per byte, bits per token, or (mixed) each run's own."""
    pers = {i["per"] for i in infos}
    return f"bits per {pers.pop()}" if len(pers) == 1 else "bits per token (each run's tokenizer)"


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.png``, ``memory.png`` (if a run has memories) and ``speed_ppl.png`` (2+ runs with a
    final evaluation) to ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    written = []
    for name, make in (
        ("loss.png", loss_figure),
        ("memory.png", memory_figure),
        ("speed_ppl.png", speed_figure),
    ):
        fig = make(runs)
        if fig is not None:
            written.append(_save(fig, out_dir / name))
            plt.close(fig)
    return written


def loss_figure(runs: list[tuple[Path, list[dict]]]):
    """Training (per step) and validation (points) loss against training tokens."""
    import matplotlib.pyplot as plt

    ln2 = math.log(2)
    infos = [run_info(d) for d, _ in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (d, recs), info in zip(runs, infos):
        label = _label(info, _final_eval(d, recs))
        tr = [r for r in recs if r.get("type") == "train"]
        xs, ys = [], []
        for r in tr:
            losses = r.get("losses") or [r["loss"]]
            per = r["tokens"] / max(1, r["step"])
            first = r["step"] - len(losses) + 1
            xs += [(first + i) * per for i in range(len(losses))]
            ys += [v / ln2 for v in losses]
        line = ax.plot(xs, ys, lw=0.8, alpha=0.8, label=f"{label} train")[0] if xs else None
        ev = [r for r in recs if r.get("type") == "eval" and r.get("split", "valid") == "valid"]
        if ev and tr:
            per = tr[-1]["tokens"] / max(1, tr[-1]["step"])
            ax.plot(
                [r["step"] * per for r in ev],
                [r["loss"] / ln2 for r in ev],
                "o--",
                color=line.get_color() if line else None,
                label=f"{label} valid",
            )
    unit = _unit(infos)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"loss ({unit})")
    groups = {(i["data"], i["tokenizer"]) for i in infos}
    ax.set_title(
        "loss" if len(groups) == 1 else "loss: the runs' data differ, their losses are not comparable"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def memory_figure(runs: list[tuple[Path, list[dict]]]):
    """Usage and KL of each memory layer during training, and at the final validation; None when no
    run has a memory."""
    import matplotlib.pyplot as plt

    with_mem = [(d, recs) for d, recs in runs if any(r.get("memories") for r in recs)]
    if not with_mem:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for d, recs in with_mem:
        label = _label(run_info(d))
        tr = [r for r in recs if r.get("type") == "train" and r.get("memories")]
        layers = sorted({m.get("layer") for r in tr for m in r["memories"]}, key=lambda v: (v is None, v))
        for layer in layers:
            xs = [r["tokens"] for r in tr]
            us = [next((m["usage"] for m in r["memories"] if m.get("layer") == layer), math.nan) for r in tr]
            ks = [next((m["kl"] for m in r["memories"] if m.get("layer") == layer), math.nan) for r in tr]
            axes[0].plot(xs, [100 * u for u in us], label=f"{label} layer {layer}")
            axes[1].plot(xs, ks, label=f"{label} layer {layer}")
    axes[0].set_title("usage during training (per log window)")
    axes[0].set_ylabel("usage (% of slots read)")
    axes[0].set_ylim(0, 105)
    axes[1].set_title("KL to uniform during training")
    axes[1].set_ylabel("KL to uniform (nats)")
    for ax in axes[:2]:
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    # final evaluation: one group of bars per layer
    finals = [(d, _final_eval(d, recs)) for d, recs in with_mem]
    finals = [(d, f) for d, f in finals if f and f.get("memories")]
    width = 0.8 / max(1, len(finals))
    for i, (d, f) in enumerate(finals):
        xs = [j + i * width for j in range(len(f["memories"]))]
        axes[2].bar(xs, [100 * m["usage"] for m in f["memories"]], width, label=_label(run_info(d), f))
        for x, m in zip(xs, f["memories"]):
            axes[2].text(x, 100 * m["usage"], f"KL {m['kl']:.2f}", ha="center", va="bottom", fontsize=7)
        axes[2].set_xticks(xs, [f"layer {m.get('layer', m.get('module'))}" for m in f["memories"]])
    axes[2].set_title("validation: usage and KL (nats) per memory layer")
    axes[2].set_ylabel("usage (% of slots read)")
    axes[2].set_xlabel("memory layer (1-based)")
    axes[2].set_ylim(0, 115)
    if finals:
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    return fig


def speed_figure(runs: list[tuple[Path, list[dict]]]):
    """Validation perplexity against inference tokens/s, one point per run (the paper's Figure 4),
    one panel per data set and tokenizer; None with fewer than two runs evaluated."""
    import matplotlib.pyplot as plt

    points: dict[tuple, list] = {}
    for d, recs in runs:
        f = _final_eval(d, recs)
        if f and f.get("tokens_per_s"):
            info = run_info(d)
            points.setdefault((info["data"], info["tokenizer"], info["per"]), []).append((info, f))
    if sum(len(p) for p in points.values()) < 2:
        return None
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.2), squeeze=False)
    for ax, ((data, tokenizer, per), group) in zip(axes[0], sorted(points.items())):
        for info, f in group:
            ax.scatter([f["tokens_per_s"]], [f["ppl"]])
            ax.annotate(_label(info, f), (f["tokens_per_s"], f["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("inference tokens/s" + (" (1 token = 1 byte)" if per == "byte" else f" ({tokenizer})"))
        ax.set_ylabel(f"validation perplexity (per {per})")
        ax.set_title(f"data: {data}" + (f", {tokenizer} tokenizer" if tokenizer != "bytes" else ", bytes"))
        ax.grid(alpha=0.3)
    if len(points) > 1:
        fig.suptitle(
            "speed vs perplexity: one panel per data set (perplexities across panels are not comparable)"
        )
    fig.tight_layout()
    return fig
