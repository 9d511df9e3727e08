"""The Parquet contracts between stages: one schema per artifact, one ``validate``.

The schema is the API (ARCHITECTURE.md). Every stage validates what it reads and what it writes
through this module, so a wrong file fails at the boundary with a message that names the file, the
column or row, and what was expected -- never deep inside a model call.

Token-level columns are ``list<float32>`` / ``list<int32>`` whose length equals that row's
``len(response_token_ids)``; within one table that is checked by :func:`validate`, across tables
(scores vs rollouts, say) by :func:`check_token_lengths`.

Extra columns are allowed (they are carried along); an optional column (``required=False``: one
added after files were written without it) is checked only where present; required columns must exist with a compatible
type: ``large_string`` / ``large_list`` (what polars writes) are accepted and cast to the canonical
narrow types on read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.errors import TcrlsdError

__all__ = [
    "ARTIFACTS",
    "CONDITIONAL_COLUMNS",
    "SchemaError",
    "schema_for",
    "validate",
    "check_token_lengths",
    "empty_table",
]


class SchemaError(TcrlsdError, ValueError):
    """A Parquet file or table does not match its contract."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    # For token-level list columns: the column whose list length this one must equal.
    same_length_as: str | None = None
    doc: str = ""
    # False: files written before the column existed stay valid; checked only where present.
    required: bool = True


_I32_LIST = pa.list_(pa.int32())
_F32_LIST = pa.list_(pa.float32())

# fmt: off
ARTIFACTS: dict[str, tuple[Column, ...]] = {
    "prompts": (
        Column("prompt_id", pa.string(), doc="string  # unique within the dataset, e.g. 'math500/test/algebra/1.json'"),
        Column("split", pa.string(), doc="string  # 'train', 'val' or 'test' (tcrlsd.prepare.params.SPLITS)"),
        Column("problem", pa.string(), doc="string  # the question as written in the source"),
        Column("prompt", pa.string(), doc="string  # the rendered policy input (template, chat template)"),
        Column("answer", pa.string(), doc="string  # gold final answer (last \\boxed{} of the solution, or the answer field)"),
        Column("solution", pa.string(), nullable=True, doc="string|null  # gold worked solution"),
        Column("source", pa.string(), doc="string  # dataset name: synthetic, math, math500, gsm8k, ..."),
        Column("level", pa.int32(), nullable=True, doc="int32|null  # difficulty level; null when unknown"),
        Column("subject", pa.string(), nullable=True, doc="string|null  # MATH subject / synthetic family"),
    ),
    "rollouts": (
        Column("rollout_id", pa.string(), doc="string  # '<prompt_id>#<sample_idx>', unique within an iteration"),
        Column("prompt_id", pa.string(), doc="string  # join key into prompts"),
        Column("sample_idx", pa.int32(), doc="int32  # index inside the GRPO group, 0..samples_per_prompt-1"),
        Column("iteration", pa.int32(), doc="int32  # training step k that produced the rollout"),
        Column("prompt_token_ids", _I32_LIST, doc="list<int32>  # exactly what the policy was conditioned on"),
        Column("response_token_ids", _I32_LIST,
               doc="list<int32>  # the sampled ids, never re-tokenised text; a 'stop' row ends with its "
                   "stop id (EOS), which every token-level column covers like any other token"),
        Column("response_text", pa.string(),
               doc="string  # decoded response_token_ids without the stop id (special tokens skipped)"),
        Column("finish_reason", pa.string(),
               doc="string  # 'stop' (a stop id was sampled: the last id) 'length' (max_new_tokens ids, fewer if the context filled) or "
                    "'prompt_too_long' (no ids: the prompt fills the context; vllm)"),
        Column("sampler_logprobs", _F32_LIST, same_length_as="response_token_ids", required=False,
               doc="list<float32>  # the sampler's log-prob of each sampled id under the distribution it was drawn "
                   "from (after temperature and top_p; tcrlsd.generation); len == len(response_token_ids); "
                   "optional (absent in rollouts written before it existed)"),
        Column("sampler", pa.string(), nullable=True, required=False,
               doc="string|null  # what drew the row (tcrlsd.sampler.sampler_record): canonical JSON of backend, "
                   "engine device and dtype, temperature, top_p and the policy folder's content digest; the score "
                   "stage reads it to decide whether sampler_logprobs equal its student forward; null = not "
                   "known (hand-made rows); optional"),
    ),
    "verdicts": (
        Column("rollout_id", pa.string()),
        Column("reward", pa.float32(), doc="float32  # 1.0 or 0.0, plus the overlong penalty if on (verify/overlong.py)"),
        Column("is_correct", pa.bool_()),
        Column("extracted_answer", pa.string(), nullable=True, doc="string|null  # the last \\boxed{} (or final number)"),
        Column("reason", pa.string(), doc="string  # correct | incorrect | no_answer | unparsable | timeout"),
        Column("verifier", pa.string(), doc="string  # grader name from the registry"),
    ),
    "critiques": (
        Column("rollout_id", pa.string()),
        Column("mode", pa.string(), doc="string  # a key of MODES (tcrlsd/critique/params.py)"),
        Column("critic", pa.string(), doc="string  # backend and model that wrote the feedback; '|<tag>' = what a control did"),
        Column("feedback_text", pa.string(), nullable=True, doc="string|null  # null = no feedback (teacher = student)"),
        Column("template", pa.string(), doc="string  # prompt template version id(s)"),
        Column("teacher_prompt", pa.string(), nullable=True,
               doc="string|null  # the rendered teacher context (problem + feedback); null when no feedback"),
        Column("error", pa.string(), nullable=True,
               doc="string|null  # why feedback is missing for a row that should have it (critic failure, or "
                   "'truncated: not critiqued (finish_reason length)' under critique.skip_truncated)"),
        Column("leaks_answer", pa.bool_(), doc="bool  # feedback contains the gold final answer verbatim"),
        Column("suspected_false_negative", pa.bool_(),
               doc="bool  # critic says the rollout is right, or a relaxed grader accepts it"),
    ),
    "scores": (
        Column("rollout_id", pa.string()),
        Column("student_logprobs", _F32_LIST, doc="list<float32>  # log pi(y_t | x, y_<t); len == len(response_token_ids)"),
        Column("teacher_logprobs", _F32_LIST, same_length_as="student_logprobs",
               doc="list<float32>  # log pi(y_t | x, f, y_<t); len == len(response_token_ids)"),
        Column("teacher_checkpoint", pa.string(), doc="string  # which weights played the teacher (path or id)"),
    ),
    "advantages": (
        Column("rollout_id", pa.string()),
        Column("group_advantage", pa.float32(),
               doc="float32  # the estimator's outcome advantage A of the rollout (GRPO: its group's normalised reward)"),
        Column("advantages", _F32_LIST, doc="list<float32>  # per-token A_hat_t; len == len(response_token_ids)"),
        Column("estimator", pa.string(), doc="string  # a key of ESTIMATORS (tcrlsd/advantages/estimators.py)"),
    ),
    # One row per held-out prompt x decoding x sample (evaluate stage).
    "evaluations": (
        Column("eval_id", pa.string(), doc="string  # '<prompt_id>#greedy' or '<prompt_id>#s<sample_idx>'; unique"),
        Column("prompt_id", pa.string(), doc="string  # join key into prompts (split == 'val')"),
        Column("decoding", pa.string(), doc="string  # 'greedy' (temperature 0, one sample) or 'sampled' (avg@k)"),
        Column("sample_idx", pa.int32(), doc="int32  # 0 for greedy; 0..k-1 for sampled"),
        Column("response_text", pa.string(), doc="string  # decoded response (special tokens skipped)"),
        Column("response_length", pa.int32(), doc="int32  # response tokens (EOS excluded)"),
        Column("finish_reason", pa.string(), doc="string  # 'stop' or 'length'"),
        Column("reward", pa.float32(), doc="float32  # 1.0 or 0.0 from the verify graders"),
        Column("extracted_answer", pa.string(), nullable=True,
               doc="string?  # what the grader read as the answer (null: none); maj@k votes on it"),
        Column("reason", pa.string(), doc="string  # correct | incorrect | no_answer | unparsable | timeout"),
    ),
}
# Columns a writer adds only in the runs that use them (not in schema_for: absent otherwise, so a run
# that does not use them writes exactly the bytes it wrote before they existed). Checked where present
# by validate's one loop, like a required=False column (which new writers always add). Extra teacher contexts (K > 1): the critique stage
# writes K - 1 extra teacher prompts per row (critique.wrong_hints), the score stage one list of
# log-probs per extra context; `teacher_prompt` / `teacher_logprobs` stay the primary context, so
# every reader of those columns works unchanged at any K.
CONDITIONAL_COLUMNS: dict[str, tuple[Column, ...]] = {
    "critiques": (
        Column("extra_teacher_prompts", pa.list_(pa.string()),
               doc="list<string|null>  # len == K - 1 (the same on every row); the rendered extra teacher "
                   "contexts (same template as teacher_prompt, other feedback); null entry = no text (the row "
                   "has no feedback, or the critic failed): that context is scored as the student"),
        Column("extra_teacher_kinds", pa.list_(pa.string()), same_length_as="extra_teacher_prompts",
               doc="list<string>  # kind of each extra context: 'wrong_hint' (feedback written against "
                   "another prompt's gold solution)"),
        Column("extra_hint_prompt_ids", pa.list_(pa.string()), same_length_as="extra_teacher_prompts",
               doc="list<string|null>  # the prompt whose gold solution each wrong hint was written against"),
    ),
    "scores": (
        Column("extra_teacher_logprobs", pa.list_(_F32_LIST), same_length_as="extra_teacher_kinds",
               doc="list<list<float32>>  # len == K - 1; entry j: log pi(y_t | x, f_j, y_<t), each inner "
                   "len == len(response_token_ids); = student_logprobs where context j has no text"),
        Column("extra_teacher_kinds", pa.list_(pa.string()),
               doc="list<string>  # kind of each extra context, copied from the critiques"),
    ),
}
# Nested token columns: every inner list is as long as this row's value of the named token column.
NESTED_TOKEN_COLUMNS: dict[str, dict[str, str]] = {"scores": {"extra_teacher_logprobs": "student_logprobs"}}

# Columns holding per-response-token values, by artifact; checked against rollouts by
# check_token_lengths.
TOKEN_COLUMNS: dict[str, tuple[str, ...]] = {
    "rollouts": ("response_token_ids",),
    "scores": ("student_logprobs", "teacher_logprobs"),
    "advantages": ("advantages",),
}


# The unique key of artifacts without a rollout_id column.
UNIQUE_KEY: dict[str, str] = {"prompts": "prompt_id", "evaluations": "eval_id"}


def schema_for(name: str) -> pa.Schema:
    """The canonical pyarrow schema of artifact ``name``."""
    try:
        cols = ARTIFACTS[name]
    except KeyError:
        raise SchemaError(f"unknown artifact {name!r}; known: {', '.join(ARTIFACTS)}") from None
    return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in cols])


def empty_table(name: str) -> pa.Table:
    return schema_for(name).empty_table()


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_string(expected):
        return pa.types.is_large_string(actual) or pa.types.is_string_view(actual) or pa.types.is_null(actual)
    if pa.types.is_list(expected):
        if pa.types.is_list(actual) or pa.types.is_large_list(actual):
            return _compatible(actual.value_type, expected.value_type)
        return pa.types.is_null(actual)
    if pa.types.is_int32(expected):
        # int64 from pandas/polars is fine when values fit; checked by the cast.
        return pa.types.is_integer(actual) or pa.types.is_null(actual)
    if pa.types.is_float32(expected):
        return pa.types.is_floating(actual) or pa.types.is_null(actual)
    if pa.types.is_boolean(expected):
        return pa.types.is_null(actual)
    return False


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _first_bad_row(mask: pa.ChunkedArray | pa.Array) -> int:
    idx = pc.indices_nonzero(pc.fill_null(mask, False))
    return int(idx[0].as_py())


def validate(table: pa.Table, name: str, source: str | None = None) -> pa.Table:
    """Check ``table`` against artifact ``name`` and return it cast to the canonical types.

    ``source`` (a file path, usually) is named in every error. Checks: required columns present,
    types compatible, no nulls in non-nullable columns, no NaN/inf in float columns, token-level list
    columns of equal length row by row.
    """
    where = _where(source)
    expected = ARTIFACTS.get(name)
    if expected is None:
        raise SchemaError(f"{where}unknown artifact {name!r}; known: {', '.join(ARTIFACTS)}")
    missing = [c.name for c in expected if c.required and c.name not in table.column_names]
    if missing:
        raise SchemaError(
            f"{where}{name} is missing column(s) {', '.join(missing)}; "
            f"expected columns: {', '.join(c.name for c in expected if c.required)}; found: {', '.join(table.column_names)}"
        )
    conditional = tuple(c for c in CONDITIONAL_COLUMNS.get(name, ()) if c.name in table.column_names)
    for col in conditional:
        if col.same_length_as and col.same_length_as not in table.column_names:
            raise SchemaError(f"{where}{name}: column {col.name!r} needs column {col.same_length_as!r} beside it")
    expected = tuple(c for c in expected if c.name in table.column_names) + conditional  # optional ones where present
    for col in expected:
        arr = table.column(col.name)
        if not _compatible(arr.type, col.type):
            raise SchemaError(
                f"{where}{name}: column {col.name!r} has type {arr.type}, expected {col.type} ({col.doc or col.type})"
            )
        if arr.type != col.type:
            try:
                arr = arr.cast(col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{where}{name}: column {col.name!r} cannot be cast from {arr.type} to {col.type}: {exc}"
                ) from None
            table = table.set_column(table.schema.get_field_index(col.name), col.name, arr)
        if not col.nullable and arr.null_count:
            row = _first_bad_row(pc.is_null(arr))
            raise SchemaError(
                f"{where}{name}: column {col.name!r} has {arr.null_count} null value(s) (first at row {row}); "
                "nulls are not allowed there"
            )
        value_type, depth = col.type, 0
        while pa.types.is_list(value_type):
            value_type, depth = value_type.value_type, depth + 1
        if pa.types.is_floating(value_type) and len(arr):
            flat, levels = arr, []
            for _ in range(depth):  # peel list levels, keeping each level's parent indices
                levels.append(pc.list_parent_indices(flat))
                flat = pc.list_flatten(flat)
            if len(flat) and pc.all(pc.is_finite(flat)).as_py() is False:
                row = _first_bad_row(pc.invert(pc.is_finite(flat)))
                for parents in reversed(levels):
                    row = int(parents[row].as_py())
                raise SchemaError(f"{where}{name}: column {col.name!r} has NaN or inf at row {row}; expected finite values")
    for col in expected:
        if col.same_length_as:
            a = pc.list_value_length(table.column(col.name))
            b = pc.list_value_length(table.column(col.same_length_as))
            neq = pc.not_equal(a, b)
            if pc.any(neq).as_py():
                row = _first_bad_row(neq)
                raise SchemaError(
                    f"{where}{name}: row {row}: len({col.name}) = {a[row].as_py()} but "
                    f"len({col.same_length_as}) = {b[row].as_py()}; they must be equal"
                )
    for col, outer in NESTED_TOKEN_COLUMNS.get(name, {}).items():
        if col in table.column_names:
            _check_nested_lengths(table.column(col), table.column(outer), col, outer, f"{where}{name}")
    ids = "rollout_id" if "rollout_id" in table.column_names else UNIQUE_KEY.get(name)
    if ids and table.num_rows:
        n_unique = pc.count_distinct(table.column(ids)).as_py()
        if n_unique != table.num_rows:
            counts = pc.value_counts(table.column(ids))
            dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
            raise SchemaError(f"{where}{name}: {ids} {dup!r} appears more than once; {ids} must be unique")
    return table


def _check_nested_lengths(nested, token, col: str, outer: str, where: str) -> None:
    """Every inner list of ``nested`` (list<list<...>>) is as long as its row's ``token`` list."""
    nested = nested.combine_chunks() if isinstance(nested, pa.ChunkedArray) else nested
    inner = pc.list_flatten(nested)  # one entry per (row, context)
    if not len(inner):
        return
    rows = pc.list_parent_indices(nested)  # (entries,) row of each inner list
    want = pc.take(pc.list_value_length(token), rows)
    neq = pc.not_equal(pc.list_value_length(inner), want)
    if pc.any(neq).as_py():
        k = _first_bad_row(neq)
        row = int(rows[k].as_py())
        raise SchemaError(f"{where}: row {row}: an entry of {col} has {pc.list_value_length(inner)[k].as_py()} "
                          f"values but len({outer}) = {want[k].as_py()}; each must be as long as the response")


def check_token_lengths(
    rollouts: pa.Table, other: pa.Table, name: str, source: str | None = None
) -> pa.Table:
    """Check that ``other``'s token-level columns match ``len(response_token_ids)`` by rollout_id.

    Returns ``other`` reordered to ``rollouts``' row order. Every rollout must have exactly one row
    in ``other`` and vice versa.
    """
    where = _where(source)
    r_ids = rollouts.column("rollout_id").to_pylist()
    o_ids = other.column("rollout_id").to_pylist()
    pos = {rid: i for i, rid in enumerate(o_ids)}
    missing = [rid for rid in r_ids if rid not in pos]
    if missing:
        raise SchemaError(
            f"{where}{name} has no row for {len(missing)} rollout(s), e.g. rollout_id {missing[0]!r}"
        )
    if len(o_ids) != len(r_ids):
        extra = sorted(set(o_ids) - set(r_ids))
        raise SchemaError(f"{where}{name} has {len(extra)} row(s) for unknown rollouts, e.g. {extra[0]!r}")
    other = other.take(pa.array([pos[rid] for rid in r_ids], type=pa.int64()))
    want = pc.list_value_length(rollouts.column("response_token_ids"))
    for col in TOKEN_COLUMNS.get(name, ()):
        have = pc.list_value_length(other.column(col))
        neq = pc.not_equal(have, want)
        if pc.any(neq).as_py():
            row = _first_bad_row(neq)
            raise SchemaError(
                f"{where}{name}: rollout_id {r_ids[row]!r}: len({col}) = {have[row].as_py()} but "
                f"len(response_token_ids) = {want[row].as_py()}"
            )
    return other
