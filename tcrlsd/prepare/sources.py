"""Raw records (JSONL, Parquet, hf:) and the per-format conversion of one record into a prompt row."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyarrow as pa

from tcrlsd.errors import TcrlsdError
from tcrlsd.answers import final_boxed_answer

if TYPE_CHECKING:  # prepare.params imports FORMATS (its formats' choices): annotation only
    from tcrlsd.prepare.params import SourceParams

HF_HINT = "install tcrlsd[hf] and have network access, or give a local file"


class PrepareError(TcrlsdError, ValueError):
    """Raw data or prepare params are wrong; the message names the file, line and field."""


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


def math_row(source: SourceParams, label: str, rec: RawRecord) -> Row:
    # unique_id is what the MATH/PRM800K files carry ("train/algebra/0.json"); the Hugging Face
    # copies of MATH lack it, so fall back to file label and record index.
    uid = _field(rec, "unique_id", required=False)
    solution = _field(rec, "solution")
    return Row(
        prompt_id=f"{source.name}/{uid}" if uid else f"{source.name}/{label}/{rec.index}",
        problem=_field(rec, "problem"),
        answer=final_boxed_answer(solution),  # every part of an answer boxed part by part
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


FormatFn = Callable[["SourceParams", str, RawRecord], Row]


def _no_box(row: Row) -> str:
    return "no \\boxed{} in the solution"


def _math_missing(row: Row) -> str:
    return "the last \\boxed{} of the solution is empty" if row.answer is not None else _no_box(row)


def _gsm8k_missing(row: Row) -> str:
    return "no '#### <answer>' in the answer field"


@dataclass(frozen=True)
class Format:
    """One raw data format: the converter of one record, and why a converted row has no gold answer.

    ``row`` None: the format has no raw records, its rows are generated (synthetic, in the stage).
    """

    row: FormatFn | None
    missing: Callable[[Row], str] = _no_box


# format name -> Format; the only list of formats (params prepare.sources[].format checks against it)
FORMATS: dict[str, Format] = {
    "math": Format(math_row, _math_missing),
    "math500": Format(_math500_row),
    "gsm8k": Format(_gsm8k_row, _gsm8k_missing),
    "synthetic": Format(None),
}
