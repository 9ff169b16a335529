"""Synthetic facts: how many random ``name -> city`` facts can a language model store and recall?

A *fact set* holds ``n_facts`` people with made-up, pronounceable names (random syllables, unique)
and ``n_values`` made-up cities; each person lives in one city drawn uniformly at random. Nothing
is downloaded; everything is a function of ``seed``. The facts are written as text in a few
paraphrase templates (``TRAIN_TEMPLATES``), one sentence per line, bytes as tokens (vocab 256)::

    Kalu Dorevan lives in Tiramek.
    The home of Mesi Ralobun is Badonut.
    Where does Zora Kim live? In Solavir.

**Training**: :meth:`FactSet.batch` gives ``(batch_size, seq_len + 1)`` byte windows of randomly
drawn sentences (inputs ``[:, :-1]``, targets ``[:, 1:]``), a pure function of ``(seed, step)``:
a resumed run sees the same data. :meth:`FactSet.text` is one shuffled pass as a string, for other
pipelines.

**Recall** (:func:`evaluate_recall`): for each queried fact, the prompt is the start of a sentence
up to the city (``"\\nKalu Dorevan lives in "``) and every one of the ``n_values`` cities is scored
by the total log-likelihood of its bytes given the prompt. The fact is *recalled* when the true city
ranks first (a tie among ``t`` cities counts ``1/t``, the expectation of breaking it at random).
All cities have the same byte length, so none is favoured for being short. Chance is
``1 / n_values``. Queries in a training template test storage; queries in ``HELDOUT_TEMPLATE``,
a phrasing never seen in training, test whether the stored fact is usable beyond the phrasing
it was learnt in.

Run it on your own model (any callable ``(B, T) int64 -> (B, T, >=256)`` logits over bytes)::

    from pkmem.tasks import make_facts, evaluate_recall
    facts = make_facts(4096, n_values=100, seed=0)
    for step in range(steps):
        xy = torch.from_numpy(facts.batch(step, batch_size=256, seq_len=64))
        ...  # next-byte cross-entropy on xy[:, :-1] -> xy[:, 1:]
    r = evaluate_recall(model, facts, facts.templates[0], ids=facts.query_ids(2048))
    r.recall, r.facts_recalled, r.margin_nats

``benchmarks/facts.py`` measures the number of facts recalled against ``n_facts`` for transformers
with and without product-key memories. Fact sets are nested: the first ``k`` facts of
``make_facts(n, m, seed)`` are ``make_facts(k, m, seed)``, and :meth:`FactSet.subset` splits a set
(e.g. old facts to pretrain on, new facts to teach later).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FactSet",
    "HELDOUT_TEMPLATE",
    "Recall",
    "SEPARATOR",
    "TRAIN_TEMPLATES",
    "evaluate_recall",
    "make_facts",
]

# the facts in training text; the city ends every sentence, so a prompt is the text before it
TRAIN_TEMPLATES = (
    "{name} lives in {value}.",
    "The home of {name} is {value}.",
    "{name} has a house in {value}.",
    "Where does {name} live? In {value}.",
)
HELDOUT_TEMPLATE = "{name} is a resident of {value}."  # never in the training text
SEPARATOR = "\n"  # after every sentence; prompts start with it

_ONSETS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(o + v for o in _ONSETS for v in _VOWELS)  # 75
_NAME_CODAS = ("", "n", "l", "s")  # a name word ends with one of these
_CITY_ENDS = ("r", "t", "m", "k")  # a city ends with one of these: no city is ever a name word
_BLOCK = 4096  # candidates drawn per block: fact sets are nested (prefixes of one stream)
MAX_FACTS = 10_000_000
MAX_VALUES = len(_SYLLABLES) ** 3 * len(_CITY_ENDS)  # distinct cities of the pattern (1,687,500)


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise _bad(name, v, f"an int >= {lo}" + ("" if hi is None else f" and <= {hi:,}"))
    return int(v)


def _words(rng: np.random.Generator, n: int, min_syl: int, max_syl: int, ends: Sequence[str]) -> list[str]:
    """``n`` capitalised words of ``min_syl..max_syl`` consonant-vowel syllables and one ending."""
    k = rng.integers(min_syl, max_syl + 1, size=n)
    syl = rng.integers(0, len(_SYLLABLES), size=(n, max_syl))
    end = rng.integers(0, len(ends), size=n)
    return [("".join(_SYLLABLES[s] for s in syl[i, : k[i]]) + ends[end[i]]).capitalize() for i in range(n)]


def _unique_stream(
    n: int, seed: int, tag: int, draw: Callable[[np.random.Generator], list[str]]
) -> list[str]:
    """The first ``n`` distinct strings of the stream of blocks ``draw(default_rng([seed, tag, b]))``."""
    out: list[str] = []
    seen: set[str] = set()
    block = 0
    while len(out) < n:
        for s in draw(np.random.default_rng([seed, tag, block])):
            if s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == n:
                    break
        block += 1
    return out


def _cities(n: int, seed: int) -> list[str]:
    # three syllables and an ending: 7 bytes each, so every value has the same byte length
    return _unique_stream(n, seed, 0, lambda rng: _words(rng, _BLOCK, 3, 3, _CITY_ENDS))


def _names(n: int, seed: int) -> list[str]:
    def draw(rng):
        first = _words(rng, _BLOCK, 2, 2, _NAME_CODAS)
        last = _words(rng, _BLOCK, 2, 3, _NAME_CODAS)
        return [f"{a} {b}" for a, b in zip(first, last)]

    return _unique_stream(n, seed, 1, draw)


def _answers(n: int, n_values: int, seed: int) -> np.ndarray:
    blocks = [
        np.random.default_rng([seed, 2, b]).integers(0, n_values, size=_BLOCK) for b in range(-(-n // _BLOCK))
    ]
    return np.concatenate(blocks)[:n].astype(np.int64) if blocks else np.zeros(0, np.int64)


def check_template(template: str, name: str = "template") -> str:
    """``template`` must hold ``{name}`` once, then ``{value}`` once, and no other braces."""
    ok = isinstance(template, str) and template.count("{name}") == 1 and template.count("{value}") == 1
    if ok:
        rest = template.replace("{name}", "").replace("{value}", "")
        ok = "{" not in rest and "}" not in rest and template.index("{name}") < template.index("{value}")
        ok = ok and SEPARATOR not in template
    if not ok:
        raise _bad(
            name,
            template,
            "a string with '{name}' once, then '{value}' once, no other braces and no newline "
            "(e.g. '{name} lives in {value}.')",
        )
    return template


class FactSet:
    """``n_facts`` facts ``names[i] -> values[answers[i]]`` and the templates that write them.

    Build one with :func:`make_facts`, or directly from lists (``values`` distinct and all of one
    byte length, ``answers`` indices into ``values``). Read-only.
    """

    def __init__(
        self,
        names: Sequence[str],
        values: Sequence[str],
        answers: Sequence[int] | np.ndarray,
        templates: Sequence[str] = TRAIN_TEMPLATES,
        heldout_template: str = HELDOUT_TEMPLATE,
    ):
        names, values = list(names), list(values)
        if not names or not all(isinstance(s, str) and s and SEPARATOR not in s for s in names):
            raise _bad("names", names[:3], "a non-empty list of non-empty strings without newlines")
        if len(set(names)) != len(names):
            raise _bad("names", "...", "distinct (a name with two values could not be recalled)")
        if len(values) < 2 or not all(isinstance(s, str) and s and SEPARATOR not in s for s in values):
            raise _bad("values", values[:3], "a list of at least 2 non-empty strings without newlines")
        lengths = {len(v.encode()) for v in values}
        if len(set(values)) != len(values) or len(lengths) != 1:
            raise _bad("values", values[:3], "distinct and all of the same byte length")
        answers = np.asarray(answers)
        if answers.shape != (len(names),) or not np.issubdtype(answers.dtype, np.integer):
            raise _bad("answers", answers.shape, f"an int array of shape ({len(names)},), one per name")
        if len(answers) and (answers.min() < 0 or answers.max() >= len(values)):
            raise _bad("answers", (int(answers.min()), int(answers.max())), f"in [0, {len(values)})")
        if isinstance(templates, str) or not templates:
            raise _bad("templates", templates, "a non-empty sequence of template strings")
        self.templates = tuple(check_template(t, "templates") for t in templates)
        self.heldout_template = check_template(heldout_template, "heldout_template")
        if self.heldout_template in self.templates:
            raise _bad("heldout_template", heldout_template, "a template that is not in templates")
        self.names = tuple(names)
        self.values = tuple(values)
        self.answers = answers.astype(np.int64)
        self.answers.flags.writeable = False
        self.value_bytes = lengths.pop()  # bytes of every value
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ---- the facts -----------------------------------------------------------------------------
    @property
    def n_facts(self) -> int:
        return len(self.names)

    @property
    def n_values(self) -> int:
        return len(self.values)

    @property
    def chance(self) -> float:
        """The recall of guessing: ``1 / n_values``."""
        return 1.0 / len(self.values)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"FactSet(n_facts={self.n_facts}, n_values={self.n_values}, templates={len(self.templates)})"

    def fact(self, i: int) -> tuple[str, str]:
        """``(name, value)`` of fact ``i``."""
        i = _check_int("i", i, 0, self.n_facts - 1)
        return self.names[i], self.values[self.answers[i]]

    def subset(self, ids: Sequence[int] | np.ndarray) -> FactSet:
        """The facts ``ids`` (distinct indices, in that order), with the same values and templates."""
        ids = np.asarray(ids)
        ok = ids.ndim == 1 and len(ids) > 0 and np.issubdtype(ids.dtype, np.integer)
        if not ok or ids.min() < 0 or ids.max() >= self.n_facts or len(np.unique(ids)) != len(ids):
            raise _bad("ids", ids[:5].tolist() if ids.ndim else ids, f"distinct ints in [0, {self.n_facts})")
        return FactSet(
            [self.names[i] for i in ids],
            self.values,
            self.answers[ids],
            self.templates,
            self.heldout_template,
        )

    def _template(self, template: str | int | None) -> str:
        if template is None:
            return self.templates[0]
        if _is_int(template):
            return self.templates[_check_int("template", template, 0, len(self.templates) - 1)]
        if template == "heldout":
            return self.heldout_template
        return check_template(template)

    def sentence(self, i: int, template: str | int | None = None) -> str:
        """Fact ``i`` in ``template`` (a string, an index into ``templates``, or "heldout")."""
        name, value = self.fact(i)
        return self._template(template).format(name=name, value=value)

    def prompt(self, i: int, template: str | int | None = None) -> str:
        """The text before the value in fact ``i``'s sentence, after the separator: the query."""
        head = self._template(template).split("{value}")[0]
        return SEPARATOR + head.format(name=self.names[_check_int("i", i, 0, self.n_facts - 1)])

    def query_ids(self, count: int | None = None, seed: int = 0) -> np.ndarray:
        """``count`` distinct fact indices drawn with ``seed`` (sorted), or all facts if ``count`` is
        None or at least ``n_facts``."""
        if count is None or (_is_int(count) and count >= self.n_facts):
            return np.arange(self.n_facts)
        _check_int("count", count, 1)
        _check_int("seed", seed, 0)
        return np.sort(np.random.default_rng([seed, 3]).choice(self.n_facts, size=count, replace=False))

    # ---- training text -------------------------------------------------------------------------
    def _sentences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All ``n_facts * len(templates)`` sentences (each followed by the separator) as one byte
        array, with each sentence's start and length (fact-major: sentence ``i * T + t``)."""
        if self._table is None:
            texts = [
                t.format(name=n, value=self.values[a]) + SEPARATOR
                for n, a in zip(self.names, self.answers)
                for t in self.templates
            ]
            raw = [s.encode() for s in texts]
            lens = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            data = np.frombuffer(b"".join(raw), dtype=np.uint8)
            self._table = (data, starts, lens)
        return self._table

    def text(self, seed: int = 0) -> str:
        """Every fact in every training template, once, in an order shuffled by ``seed``."""
        _check_int("seed", seed, 0)
        order = np.random.default_rng([seed, 4]).permutation(self.n_facts * len(self.templates))
        T = len(self.templates)
        return "".join(
            self.templates[j % T].format(name=self.names[j // T], value=self.values[self.answers[j // T]])
            + SEPARATOR
            for j in order
        )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, micro: int = 0) -> np.ndarray:
        """Training windows, a pure function of ``(seed, step, micro)``: int64 ``(batch_size, seq_len + 1)``.

        Each row is a run of sentences drawn uniformly at random (with replacement) from all facts
        in all training templates, joined by the separator, starting at a random byte of its first
        sentence. Inputs are ``[:, :-1]``, targets ``[:, 1:]``.
        """
        _check_int("step", step, 0)
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        _check_int("micro", micro, 0)
        data, starts, lens = self._sentences()
        need = seq_len + 1
        k = -(-need // int(lens.min())) + 1  # sentences per row: enough after any first offset
        rng = np.random.default_rng([seed, step, micro])
        ids = rng.integers(0, len(lens), size=(batch_size, k))
        row_lens = lens[ids]  # (B, k)
        first = (rng.random(batch_size) * row_lens[:, 0]).astype(np.int64)  # offset in the 1st sentence
        # the rows' sentences back to back as one run of byte positions in `data`
        flat_lens = row_lens.ravel()
        flat_ends = np.cumsum(flat_lens)
        src = np.repeat(starts[ids].ravel() - (flat_ends - flat_lens), flat_lens) + np.arange(flat_ends[-1])
        row_begin = np.concatenate([[0], np.cumsum(row_lens.sum(1))[:-1]]) + first  # (B,)
        return data[src[row_begin[:, None] + np.arange(need)]].astype(np.int64)


def make_facts(
    n_facts: int,
    n_values: int = 100,
    seed: int = 0,
    templates: Sequence[str] = TRAIN_TEMPLATES,
    heldout_template: str = HELDOUT_TEMPLATE,
) -> FactSet:
    """``n_facts`` random facts over ``n_values`` cities, a pure function of the arguments.

    Names are a first and a last name of random consonant-vowel syllables (``"Kalu Dorevan"``,
    9-15 bytes), all distinct; cities are three syllables and an ending (``"Tiramek"``, 7 bytes),
    never equal to a name's word; each fact's city is uniform. Sets are nested: the first ``k``
    facts of ``make_facts(n, ...)`` are ``make_facts(k, ...)``, with the same cities.
    """
    n_facts = _check_int("n_facts", n_facts, 1, MAX_FACTS)
    n_values = _check_int("n_values", n_values, 2, MAX_VALUES)
    seed = _check_int("seed", seed, 0)
    return FactSet(
        _names(n_facts, seed),
        _cities(n_values, seed),
        _answers(n_facts, n_values, seed),
        templates,
        heldout_template,
    )


# ---- recall -------------------------------------------------------------------------------------
@dataclass
class Recall:
    """The result of :func:`evaluate_recall` on ``n_queries`` facts of a set of ``n_facts``."""

    template: str
    n_facts: int
    n_queries: int
    n_values: int
    recall: float  # mean of ``correct``
    margin_nats: float  # mean of (true value's log-likelihood - best other value's), nats
    answer_nats_per_byte: float  # mean negative log-likelihood of the true value, per byte
    correct: np.ndarray = field(repr=False)  # (n_queries,) 1 recalled, 1/t tied first with t, else 0
    ids: np.ndarray = field(repr=False)  # (n_queries,) the facts queried

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def stderr(self) -> float:
        """Standard error of ``recall`` as an estimate of the whole set's (0 if every fact was queried)."""
        if self.n_queries < 2:
            return 0.0 if self.n_queries == self.n_facts else math.nan
        fpc = (self.n_facts - self.n_queries) / max(1, self.n_facts - 1)
        return float(np.std(self.correct, ddof=1) / math.sqrt(self.n_queries) * math.sqrt(max(0.0, fpc)))

    @property
    def facts_recalled(self) -> float:
        """``recall * n_facts``: the number of the set's facts recalled (estimated when sampled)."""
        return self.recall * self.n_facts

    @property
    def facts_above_chance(self) -> float:
        """Facts recalled beyond guessing: ``max(0, (recall - chance) / (1 - chance)) * n_facts``."""
        return max(0.0, (self.recall - self.chance) / (1.0 - self.chance)) * self.n_facts

    def to_dict(self) -> dict:
        """The scalars (no per-query arrays), JSON-ready."""
        return {
            "template": self.template,
            "n_facts": self.n_facts,
            "n_queries": self.n_queries,
            "n_values": self.n_values,
            "chance": self.chance,
            "recall": self.recall,
            "recall_stderr": self.stderr,
            "facts_recalled": self.facts_recalled,
            "facts_above_chance": self.facts_above_chance,
            "margin_nats": self.margin_nats,
            "answer_nats_per_byte": self.answer_nats_per_byte,
        }


def evaluate_recall(
    model: Callable,
    facts: FactSet,
    template: str | int | None = None,
    ids: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 4096,
    device=None,
) -> Recall:
    """Recall of ``facts`` (or of the facts ``ids``) by ``model``, queried in ``template``.

    ``model(idx)`` maps int64 byte ids ``(B, T)`` to logits ``(B, T, V)``, ``V >= 256`` (e.g. a
    :class:`pkmem.models.MemoryTransformer`; wrap a Hugging Face model as ``lambda x: m(x).logits``).
    ``template``: a training template's index, "heldout", or any template string (default: the
    first training template). Each query scores all ``n_values`` values (one sequence each,
    ``prompt + value``), ``batch_size`` sequences per call; ``B`` is ``n_values`` times the queries
    of a call. An ``nn.Module`` is put in eval mode for the call (and restored). Exact and
    deterministic for a given ``batch_size`` and device; runs under the caller's autocast, if any.
    """
    import torch

    if not isinstance(facts, FactSet):
        raise _bad("facts", type(facts).__name__, "a FactSet (pkmem.tasks.make_facts)")
    if not callable(model):
        raise _bad("model", type(model).__name__, "a callable mapping (B, T) int64 ids to (B, T, V) logits")
    template = facts._template(template)
    _check_int("batch_size", batch_size, 1)
    ids = facts.query_ids() if ids is None else np.asarray(ids)
    if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise _bad("ids", ids.tolist() if ids.ndim else ids, "a non-empty 1-D sequence of fact indices")
    if ids.min() < 0 or ids.max() >= facts.n_facts:
        raise _bad("ids", (int(ids.min()), int(ids.max())), f"fact indices in [0, {facts.n_facts})")
    if device is None:
        first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    M, L = facts.n_values, facts.value_bytes
    values = torch.tensor(
        np.frombuffer("".join(facts.values).encode(), np.uint8).reshape(M, L).astype(np.int64)
    )
    values = values.to(device)
    head = template.split("{value}")[0]
    prompts = [(SEPARATOR + head.format(name=facts.names[i])).encode() for i in ids]
    per_call = max(1, batch_size // M)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    scores = []
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), per_call):
                chunk = prompts[s : s + per_call]
                Q = len(chunk)
                lens = [len(p) for p in chunk]
                T = max(lens) + L
                plen = torch.tensor(lens, device=device)
                x = torch.zeros(Q, T, dtype=torch.int64)
                for q, p in enumerate(chunk):
                    x[q, : len(p)] = torch.frombuffer(bytearray(p), dtype=torch.uint8)
                x = x.to(device)[:, None, :].repeat(1, M, 1)  # (Q, M, T)
                at = plen[:, None] + torch.arange(L, device=device)  # (Q, L): value positions
                x.scatter_(2, at[:, None, :].expand(Q, M, L), values[None].expand(Q, M, L))
                logits = model(x.view(Q * M, T))
                if (
                    not isinstance(logits, torch.Tensor)
                    or logits.shape[:2] != (Q * M, T)
                    or logits.shape[2] < 256
                ):
                    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(
                        f"model returned {got} for ids of shape {(Q * M, T)}: "
                        "expected logits (B, T, V >= 256)"
                    )
                V = logits.shape[2]
                pred = (at - 1)[:, None, :, None].expand(Q, M, L, V)  # the logits predicting each value byte
                lp = logits.view(Q, M, T, V).gather(2, pred).float().log_softmax(-1)
                ll = lp.gather(3, values[None, :, :, None].expand(Q, M, L, 1)).squeeze(-1)  # (Q, M, L)
                scores.append(ll.double().sum(-1).cpu())
    finally:
        if was_training:
            model.train()
    scores_t = torch.cat(scores)  # (n_queries, M) float64
    answer = torch.from_numpy(facts.answers[ids])
    true = scores_t.gather(1, answer[:, None]).squeeze(1)
    best = scores_t.max(1).values
    ties = (scores_t == best[:, None]).sum(1)
    correct = (true == best).double() / ties
    others = scores_t.scatter(1, answer[:, None], -math.inf).max(1).values
    return Recall(
        template=template,
        n_facts=facts.n_facts,
        n_queries=len(ids),
        n_values=M,
        recall=float(correct.mean()),
        margin_nats=float((true - others).mean()),
        answer_nats_per_byte=float(-true.mean() / L),
        correct=correct.numpy(),
        ids=np.asarray(ids, dtype=np.int64),
    )
