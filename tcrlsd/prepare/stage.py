"""Seeded selection, prompt rendering and :func:`prepare`, the stage's one function."""

from __future__ import annotations

import hashlib
import random
import sys
from collections import Counter
from typing import Any

import pyarrow as pa

from tcrlsd.prepare.params import SPLITS, PrepareError, PrepareParams, SourceParams
from tcrlsd.prepare.sources import FORMATS, Row, read_raw
from tcrlsd.schemas import schema_for, validate
from tcrlsd.templates import render_user_message

# --------------------------------------------------------------------------------------------------
# Selection


def stream_seed(seed: int, source: SourceParams) -> int:
    """A 64-bit seed for one source's random stream: train and val never share a stream."""
    digest = hashlib.sha256(f"tcrlsd-prepare/{seed}/{source.name}/{source.split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def select(items: list, count: int | None, rng: random.Random, what: str) -> list:
    """Shuffle ``items`` with ``rng`` and keep the first ``count`` (all when None)."""
    order = list(range(len(items)))
    rng.shuffle(order)
    if count is not None:
        if count > len(items):
            raise PrepareError(f"{what}: count {count} asks for more rows than the {len(items)} available")
        order = order[:count]
    return [items[i] for i in order]


def _norm(problem: str) -> str:
    return " ".join(problem.split())


def _synthetic_rows(source: SourceParams, seed: int, exclude: set[str]) -> tuple[list[Row], int]:
    """``count`` synthetic problems; a problem whose text is in ``exclude`` is redrawn.

    Same draws as :func:`tcrlsd.synthetic.make_problems` (one RNG, levels cycling) as long as
    nothing is excluded. Returns the rows and the number of redraws.
    """
    from tcrlsd.synthetic import make_problem

    levels = source.levels or (1, 2, 3, 4)
    max_operand = source.max_operand or 20
    rng = random.Random(stream_seed(seed, source))
    rows, redraws = [], 0
    for i in range(source.count):
        level = levels[i % len(levels)]
        for _ in range(1000):
            p = make_problem(rng, level, max_operand)
            if _norm(p.problem) not in exclude:
                break
            redraws += 1
        else:
            raise PrepareError(
                f"source {source.name!r} ({source.split}): cannot draw a level-{level} problem that is not "
                f"already in an earlier split; the level-{level} problem space is too small for these counts"
            )
        rows.append(Row(f"{source.name}/{source.split}/{i}", p.problem, p.answer, p.solution, p.level, "arithmetic"))
    return rows, redraws


def _source_rows(source: SourceParams, params: PrepareParams, exclude: set[str]) -> tuple[list[Row], dict]:
    what = f"source {source.name!r} ({source.split})"
    stats: dict[str, Any] = {"format": source.format, "path": source.path, "split": source.split}
    fmt = FORMATS[source.format]
    if fmt.row is None:  # generated rows: the synthetic task
        rows, redraws = _synthetic_rows(source, params.seed, exclude)
        stats.update(records_read=len(rows), skipped_no_answer=0, skipped={}, val_overlap_redrawn=redraws,
                     val_overlap_dropped=0)
        return rows, stats
    label, records = read_raw(source)
    convert = fmt.row
    usable, skipped, overlap, n = [], {}, 0, 0
    for rec in records:
        n += 1
        row = convert(source, label, rec)
        if row.answer is None or not row.answer.strip():
            why = fmt.missing(row)
            if params.missing_answer == "error":
                raise PrepareError(
                    f"{rec.where}: {row.prompt_id}: {why}, so no gold answer "
                    "(set prepare.missing_answer: skip to skip such records, counted in the metrics)"
                )
            skipped[row.prompt_id] = f"{rec.where}: {why}"
            continue
        if _norm(row.problem) in exclude:
            overlap += 1
            continue
        usable.append(row)
    for pid, why in skipped.items():
        print(f"prepare: {what}: skipped {pid} ({why}): no gold answer", file=sys.stderr)
    rows = select(usable, source.count, random.Random(stream_seed(params.seed, source)), what)
    stats.update(records_read=n, skipped_no_answer=len(skipped), skipped=skipped, val_overlap_redrawn=0,
                 val_overlap_dropped=overlap)
    return rows, stats


# --------------------------------------------------------------------------------------------------
# Rendering


def render_prompt(problem: str, template: str, tokenizer=None) -> str:
    """The policy input: ``template`` with ``{problem}`` replaced, then the chat template if given.

    ``{problem}`` is the only placeholder; every other brace (``\\boxed{}``) is literal text, so
    the template is filled with ``str.replace``, not ``str.format``. With a tokenizer, the text is
    one user message rendered by its chat template with the generation prompt appended.
    """
    text = template.replace("{problem}", problem)
    if tokenizer is None:
        return text
    return render_user_message(tokenizer, text)  # a template that prints the date gets a fixed one


def _chat_tokenizer(path: str | None):
    if path is None:
        return None
    from tcrlsd.policy import load_tokenizer

    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise PrepareError(f"chat_template_tokenizer {path!r}: cannot load a tokenizer: {exc}") from None
    if not getattr(tok, "chat_template", None):
        raise PrepareError(
            f"chat_template_tokenizer {path!r}: the tokenizer has no chat template "
            "(set chat_template_tokenizer: null to use the plain prompt template)"
        )
    return tok


# --------------------------------------------------------------------------------------------------
# The stage's one function


def prepare(params: PrepareParams) -> tuple[pa.Table, dict]:
    """Build the ``prompts`` table (validated) and its metrics from ``params``.

    Train sources are built first, so val sources can exclude problems already selected for train, and
    test sources those of train and val;
    the output keeps the order of ``params.sources``. Relative paths are relative to the working
    directory (the repository root under ``dvc repro``).
    """
    tokenizer = _chat_tokenizer(params.chat_template_tokenizer)
    built: dict[int, tuple[list[Row], dict]] = {}
    earlier: set[str] = set()  # the problems of the splits built before this one
    for pass_split in SPLITS:
        chosen: set[str] = set()
        for i, source in enumerate(params.sources):
            if source.split != pass_split:
                continue
            rows, stats = _source_rows(source, params, set(earlier))
            built[i] = (rows, stats)
            chosen.update(_norm(r.problem) for r in rows)
        earlier |= chosen

    columns: dict[str, list] = {f.name: [] for f in schema_for("prompts")}
    seen: dict[str, str] = {}
    metrics: dict[str, Any] = {"sources": {}, "rows": 0, "rows_by_split": {  # the splits the sources fill
        split: 0 for split in SPLITS if any(source.split == split for source in params.sources)}}
    for i, source in enumerate(params.sources):
        rows, stats = built[i]
        for r in rows:
            if r.prompt_id in seen:
                raise PrepareError(
                    f"prompt_id {r.prompt_id!r} comes from both source {seen[r.prompt_id]!r} and "
                    f"source {source.name!r} ({source.split}); prompt ids must be unique (rename a source)"
                )
            seen[r.prompt_id] = f"{source.name} ({source.split})"
            columns["prompt_id"].append(r.prompt_id)
            columns["split"].append(source.split)
            columns["problem"].append(r.problem)
            columns["prompt"].append(render_prompt(r.problem, params.prompt_template, tokenizer))
            columns["answer"].append(r.answer.strip())
            columns["solution"].append(r.solution)
            columns["source"].append(source.name)
            columns["level"].append(r.level)
            columns["subject"].append(r.subject)
        levels = Counter("null" if r.level is None else str(r.level) for r in rows)
        stats.update(rows=len(rows), rows_by_level=dict(sorted(levels.items())))
        metrics["sources"][f"{source.name}/{source.split}"] = stats
        metrics["rows"] += len(rows)
        metrics["rows_by_split"][source.split] += len(rows)
    table = pa.table(columns, schema=schema_for("prompts"))
    return validate(table, "prompts"), metrics
