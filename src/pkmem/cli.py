"""The ``pkmem`` command: ``train``, ``eval``, ``bench``, ``plot``, ``generate``, and for Hugging Face
models ``finetune`` and ``count-slots`` (:mod:`pkmem.hf.cli`).

``pkmem train`` with no arguments trains the ``tiny`` preset on Python's standard library (a few
minutes on a laptop CPU) and prints validation bits per byte, memory usage and KL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

from pkmem._util import DistributedError, atomic_write_bytes, not_allowed

__all__ = ["main", "build_parser"]


def _max_tokens(text: str) -> int | None:
    """``--max-tokens``: a positive int, or ``all`` (the whole split, returned as None)."""
    if text.strip().lower() in ("all", "full"):
        return None
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of tokens nor 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: --max-tokens must be >= 1 or 'all'")
    return value


EVAL_TOKENS = 262_144  # pkmem eval's default: about 40 s for the main job's run on 2 busy CPU cores
THREADS_HELP = "CPU threads (default: the cores other programs leave free; OMP_NUM_THREADS is respected)"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _eval_tokens(text: str) -> int | str:
    """``--eval-tokens``: a positive int, or ``all``."""
    value = _max_tokens(text)
    return "all" if value is None else value


def _add_hf_parsers(sub) -> None:
    """``pkmem finetune`` and ``pkmem count-slots`` (run by :mod:`pkmem.hf.cli`: it imports transformers)."""
    f = sub.add_parser(
        "finetune",
        help="continue training a local Hugging Face model with memories added (or sparse memory finetuning)",
        usage="pkmem finetune --model DIR --data-path PATH --out RUN [options] [memory.KEY=VALUE ...]\n"
        "       pkmem finetune --out RUN --resume [--max-steps N]",
        description="Train a local transformers causal LM (a save_pretrained directory with its tokenizer; "
        "nothing is downloaded) with product-key memories, on text files, as pkmem train does: progress bar, "
        "RUN/metrics.jsonl (loss, lr, gradient norms, memory usage and KL), atomic checkpoints, exact "
        "--resume, Ctrl-C saves a checkpoint; RUN/model is the final model (pkmem.hf.from_pretrained loads "
        "it). memory.KEY=VALUE arguments set the added memories' options (ProductKeyMemory's arguments: "
        "memory.heads=4 memory.num_keys=256 memory.topk=32 memory.k_dim=256 ...). Unset flags take the "
        "defaults shown, or with --resume the run's settings.",
    )
    m = f.add_argument_group("model and memories")
    m.add_argument(
        "--model",
        metavar="DIR",
        help="local model directory (config.json, safetensors weights, tokenizer files); a model with pkmem "
        "memories (saved after pkmem.hf.add_memory) loads with them",
    )
    m.add_argument(
        "--memory-layers",
        type=_ints,
        metavar="I,J",
        help="0-based indices of the blocks that get a memory (model.layers.I); needed unless the model "
        "has memories",
    )
    m.add_argument(
        "--mode",
        choices=["parallel", "replace"],
        help="parallel (default): the memory's output is added to the block's MLP and starts at zero, so "
        "the model is unchanged until it trains; replace: the memory replaces the MLP",
    )
    d = f.add_argument_group("data")
    d.add_argument("--data", choices=["text"], help="data source (default: text)")
    d.add_argument(
        "--data-path",
        metavar="PATH",
        help="text file, directory (its .txt and .jsonl files) or glob, read and split into train / valid "
        "as pkmem train --data text does",
    )
    d.add_argument(
        "--valid-path",
        metavar="PATH",
        help="held-out text to validate on (e.g. the background data, to see what is forgotten); then the "
        "model trains on all of --data-path (a small file of new facts is not split)",
    )
    t = f.add_argument_group("training")
    t.add_argument(
        "--max-steps",
        metavar="N",
        type=int,
        help="optimizer steps (with --resume: continue up to it; default 1000)",
    )
    t.add_argument("--batch-size", metavar="N", type=int, help="sequences per step (default 8)")
    t.add_argument("--seq-len", metavar="N", type=int, help="tokens per sequence (default 512)")
    t.add_argument(
        "--lr",
        metavar="LR",
        type=float,
        help="AdamW learning rate of everything but the values (default 1e-4)",
    )
    t.add_argument(
        "--value-lr", metavar="LR", type=float, help="learning rate of the memory values (default 1e-3)"
    )
    t.add_argument("--weight-decay", metavar="WD", type=float, help="AdamW weight decay (default 0)")
    t.add_argument(
        "--warmup-steps", metavar="N", type=int, help="linear warm-up steps, then constant rates (default 0)"
    )
    t.add_argument(
        "--grad-clip", metavar="NORM", type=float, help="gradient norm clip, the values apart (default 1.0)"
    )
    t.add_argument(
        "--seed", metavar="N", type=int, help="seed of the new memories, the batches and dropout (default 0)"
    )
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto (default): bf16 autocast on cuda, fp32 on cpu",
    )
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default: auto)")
    t.add_argument("--threads", metavar="N", type=int, help=THREADS_HELP)
    sp = f.add_argument_group(
        "sparse memory finetuning",
        "train only the value rows that the data reads much more than the background does (TF-IDF), "
        "everything else frozen (Lin et al. 2025); the model must have memories",
    )
    sp.add_argument(
        "--sparse-memory", type=int, metavar="TOP_T", help="value rows trained per table and step"
    )
    sp.add_argument(
        "--background", metavar="FILE", help="slot counts of the model on background data (pkmem count-slots)"
    )
    sp.add_argument("--sparse-lr", type=float, metavar="LR", help="learning rate of the rows (required)")
    sp.add_argument(
        "--sparse-optimizer",
        choices=["sgd", "adamw"],
        help="sgd (default: the paper found it better) or adamw",
    )
    r = f.add_argument_group("run")
    r.add_argument("--out", metavar="RUN", help="run directory: new or empty (with --resume: the run)")
    r.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    r.add_argument("--log-every", metavar="N", type=int, help="steps between metrics records (default 10)")
    r.add_argument(
        "--ckpt-every", metavar="N", type=int, help="steps between checkpoints (default 0: at the end only)"
    )
    r.add_argument("--keep-checkpoints", metavar="N", type=int, help="checkpoints kept (default 1)")
    r.add_argument(
        "--eval-every",
        metavar="N",
        type=int,
        help="steps between validation evaluations (default 0: at the end)",
    )
    r.add_argument(
        "--eval-tokens",
        type=_eval_tokens,
        metavar="N|all",
        help="validation tokens per evaluation, in windows spread over the split (default 262,144)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")

    c = sub.add_parser(
        "count-slots",
        help="count how often background text reads each memory slot (for finetune --background)",
        description="Run a local model with pkmem memories on windows of background text and count, for "
        "every slot of every value table, how many batches read it and how often: the file pkmem finetune "
        "--sparse-memory TOP_T --background FILE ranks slots against (TF-IDF). Count on the model you "
        "will finetune.",
    )
    c.add_argument("--model", required=True, metavar="DIR", help="local model directory with pkmem memories")
    c.add_argument("--data", choices=["text"], default="text", help="data source (default: text)")
    c.add_argument("--data-path", required=True, metavar="PATH", help="text file, directory or glob")
    c.add_argument("--out", required=True, metavar="FILE", help="the counts to write (safetensors)")
    c.add_argument(
        "--split",
        choices=["train", "valid", "all"],
        default="train",
        help="split of the text (default: train)",
    )
    c.add_argument(
        "--max-tokens",
        type=_max_tokens,
        default=EVAL_TOKENS,
        metavar="N|all",
        help=f"about N tokens in windows spread over the split (default {EVAL_TOKENS:,}); 'all': all",
    )
    c.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="windows per batch, a 'document' of TF-IDF (default 1: when every document reads most slots, "
        "their idf is 0 and the ranking picks rows the new data barely reads)",
    )
    c.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.add_argument("--threads", type=int, help=THREADS_HELP)
    c.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pkmem",
        description="Language models with product-key memories: train, evaluate, benchmark, plot, generate; "
        "finetune Hugging Face models with memories.",
        epilog="`pkmem train` alone trains the tiny preset on Python's standard library on the CPU.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model (default: the tiny preset on Python's standard library)",
        usage="pkmem train [options] [key=value ...]",
        description="Train a MemoryTransformer. key=value arguments override config keys "
        "(model.* or train.*; `--help-config` lists them).",
    )
    t.add_argument("--config", default=None, help="preset name or YAML file (default: tiny)")
    t.add_argument("--data", choices=["stdlib", "enwik8", "text"], help="data source (default: the config's)")
    t.add_argument("--data-path", help="enwik8 file (.gz/.zip ok), or text file / directory / glob")
    t.add_argument("--out", help="run directory (default: runs/<config>-<data>-<timestamp>)")
    t.add_argument(
        "--max-steps",
        type=int,
        help="optimizer steps (with --resume: continue up to this step); a preset's max_time_s may stop "
        "the run earlier: add max_time_s=null to run every step",
    )
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default: the config's, auto)")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    t.add_argument("--threads", type=int, help=THREADS_HELP + "; a resumed run keeps its own")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with the value this command would use (the --config preset with "
        "the flags and key=value given), what it takes and what it does, then exit",
    )

    e = sub.add_parser(
        "eval", help="evaluate a run or checkpoint: loss, ppl, bits per byte, usage, KL, speed"
    )
    e.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint directory")
    e.add_argument("--data", choices=["stdlib", "enwik8", "text"], help="data (default: the run's)")
    e.add_argument("--data-path", help="path for --data enwik8 / text")
    e.add_argument("--split", default="valid", choices=["valid", "test"], help="split (default: valid)")
    e.add_argument(
        "--max-tokens",
        type=_max_tokens,
        default=EVAL_TOKENS,
        metavar="N|all",
        help=f"evaluate about N tokens in windows spread evenly over the split (default {EVAL_TOKENS:,}); "
        "'all' for the whole split",
    )
    e.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=int, help=THREADS_HELP)
    e.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    e.add_argument(
        "--output", help="write the JSON here (default: a new <run>/evals/<split>-<data>-<time>.json)"
    )

    b = sub.add_parser(
        "bench",
        help="inference speed of configurations side by side (paper Figure 4)",
        usage="pkmem bench [options] [key=value ...]",
        description="Forward speed of the --config model and of variants with other layer counts, widths "
        "and memory counts. The preset's memory placement is kept where its layer and memory counts "
        "are; other combinations spread the memories evenly (the paper's §4.3).",
    )
    b.add_argument("--config", default="tiny", help="base preset or YAML file (default: tiny)")
    b.add_argument("--layers", type=_ints, help="comma-separated layer counts (default: the config's)")
    b.add_argument("--dims", type=_ints, help="comma-separated model dims (default: the config's)")
    b.add_argument(
        "--memories", type=_ints, help="comma-separated memory counts (default: 0 and the config's)"
    )
    b.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    b.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--threads", type=int, help=THREADS_HELP)
    b.add_argument(
        "--repeats", type=int, default=5, help="timed forwards; the median is reported (default 5)"
    )
    b.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
    b.add_argument(
        "--tokens-per-word",
        type=float,
        help="also report words/s = tokens/s / this (e.g. 5.5 bytes per word of English text)",
    )
    b.add_argument("--out", help="also write the results as JSON to this file")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")

    pl = sub.add_parser("plot", help="PNG plots of runs: loss curves, usage and KL, speed vs perplexity")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="output directory (default: <RUN_DIR>/plots for one run, else plots/)")

    g = sub.add_parser(
        "generate",
        help="sample text from a trained run (streamed as it is generated)",
        description="Continue --prompt with tokens sampled from the run's newest checkpoint, printed as "
        "they come. The attention keeps its keys and values (a KV cache): one token per step.",
    )
    g.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    g.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument(
        "--top-k", type=int, default=40, help="sample from the k likeliest tokens; 0 = all (default 40)"
    )
    g.add_argument(
        "--top-p", type=float, help="sample from the likeliest tokens that reach this probability (nucleus)"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    g.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    g.add_argument("--threads", type=int, help=THREADS_HELP)
    g.add_argument(
        "--no-cache", action="store_true", help="run the whole context for every token (slow; for comparison)"
    )
    _add_hf_parsers(sub)
    return p


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _infer_data(data: str | None, data_path: str | None) -> str | None:
    """``--data-path`` alone means enwik8 for a file named enwik8*, else text."""
    if data is not None or data_path is None:
        return data
    return "enwik8" if Path(data_path).name.lower().startswith("enwik") else "text"


def _cmd_train(args, overrides: list[str]) -> int:
    """The flags become ``key=value`` overrides before the user's own: one way into the config."""
    from pkmem.config import load_config
    from pkmem.train.loop import resume, train

    data = _infer_data(args.data, args.data_path)
    flags = {"data": data, "data_path": args.data_path, "device": args.device, "seed": args.seed}
    flags.update(max_steps=args.max_steps, threads=args.threads)
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + overrides
    if args.help_config:
        from pkmem.config import describe_keys, list_presets

        name = args.config or "tiny"
        print(
            f"pkmem train --config {name}{''.join(' ' + o for o in overrides)}: the value of every config "
            "key (* = not the default: the config or the command line sets it), what it does and [what "
            f"it takes]. Override with key=value. Presets: {', '.join(list_presets())}.\n"
        )
        print(describe_keys(load_config(name, overrides)))
        return 0
    if args.resume:
        resume(args.out, overrides, config_name=args.config, progress=not args.no_progress)
    else:
        train(load_config(args.config or "tiny", overrides), args.out, progress=not args.no_progress)
    return 0


def _cmd_eval(args) -> int:
    from pkmem.train.loop import evaluate_run

    if args.batch_size is not None and args.batch_size < 1:
        raise not_allowed("--batch-size", args.batch_size, ">= 1")
    _check_output_file("--output", args.output)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    threads = _set_threads(args.threads, log)
    res = evaluate_run(
        args.run,
        _infer_data(args.data, args.data_path),
        args.data_path,
        args.split,
        args.max_tokens,
        args.batch_size,
        args.device,
        log=log,
        progress=not args.no_progress,
    )
    res["cpu_threads"] = threads
    text = json.dumps(res, indent=1, allow_nan=True)
    run_dir = Path(res["checkpoint"]).parent.parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # by default a new file in the run's evals/: never the training's own eval_valid.json
    out = Path(args.output) if args.output else run_dir / "evals" / f"{args.split}-{res['data']}-{stamp}.json"
    if args.output or (run_dir / "metrics.jsonl").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, text.encode())
    if args.json:
        print(text)
        return _eval_status(res)
    per = "byte" if res["bpb"] is not None else "token"
    rows = [
        ("checkpoint", res["checkpoint"]),
        ("data / split", f"{res['data']} / {res['split']}"),
        (
            "tokens",
            f"{res['tokens']:,} of {res['split_tokens']:,}" if res.get("split_tokens") else res["tokens"],
        ),
        (f"loss (nats per {per})", res["loss"]),
        (f"perplexity (per {per})", res["ppl"]),
        (f"bits per {per}", res["bits_per_token"]),
        ("tokens/s" if per == "token" else "tokens/s (= bytes/s)", res["tokens_per_s"]),
    ]
    for m in res["memories"]:
        rows.append((f"memory layer {m['layer']} usage", f"{100 * m['usage']:.1f}%"))
        rows.append((f"memory layer {m['layer']} KL", m["kl"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {_fmt(v)}")
    print(f"(JSON: {out})" if out.exists() else "")
    return _eval_status(res)


def _eval_status(res: dict) -> int:
    """The exit code of ``pkmem eval``: 1 (with a message) when the loss is not finite."""
    if math.isfinite(res["loss"]):
        return 0
    print(
        f"pkmem eval: error: the loss is {res['loss']} on {res['tokens']} tokens: the model gives non-finite "
        "outputs on this data",
        file=sys.stderr,
    )
    return 1


def _cmd_bench(args, overrides: list[str]) -> int:
    from pkmem.config import load_config
    from pkmem.train.bench import bench_models, environment
    from pkmem.train.evaluate import resolve_device

    if args.seq_len is not None and args.seq_len < 1:
        raise not_allowed("--seq-len", args.seq_len, ">= 1")
    if args.warmup < 0:
        raise not_allowed("--warmup", args.warmup, ">= 0")
    if args.memories is not None and not args.memories:
        raise not_allowed("--memories", "", "at least one memory count, e.g. 0,1")
    _check_output_file("--out", args.out)
    extra = [f"seq_len={args.seq_len}"] if args.seq_len is not None else []
    cfg = load_config(args.config, extra + list(args.overrides) + overrides)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise not_allowed(f"--{name.replace('_', '-')}", getattr(args, name), ">= 1")
    if args.tokens_per_word is not None and not args.tokens_per_word > 0:
        raise not_allowed("--tokens-per-word", args.tokens_per_word, "> 0")
    device = resolve_device(args.device)
    _set_threads(args.threads, print)
    n_mem = len(cfg.model.memory_layers())
    memories = args.memories if args.memories is not None else sorted({0, n_mem})
    print(
        f"pkmem bench --config {cfg.name}: forward of {args.batch_size} x {cfg.model.seq_len} tokens, "
        f"median of {args.repeats} after {args.warmup} untimed; device {device}"
    )
    rows = bench_models(
        cfg.model,
        args.layers or [cfg.model.n_layers],
        args.dims or [cfg.model.dim],
        memories,
        args.batch_size,
        device,
        cfg.train.precision,
        args.warmup,
        args.repeats,
        args.tokens_per_word,
        log=print,  # the table, a row at a time
    )
    if args.out:
        out = {"config": cfg.name, "env": environment(device), "tokens_per_word": args.tokens_per_word}
        out["rows"] = rows
        atomic_write_bytes(Path(args.out), json.dumps(out, indent=1).encode())
        print(f"wrote {args.out}")
    return 0


def _cmd_plot(args) -> int:
    from pkmem.train.plot import plot_runs

    out = args.out or (str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else "plots")
    for p in plot_runs(args.runs, out):
        print(p)
    return 0


def _cmd_generate(args) -> int:
    from pkmem.train.generate import stream_text

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise not_allowed("--temperature", args.temperature, "a finite number >= 0")
    if args.top_k < 0:
        raise not_allowed("--top-k", args.top_k, ">= 0 (0: all tokens)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise not_allowed("--top-p", args.top_p, "in (0, 1]")
    if args.max_new_tokens < 0:
        raise not_allowed("--max-new-tokens", args.max_new_tokens, ">= 0")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise not_allowed("--prompt", args.prompt, "valid UTF-8 text") from None
    _set_threads(args.threads, None)
    pieces = stream_text(
        args.run,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        args.seed,
        args.device,
        use_cache=not args.no_cache,
    )
    first = next(pieces, "")  # the model is loaded: errors come before any output
    sys.stdout.write(args.prompt + first)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _set_threads(requested: int | None, log) -> int:
    """Set torch's CPU threads (see :func:`pkmem.train.evaluate.choose_threads`)."""
    from pkmem.train.evaluate import set_threads

    return set_threads(requested, log)


def _check_output_file(flag: str, path: str | None) -> None:
    """An output path must name a file (checked before any work is done)."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{flag} {path!r} is a directory: it must be the path of a file to write")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pkmem`` command; returns the exit code (2 for bad input)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = []
    for item in extra:
        if args.command in ("train", "bench", "finetune") and "=" in item and not item.startswith("-"):
            overrides.append(item)
        else:
            parser.error(f"unrecognized argument {item!r}")
    with warnings.catch_warnings():  # a warning (an old config key, ...) is one line, as errors are
        warnings.showwarning = lambda message, *a, **k: print(
            f"pkmem {args.command}: warning: {message}", file=sys.stderr
        )
        return _run(args, overrides)


def _run(args, overrides: list[str]) -> int:
    try:
        if args.command == "train":
            return _cmd_train(args, overrides)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "bench":
            return _cmd_bench(args, overrides)
        if args.command == "plot":
            return _cmd_plot(args)
        if args.command == "finetune":
            from pkmem.hf.cli import finetune_command

            return finetune_command(args, overrides)
        if args.command == "count-slots":
            from pkmem.hf.cli import count_slots_command

            return count_slots_command(args)
        return _cmd_generate(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"pkmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency of the train extra
        print(
            f"pkmem {args.command}: error: {e}: install the training extras with pip install 'pkmem[train]'",
            file=sys.stderr,
        )
        return 1
    except OSError as e:  # disk full, permissions, ...: the run keeps its last complete checkpoint
        print(f"pkmem {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pkmem {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, DistributedError) as e:  # DistributedError: another rank's failure
        print(f"pkmem {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
