"""PNG plots of runs: loss curves, memory usage and KL per layer, speed vs perplexity (Figure 4 style)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

__all__ = ["read_metrics", "plot_runs"]


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


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _label(run_dir: Path) -> str:
    return run_dir.name or str(run_dir)


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.png``, ``memory.png`` (if a run has memories) and ``speed_ppl.png`` (2+ runs with a
    final evaluation) to ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    written = []
    ln2 = math.log(2)

    # loss curves: training (per step) and validation (points), in bits per token
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for d, recs in runs:
        tr = [r for r in recs if r.get("type") == "train"]
        xs, ys = [], []
        for r in tr:
            losses = r.get("losses") or [r["loss"]]
            per = r["tokens"] / max(1, r["step"])
            first = r["step"] - len(losses) + 1
            xs += [(first + i) * per for i in range(len(losses))]
            ys += [v / ln2 for v in losses]
        line = ax.plot(xs, ys, lw=0.8, alpha=0.8, label=f"{_label(d)} train")[0] if xs else None
        ev = [r for r in recs if r.get("type") == "eval" and r.get("split", "valid") == "valid"]
        if ev and tr:
            per = tr[-1]["tokens"] / max(1, tr[-1]["step"])
            ax.plot(
                [r["step"] * per for r in ev],
                [r["loss"] / ln2 for r in ev],
                "o--",
                color=line.get_color() if line else None,
                label=f"{_label(d)} valid",
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (bits per token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)

    # memory usage and KL: during training (lines) and at the final evaluation (per layer)
    with_mem = [(d, recs) for d, recs in runs if any(r.get("memories") for r in recs)]
    if with_mem:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for d, recs in with_mem:
            tr = [r for r in recs if r.get("type") == "train" and r.get("memories")]
            layers = sorted({m["layer"] for r in tr for m in r["memories"]}, key=lambda v: (v is None, v))
            for layer in layers:
                xs = [r["tokens"] for r in tr]
                us = [
                    next((m["usage"] for m in r["memories"] if m["layer"] == layer), float("nan")) for r in tr
                ]
                ks = [next((m["kl"] for m in r["memories"] if m["layer"] == layer), float("nan")) for r in tr]
                axes[0].plot(xs, [100 * u for u in us], label=f"{_label(d)} L{layer}")
                axes[1].plot(xs, ks, label=f"{_label(d)} L{layer}")
        axes[0].set_title("usage during training (% of slots, per log window)")
        axes[0].set_ylim(0, 105)
        axes[1].set_title("KL to uniform during training")
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
            axes[2].bar(xs, [100 * m["usage"] for m in f["memories"]], width, label=f"{_label(d)} usage %")
            for x, m in zip(xs, f["memories"]):
                axes[2].text(x, 100 * m["usage"], f"KL {m['kl']:.2f}", ha="center", va="bottom", fontsize=7)
            axes[2].set_xticks(xs, [f"layer {m['layer']}" for m in f["memories"]])
        axes[2].set_title("validation: usage (%) and KL per memory")
        axes[2].set_ylim(0, 115)
        if finals:
            axes[2].legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "memory.png"))
        plt.close(fig)

    # speed vs perplexity, one point per run (Figure 4 of the paper)
    points = []
    for d, recs in runs:
        f = _final_eval(d, recs)
        if f and f.get("tokens_per_s"):
            points.append((_label(d), f["tokens_per_s"], f["ppl"], f.get("words_per_s")))
    if len(points) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        use_words = all(p[3] for p in points)
        for name, tps, ppl, wps in points:
            x = wps if use_words else tps
            ax.scatter([x], [ppl])
            ax.annotate(name, (x, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("inference words/s" if use_words else "inference tokens/s")
        ax.set_ylabel("validation perplexity (per token)")
        ax.set_title("speed vs perplexity")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "speed_ppl.png"))
        plt.close(fig)
    return written
