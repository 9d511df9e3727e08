"""The prepare stage: raw problem sets -> the ``prompts`` artifact (one table, a ``split`` column).

Sources are listed in params (``prepare.sources``); each has a *format* that says how one raw record
becomes a prompt row:

- ``math``      MATH records (problem, level "Level 3", type, solution). The gold answer is the LAST
                ``\\boxed{...}`` of the solution (verl's convention), nested braces handled.
- ``math500``   MATH500 records: like ``math`` but with an ``answer`` field, which is the gold answer,
                an integer ``level`` and a ``subject``.
- ``gsm8k``     GSM8K records (question, answer = worked text, ``#### 42``): gold answer after ``####``
                with thousands commas removed; solution = the worked text with ``<<calc>>`` notes removed.
- ``synthetic`` the embedded arithmetic task (:mod:`tcrlsd.synthetic`), generated from the seed.

Raw records come from local JSONL or Parquet files, or ``hf:<dataset id>`` when the optional
``datasets`` package is installed and the network works.

Selection is deterministic: each source shuffles its usable records with a ``random.Random`` seeded
from (``seed``, source name, split) and takes the first ``count``. Rows keep the order of
``sources`` in params, and within a source the shuffled order.

Accounting (what the metrics JSON records, per source): records read, records skipped because no
gold answer could be found (each id with its file:line and reason; ``missing_answer: error`` makes
that an error instead),
val records dropped because the same problem text was selected for train, and rows kept per level.
A val set must be held out: a val problem whose text equals a selected train problem is never
kept (synthetic val sources redraw instead, so their ``count`` is still met).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa

from tcrlsd.schemas import schema_for, validate

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "FORMATS",
    "PrepareError",
    "PrepareParams",
    "Row",
    "SourceParams",
    "extract_boxed",
    "gsm8k_answer",
    "gsm8k_solution",
    "parse_math_level",
    "prepare",
    "read_raw",
    "render_prompt",
    "select",
]

# verl's MATH/GSM8K prompt (data_preprocess/math_dataset.py): the problem, one space, the instruction.
DEFAULT_PROMPT_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."

HF_HINT = "install tcrlsd[hf] and have network access, or give a local file"


class PrepareError(ValueError):
    """Raw data or prepare params are wrong; the message names the file, line and field."""


# --------------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class SourceParams:
    """One raw problem set and how much of it goes into which split."""

    name: str  # names the source in prompt ids, the ``source`` column and the metrics
    format: Literal["math", "math500", "gsm8k", "synthetic"]
    split: Literal["train", "val"]
    path: str | None = None  # JSONL/Parquet file, or "hf:<dataset id>"; null for synthetic
    count: int | None = None  # rows to keep after the seeded shuffle; null = all
    levels: tuple[int, ...] | None = None  # synthetic only: levels to cycle through
    max_operand: int | None = None  # synthetic only: largest starting number / added operand
    hf_config: str | None = None  # hf: paths only: dataset configuration (e.g. "main" for gsm8k)
    hf_split: str | None = None  # hf: paths only: dataset split; default "train" / "test" by split

    def __post_init__(self) -> None:
        label = f"source {self.name!r}"
        if not self.name or "/" in self.name or "#" in self.name:
            raise ValueError(f"{label}: name must be non-empty without '/' or '#' (it prefixes prompt ids)")
        if self.count is not None and self.count < 0:
            raise ValueError(f"{label}: count must be >= 0 or null (all), got {self.count}")
        if self.format == "synthetic":
            if self.path is not None:
                raise ValueError(f"{label}: a synthetic source has no path (got {self.path!r}); set path: null")
            if self.count is None:
                raise ValueError(f"{label}: a synthetic source needs a count (it has no 'all')")
            if self.levels is not None and (not self.levels or min(self.levels) < 1):
                raise ValueError(f"{label}: levels must be a non-empty list of integers >= 1, got {list(self.levels)}")
            if self.max_operand is not None and self.max_operand < 2:
                raise ValueError(f"{label}: max_operand must be >= 2, got {self.max_operand}")
        else:
            if not self.path:
                raise ValueError(f"{label}: format {self.format!r} needs a path (a .jsonl/.parquet file or hf:<id>)")
            extra = [k for k in ("levels", "max_operand") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{label}: {', '.join(extra)} only apply to synthetic sources")
        if (self.hf_config or self.hf_split) and not (self.path or "").startswith("hf:"):
            raise ValueError(f"{label}: hf_config / hf_split only apply to hf:<dataset id> paths")


_DEFAULT_SOURCES = (
    SourceParams(name="synthetic", format="synthetic", split="train", count=2000, levels=(1, 2, 3, 4), max_operand=20),
    SourceParams(name="synthetic", format="synthetic", split="val", count=200, levels=(1, 2, 3, 4), max_operand=20),
)


@dataclass(frozen=True)
class PrepareParams:
    """``params.yaml`` section ``prepare``."""

    sources: tuple[SourceParams, ...] = _DEFAULT_SOURCES
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat_template_tokenizer: str | None = None
    missing_answer: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources is empty; list at least one source")
        pairs = Counter((s.name, s.split) for s in self.sources)
        dup = [f"{n}/{s}" for (n, s), c in pairs.items() if c > 1]
        if dup:
            raise ValueError(f"two sources share name and split ({', '.join(dup)}); give them distinct names")
        if "{problem}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{problem}}; got {self.prompt_template!r}")


# --------------------------------------------------------------------------------------------------
# Gold answers


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped character (\{ or \}) never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if none.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); a box inside a box is
    part of the outer one's content. ``\\boxed 5`` (no braces; two MATH train solutions write that)
    takes the text up to the next ``$`` or line end, as verl does. An unclosed ``\\boxed{`` is ignored.
    """
    found: str | None = None
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        j = i
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is None:
                pos = m.end()
                continue
            found, pos = got[0].strip(), got[1]
        elif j > i:  # "\boxed 5": a space, then a bare argument
            end = j
            while end < len(text) and text[end] not in "$\n":
                end += 1
            arg = text[j:end].strip()
            if arg:
                found = arg
            pos = end
        else:
            pos = m.end()
    return found


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_answer(answer_field: str) -> str | None:
    """Final answer of a GSM8K ``answer`` field: the text after ``####``, thousands commas removed."""
    if "####" not in answer_field:
        return None
    final = answer_field.rsplit("####", 1)[1].strip()
    return _THOUSANDS.sub("", final) or None


def gsm8k_solution(answer_field: str) -> str:
    """The worked text before ``####`` with the ``<<48/2=24>>`` calculator annotations removed."""
    return _CALC.sub("", answer_field.rsplit("####", 1)[0]).strip()


def parse_math_level(value: Any) -> int | None:
    """``"Level 3"`` -> 3, ``"Level ?"`` -> None, ``3`` -> 3, None -> None; anything else raises."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"level {value!r} is not 'Level N' or an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", value)
        if m:
            return None if m.group(1) == "?" else int(m.group(1))
    raise ValueError(f"level {value!r} is not 'Level N', 'Level ?' or an integer")


# --------------------------------------------------------------------------------------------------
# Reading raw records


@dataclass(frozen=True)
class RawRecord:
    index: int  # 0-based position among the file's records (blank JSONL lines are not records)
    where: str  # "file:line" (1-based line) or "file row N" -- for error messages
    data: dict


def _jsonl_records(path: Path) -> Iterator[RawRecord]:
    index = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrepareError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(data, dict):
                raise PrepareError(f"{path}:{line_no}: expected a JSON object, got {type(data).__name__}")
            yield RawRecord(index, f"{path}:{line_no}", data)
            index += 1


def _parquet_records(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PrepareError(f"{path}: not a readable Parquet file: {exc}") from None
    for i, row in enumerate(table.to_pylist()):
        yield RawRecord(i, f"{path} row {i}", row)


def _hf_records(source: SourceParams) -> Iterator[RawRecord]:
    dataset_id = source.path[len("hf:") :]
    hf_split = source.hf_split or ("train" if source.split == "train" else "test")
    try:
        import datasets  # optional extra: tcrlsd[hf]
    except ImportError:
        raise PrepareError(
            f"source {source.name!r}: {source.path} is a Hugging Face dataset, but the `datasets` package "
            f"is not installed; {HF_HINT}"
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, source.hf_config, split=hf_split)
    except Exception as exc:  # network, unknown id, unknown split: all end the same way for the user
        raise PrepareError(
            f"source {source.name!r}: could not load Hugging Face dataset {dataset_id!r} "
            f"(config {source.hf_config!r}, split {hf_split!r}): {type(exc).__name__}: {exc}; {HF_HINT}"
        ) from None
    for i, row in enumerate(ds):
        yield RawRecord(i, f"{source.path}[{hf_split}] row {i}", dict(row))


def read_raw(source: SourceParams) -> tuple[str, Iterator[RawRecord]]:
    """``(file label, records)`` of a non-synthetic source; the label goes into GSM8K prompt ids."""
    path = source.path or ""
    if path.startswith("hf:"):
        return (source.hf_split or ("train" if source.split == "train" else "test")), _hf_records(source)
    p = Path(path)
    if not p.is_file():
        raise PrepareError(f"source {source.name!r}: {p}: no such file (expected a .jsonl or .parquet file, or hf:<id>)")
    if p.suffix == ".parquet":
        return p.stem, _parquet_records(p)
    if p.suffix == ".jsonl":
        return p.stem, _jsonl_records(p)
    raise PrepareError(f"source {source.name!r}: {p}: unknown file type {p.suffix!r}; expected .jsonl or .parquet")


# --------------------------------------------------------------------------------------------------
# Formats: raw record -> Row (or None when it has no gold answer)


@dataclass(frozen=True)
class Row:
    prompt_id: str
    problem: str
    answer: str | None  # None: no gold answer could be found (skipped or an error, by params)
    solution: str | None
    level: int | None
    subject: str | None


def _field(rec: RawRecord, key: str, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    if key not in rec.data:
        if not required:
            return None
        raise PrepareError(
            f"{rec.where}: record has no field {key!r}; fields found: {', '.join(sorted(rec.data)) or '(none)'}"
        )
    value = rec.data[key]
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PrepareError(f"{rec.where}: field {key!r} should be a {want}, got {value!r}")
    if isinstance(value, str) and required and not value.strip():
        raise PrepareError(f"{rec.where}: field {key!r} is empty")
    return value


def _level(rec: RawRecord, key: str = "level") -> int | None:
    try:
        return parse_math_level(_field(rec, key, (str, int)))
    except ValueError as exc:
        raise PrepareError(f"{rec.where}: {exc}") from None


def _math_row(source: SourceParams, label: str, rec: RawRecord) -> Row:
    # unique_id is what the MATH/PRM800K files carry ("train/algebra/0.json"); the Hugging Face
    # copies of MATH lack it, so fall back to file label and record index.
    uid = _field(rec, "unique_id", required=False)
    solution = _field(rec, "solution")
    return Row(
        prompt_id=f"{source.name}/{uid}" if uid else f"{source.name}/{label}/{rec.index}",
        problem=_field(rec, "problem"),
        answer=extract_boxed(solution),
        solution=solution,
        level=_level(rec),
        subject=_field(rec, "type"),
    )


def _math500_row(source: SourceParams, label: str, rec: RawRecord) -> Row:
    return Row(
        prompt_id=f"{source.name}/{_field(rec, 'unique_id')}",
        problem=_field(rec, "problem"),
        answer=_field(rec, "answer").strip(),
        solution=_field(rec, "solution"),
        level=_level(rec),
        subject=_field(rec, "subject"),
    )


def _gsm8k_row(source: SourceParams, label: str, rec: RawRecord) -> Row:
    text = _field(rec, "answer")
    return Row(
        prompt_id=f"{source.name}/{label}/{rec.index}",
        problem=_field(rec, "question"),
        answer=gsm8k_answer(text),
        solution=gsm8k_solution(text),
        level=None,
        subject=None,
    )


FormatFn = Callable[[SourceParams, str, RawRecord], Row]

# format name -> converter of one raw record (synthetic has no raw records: see _synthetic_rows).
FORMATS: dict[str, FormatFn] = {"math": _math_row, "math500": _math500_row, "gsm8k": _gsm8k_row}



def _missing_why(fmt: str, row: Row) -> str:
    """Why ``row`` has no gold answer, in words for the warning and the metrics."""
    if fmt == "gsm8k":
        return "no '#### <answer>' in the answer field"
    if fmt == "math" and row.answer is not None:
        return "the last \\boxed{} of the solution is empty"
    return "no \\boxed{} in the solution"


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
                f"already in train; the level-{level} problem space is too small for these counts"
            )
        rows.append(Row(f"{source.name}/{source.split}/{i}", p.problem, p.answer, p.solution, p.level, "arithmetic"))
    return rows, redraws


def _source_rows(source: SourceParams, params: PrepareParams, exclude: set[str]) -> tuple[list[Row], dict]:
    what = f"source {source.name!r} ({source.split})"
    stats: dict[str, Any] = {"format": source.format, "path": source.path, "split": source.split}
    if source.format == "synthetic":
        rows, redraws = _synthetic_rows(source, params.seed, exclude)
        stats.update(records_read=len(rows), skipped_no_answer=0, skipped={}, val_overlap_redrawn=redraws,
                     val_overlap_dropped=0)
        return rows, stats
    label, records = read_raw(source)
    convert = FORMATS[source.format]
    usable, skipped, overlap, n = [], {}, 0, 0
    for rec in records:
        n += 1
        row = convert(source, label, rec)
        if row.answer is None or not row.answer.strip():
            why = _missing_why(source.format, row)
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
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


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

    Train sources are built first, so val sources can exclude problems already selected for train;
    the output keeps the order of ``params.sources``. Relative paths are relative to the working
    directory (the repository root under ``dvc repro``).
    """
    tokenizer = _chat_tokenizer(params.chat_template_tokenizer)
    built: dict[int, tuple[list[Row], dict]] = {}
    train_problems: set[str] = set()
    for pass_split in ("train", "val"):
        for i, source in enumerate(params.sources):
            if source.split != pass_split:
                continue
            exclude = train_problems if pass_split == "val" else set()
            rows, stats = _source_rows(source, params, exclude)
            built[i] = (rows, stats)
            if pass_split == "train":
                train_problems.update(_norm(r.problem) for r in rows)

    columns: dict[str, list] = {f.name: [] for f in schema_for("prompts")}
    seen: dict[str, str] = {}
    metrics: dict[str, Any] = {"sources": {}, "rows": 0, "rows_by_split": {"train": 0, "val": 0}}
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
