"""What `tcrlsd inspect` shows, as plain data: the list of samples, one sample, one GRPO group.

Renderers (terminal, HTML, JSONL) take these dicts and only format them.

Per-row quantities (definitions in docs/ARCHITECTURE.md):

- ``delta_gap``    mean over the row's tokens of Δ_t = teacher − student log-prob (0 for a row
                   without feedback; negative = the teacher finds the response less likely);
- ``length``       number of response tokens;
- ``group_advantage`` the GRPO A of the row; ``adv_abs_mean`` mean |Â_t| over its tokens.

The list reads only the columns it shows or filters on (``response_text`` and ``feedback_text``
only for ``search``); a sample reads every column of its own row only.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from tcrlsd.inspect.load import InspectError, Iteration
from tcrlsd.inspect.tokens import find_tokenizer

__all__ = ["Filters", "SORT_KEYS", "LIST_FIELDS", "ListResult", "RenderOptions", "View", "build_view", "list_samples", "details", "group"]

# --sort name -> list field; each needs the artifact named second.
SORT_KEYS: dict[str, tuple[str, str]] = {
    "delta": ("delta_gap", "scores"),
    "length": ("length", "rollouts"),
    "adv": ("adv_abs_mean", "advantages"),
}

# Fields of one list row, in display order, with the artifact each comes from.
LIST_FIELDS: dict[str, str] = {
    "rollout_id": "rollouts", "prompt_id": "rollouts", "sample_idx": "rollouts",
    "reward": "verdicts", "is_correct": "verdicts", "reason": "verdicts",
    "has_feedback": "critiques", "leaks_answer": "critiques", "suspected_false_negative": "critiques",
    "critique_error": "critiques",
    "delta_gap": "scores", "length": "rollouts",
    "group_advantage": "advantages", "adv_abs_mean": "advantages",
}
_NULLS = {
    "reward": pl.Float32, "is_correct": pl.Boolean, "reason": pl.String, "has_feedback": pl.Boolean,
    "leaks_answer": pl.Boolean, "suspected_false_negative": pl.Boolean, "critique_error": pl.Boolean,
    "delta_gap": pl.Float64, "group_advantage": pl.Float32, "adv_abs_mean": pl.Float64,
}


@dataclass(frozen=True)
class Filters:
    """Row filters; None / empty = no filter on that field. All given filters must hold."""

    correct: bool | None = None  # is_correct == correct
    feedback: bool | None = None  # the row has feedback (feedback_text not null)
    reasons: tuple[str, ...] = ()  # verdict reason in this set
    prompt_id: str | None = None
    flagged: bool = False  # leaks_answer or suspected_false_negative
    search: str | None = None  # case-insensitive substring of response_text or feedback_text

    def needs(self) -> dict[str, str]:
        """Option name -> artifact it needs."""
        out = {}
        if self.correct is not None:
            out["--correct/--incorrect"] = "verdicts"
        if self.reasons:
            out["--reason"] = "verdicts"
        if self.feedback is not None:
            out["--feedback/--no-feedback"] = "critiques"
        if self.flagged:
            out["--flagged"] = "critiques"
        return out


@dataclass(frozen=True)
class ListResult:
    rows: list[dict]  # LIST_FIELDS per row, None where the artifact is missing
    total: int  # rows matching the filters
    total_rows: int  # rows in the iteration
    offset: int
    missing: dict[str, str]  # artifact -> why it is not shown


def format_value(v, fmt: str = ".3f") -> str:
    """A cell's display text, before any escaping: None → '–', bool → yes/no, float by ``fmt``."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def signal_pairs(d: dict) -> list[tuple[str, str]]:
    """The "Signals" line of one sample (:func:`details` row) as (label, unescaped text) pairs."""
    st, a, sc = d["stats"], d["advantage"], d["score"]
    pairs = [("Δ-gap", format_value(st["delta_gap"], "+.4f")), ("Δ min", format_value(st["delta_min"], "+.3f")),
             ("Δ max", format_value(st["delta_max"], "+.3f")), ("A", format_value(st["group_advantage"], "+.4f")),
             ("mean Â", format_value(st["adv_mean"], "+.4f")), ("mean |Â|", format_value(st["adv_abs_mean"], ".4f")),
             ("estimator", a["estimator"] if a else "–"), ("teacher", sc["teacher_checkpoint"] if sc else "–")]
    if st.get("hint_gaps"):  # several teacher contexts: mean_t(log Q − log Q_j) per extra context j
        pairs.append(("log Q − log Q_wrong", " ".join(format_value(g, "+.4f") for g in st["hint_gaps"])))
    return pairs


def _require(it: Iteration, what: str, name: str) -> None:
    if not it.has(name):
        raise InspectError(f"{what} needs the {name} artifact, which is missing in {it.root}: {it.missing[name]}")


def _frame(it: Iteration, search: str | None) -> pl.LazyFrame:
    """All list fields of every row (lazy), plus ``_text`` columns when searching."""
    cols = ["rollout_id", "prompt_id", "sample_idx"] + (["response_text"] if search else [])
    if not it.has("scores"):
        cols.append("response_token_ids")
    lf = it.scan("rollouts", cols).with_row_index("_order")
    if it.has("scores"):
        # mean(T − S) = mean(T) − mean(S) over equal-length lists: no per-token column is built.
        s = it.scan("scores", ["rollout_id", "student_logprobs", "teacher_logprobs"]).select(
            "rollout_id",
            (pl.col("teacher_logprobs").list.mean() - pl.col("student_logprobs").list.mean())
            .fill_null(0.0).alias("delta_gap"),
            pl.col("student_logprobs").list.len().alias("_scored_len"),
        )
        lf = lf.join(s, on="rollout_id", how="left")
        lf = lf.with_columns(pl.col("_scored_len").cast(pl.Int64).alias("length")).drop("_scored_len")
    else:
        lf = lf.with_columns(pl.col("response_token_ids").list.len().cast(pl.Int64).alias("length"))
        lf = lf.drop("response_token_ids")
    if it.has("verdicts"):
        lf = lf.join(it.scan("verdicts", ["rollout_id", "reward", "is_correct", "reason"]), on="rollout_id", how="left")
    if it.has("critiques"):
        c = it.scan("critiques", ["rollout_id", "feedback_text", "leaks_answer", "suspected_false_negative", "error"])
        c = c.with_columns(
            pl.col("feedback_text").is_not_null().alias("has_feedback"),
            pl.col("error").is_not_null().alias("critique_error"),
        ).drop("error")
        if not search:
            c = c.drop("feedback_text")
        lf = lf.join(c, on="rollout_id", how="left")
    if it.has("advantages"):
        a = it.scan("advantages", ["rollout_id", "group_advantage", "advantages"]).select(
            "rollout_id", "group_advantage", pl.col("advantages").list.eval(pl.element().abs()).list.mean().alias("adv_abs_mean")
        )
        lf = lf.join(a, on="rollout_id", how="left")
    present = set(lf.collect_schema().names())
    lf = lf.with_columns([pl.lit(None, dtype=t).alias(n) for n, t in _NULLS.items() if n not in present])
    return lf


def _predicate(f: Filters, has_critiques: bool) -> pl.Expr | None:
    conds = []
    if f.correct is not None:
        conds.append(pl.col("is_correct") == f.correct)
    if f.feedback is not None:
        conds.append(pl.col("has_feedback") == f.feedback)
    if f.reasons:
        conds.append(pl.col("reason").is_in(list(f.reasons)))
    if f.prompt_id is not None:
        conds.append(pl.col("prompt_id") == f.prompt_id)
    if f.flagged:
        conds.append(pl.col("leaks_answer") | pl.col("suspected_false_negative"))
    if f.search:
        q = f.search.lower()
        hit = pl.col("response_text").str.to_lowercase().str.contains(q, literal=True)
        if has_critiques:
            hit = hit | pl.col("feedback_text").str.to_lowercase().str.contains(q, literal=True).fill_null(False)
        conds.append(hit)
    if not conds:
        return None
    out = conds[0]
    for c in conds[1:]:
        out = out & c
    return out.fill_null(False)


def _odd_file(it: Iteration) -> str | None:
    """The shard whose columns differ from its siblings' (what a failed scan of all of them means)."""
    from collections import Counter

    import pyarrow.parquet as pq

    for files in it.files.values():
        if len(files) < 2:
            continue
        shapes = [str(pq.read_schema(f).remove_metadata()) for f in files]
        common = Counter(shapes).most_common(1)[0][0]
        odd = [f for f, sh in zip(files, shapes) if sh != common]
        if odd:
            return f"{odd[0]} (its columns differ from the other parts')"
    return None


def list_samples(
    it: Iteration,
    filters: Filters = Filters(),
    sort: str | None = None,
    descending: bool = False,
    offset: int = 0,
    limit: int | None = 50,
) -> ListResult:
    """One page of rows: filtered, sorted (stable; file order by default), ``limit`` from ``offset``."""
    for opt, name in filters.needs().items():
        _require(it, opt, name)
    if sort is not None:
        if sort not in SORT_KEYS:
            raise InspectError(f"unknown sort key {sort!r}; known: {', '.join(SORT_KEYS)}")
        _require(it, f"--sort {sort}", SORT_KEYS[sort][1])
    lf = _frame(it, filters.search)
    pred = _predicate(filters, it.has("critiques"))
    if pred is not None:
        lf = lf.filter(pred)
    by = ([SORT_KEYS[sort][0]] if sort else []) + ["_order"]
    lf = lf.sort(by, descending=[descending] * (len(by) - 1) + [False], nulls_last=True)
    try:
        df = lf.select(list(LIST_FIELDS)).collect()
    except pl.exceptions.PolarsError as exc:  # e.g. a shard whose column types differ from the others'
        raise InspectError(f"{_odd_file(it) or it.root}: cannot read the artifacts as one table: {exc}") from None
    total_rows = sum(_num_rows(f) for f in it.files["rollouts"])
    page = df.slice(offset, limit) if limit is not None else df.slice(offset)
    missing = {k: v for k, v in it.missing.items() if k != "prompts"}
    return ListResult(page.to_dicts(), df.height, total_rows, offset, missing)


def _num_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _strip(row: dict | None, drop: tuple[str, ...] = ("rollout_id",)) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if k not in drop}


def details(it: Iteration, ids: list[str], policy=None) -> list[dict]:
    """Everything about each rollout in ``ids`` (in that order), tokens included.

    Keys: rollout, prompt, verdict, critique, score, advantage (dicts, None when missing), tokens
    (list of {pos, id, text, logp, logq, delta, adv}), stats, missing ({what: why}), tokenizer.
    """
    if not ids:
        return []
    r = it.rows("rollouts", "rollout_id", ids)
    unknown = [i for i in ids if i not in r]
    if unknown:
        raise InspectError(f"{it.root}: no rollout with rollout_id {unknown[0]!r} (ids look like 'PROMPT_ID#SAMPLE_IDX')")
    parts = {name: it.rows(name, "rollout_id", ids) if it.has(name) else None
             for name in ("verdicts", "critiques", "scores", "advantages")}
    prompts = None
    if it.has("prompts"):
        prompts = it.rows("prompts", "prompt_id", sorted({r[i]["prompt_id"] for i in ids}),
                          ["problem", "answer", "solution", "source", "subject", "level", "split"])
    ckpts = sorted({row["teacher_checkpoint"] for row in (parts["scores"] or {}).values()})
    tok = find_tokenizer(policy, ckpts, it.root)
    out = []
    for rid in ids:
        ro = dict(r[rid])
        pid = ro["prompt_id"]
        prompt_tokens = len(ro.pop("prompt_token_ids") or [])
        missing = {}
        got = {}
        for name, table in parts.items():
            if table is None:
                missing[name] = it.missing[name]
            elif rid not in table:
                missing[name] = f"no row for this rollout in {it.files[name][0].parent if len(it.files[name]) > 1 else it.files[name][0]}"
            got[name] = _strip(table.get(rid)) if table is not None else None
        prompt = _strip(prompts.get(pid), ("prompt_id",)) if prompts is not None else None
        if prompts is None:
            missing["prompts"] = it.missing["prompts"]
        elif prompt is None:
            missing["prompts"] = f"no prompt with prompt_id {pid!r} in {it.files['prompts'][0]}"
        ids_ = ro["response_token_ids"]
        s, a = got["scores"], got["advantages"]
        logp = s["student_logprobs"] if s else None
        logq = s["teacher_logprobs"] if s else None
        extra = s.pop("extra_teacher_logprobs", None) if s else None  # K - 1 lists (several teacher contexts)
        adv = a["advantages"] if a else None
        texts = tok.pieces(ids_) if tok is not None else None
        tokens = [
            {
                "pos": t, "id": tid, "text": texts[t] if texts else None,
                "logp": logp[t] if logp else None, "logq": logq[t] if logq else None,
                "delta": (logq[t] - logp[t]) if logp else None, "adv": adv[t] if adv else None,
            }
            for t, tid in enumerate(ids_)
        ]
        deltas = [x["delta"] for x in tokens if x["delta"] is not None]
        advs = [x["adv"] for x in tokens if x["adv"] is not None]
        stats = {
            "length": len(ids_), "prompt_tokens": prompt_tokens,
            "delta_gap": (sum(deltas) / len(deltas) if deltas else 0.0) if s else None,
            "delta_min": min(deltas) if deltas else None, "delta_max": max(deltas) if deltas else None,
            "group_advantage": a["group_advantage"] if a else None,
            "adv_mean": sum(advs) / len(advs) if advs else None,
            "adv_abs_mean": sum(abs(x) for x in advs) / len(advs) if advs else None,
        }
        if extra is not None:  # how far each wrong-hint context is below the correct-hint one, on average
            stats["hint_gaps"] = [sum(q - w for q, w in zip(logq, lw)) / len(lw) if lw else 0.0 for lw in extra]
        ro.pop("response_token_ids")
        out.append({
            "rollout_id": rid, "rollout": ro, "prompt": prompt, "verdict": got["verdicts"],
            "critique": got["critiques"], "score": _strip(s, ("student_logprobs", "teacher_logprobs")) if s else None,
            "advantage": _strip(a, ("advantages",)) if a else None, "tokens": tokens, "stats": stats,
            "missing": missing, "tokenizer": tok.source if tok else None,
        })
    return out


def group(it: Iteration, prompt_id: str, filters: Filters = Filters(), sort=None, descending=False) -> dict:
    """One GRPO group: its prompt, statistics over all its rows, and its (filtered, sorted) rows.

    Each row carries the list fields plus extracted_answer, finish_reason and response_text.
    """
    from dataclasses import replace

    everything = list_samples(it, Filters(prompt_id=prompt_id), limit=None)
    if not everything.rows:
        raise InspectError(f"{it.root}: no rollouts with prompt_id {prompt_id!r}")
    shown = list_samples(it, replace(filters, prompt_id=prompt_id), sort, descending, limit=None)
    ids = [row["rollout_id"] for row in shown.rows]
    texts = it.rows("rollouts", "rollout_id", ids, ["response_text", "finish_reason"])
    answers = it.rows("verdicts", "rollout_id", ids, ["extracted_answer"]) if it.has("verdicts") else {}
    rows = []
    for row in shown.rows:
        rid = row["rollout_id"]
        rows.append({**row, **_strip(texts[rid]), "extracted_answer": answers.get(rid, {}).get("extracted_answer")})
    allr = everything.rows
    rewards = [x["reward"] for x in allr]
    feedback = [x["has_feedback"] for x in allr]
    prompt = None
    if it.has("prompts"):
        prompt = _strip(it.rows("prompts", "prompt_id", [prompt_id], ["problem", "answer", "solution"]).get(prompt_id),
                        ("prompt_id",))
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "stats": {
            "size": len(allr),
            "shown": len(rows),
            "rewards": rewards,
            "reward_mean": sum(rewards) / len(rewards) if it.has("verdicts") and None not in rewards else None,
            "group_advantages": [x["group_advantage"] for x in allr],
            "coverage": sum(bool(f) for f in feedback) / len(feedback) if it.has("critiques") else None,
        },
        "rows": rows,
        "missing": {k: v for k, v in it.missing.items()},
    }


@dataclass(frozen=True)
class RenderOptions:
    scale: float | str = 2.0  # |Δ_t| in nats where the colour saturates, or 'auto' (palette.resolve_scale)
    tokens: bool = False  # terminal: a per-token table too; JSONL: full rows (tokens included) for lists
    plain: bool = False  # terminal text for a file: no colour, 120 columns


@dataclass(frozen=True)
class View:
    """What one `tcrlsd inspect` call shows; renderers turn it into text.

    kind: ``list`` (``page`` = one page of rows), ``sample`` (``rollout_id``), or ``group``
    (``group`` = :func:`group`'s dict; ``page`` = the page of its rows that HTML / JSONL show).
    :meth:`samples` loads the full rows (tokens included) of what is shown, on demand: only the
    renderers that need them pay for them.
    """

    it: Iteration
    kind: str
    page: ListResult | None = None
    group: dict | None = None
    rollout_id: str | None = None
    page_number: int = 1
    page_size: int | None = None
    policy: str | None = None

    def samples(self) -> list[dict]:
        ids = [self.rollout_id] if self.kind == "sample" else [r["rollout_id"] for r in self.page.rows]
        return details(self.it, ids, self.policy)


def build_view(
    it: Iteration,
    rollout_id: str | None = None,
    prompt_id: str | None = None,
    filters: Filters = Filters(),
    sort: str | None = None,
    descending: bool = False,
    page_number: int = 1,
    page_size: int | None = 50,
    policy=None,
) -> View:
    """The view for these options: one sample (``rollout_id``), one group (``prompt_id``) or a list."""
    from dataclasses import replace

    if rollout_id is not None:
        if prompt_id is not None:
            raise InspectError("give --id or --prompt, not both")
        return View(it, "sample", rollout_id=rollout_id, policy=policy)
    offset = (page_number - 1) * (page_size or 0)
    if prompt_id is not None:
        g = group(it, prompt_id, filters, sort, descending)
        page = list_samples(it, replace(filters, prompt_id=prompt_id), sort, descending, offset, page_size)
        return View(it, "group", page=page, group=g, page_number=page_number, page_size=page_size, policy=policy)
    page = list_samples(it, filters, sort, descending, offset, page_size)
    return View(it, "list", page=page, page_number=page_number, page_size=page_size, policy=policy)
