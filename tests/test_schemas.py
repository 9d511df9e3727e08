"""Schema validation: every contract violation gets an error naming the file, column/row and expectation."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.schemas import ARTIFACTS, SchemaError, check_token_lengths, empty_table, schema_for, validate


def _rollouts(n=3, lengths=(2, 3, 1)):
    return pa.table(
        {
            "rollout_id": [f"p{i // 2}#{i % 2}" for i in range(n)],
            "prompt_id": [f"p{i // 2}" for i in range(n)],
            "sample_idx": pa.array([i % 2 for i in range(n)], pa.int32()),
            "iteration": pa.array([0] * n, pa.int32()),
            "prompt_token_ids": pa.array([[1, 5, 6]] * n, pa.list_(pa.int32())),
            "response_token_ids": pa.array([list(range(7, 7 + k)) for k in lengths], pa.list_(pa.int32())),
            "response_text": ["a"] * n,
            "finish_reason": ["stop"] * n,
        }
    )


def _scores(lengths=(2, 3, 1), teacher_lengths=None, ids=None):
    teacher_lengths = teacher_lengths or lengths
    return pa.table(
        {
            "rollout_id": ids or [f"p{i // 2}#{i % 2}" for i in range(len(lengths))],
            "student_logprobs": pa.array([[-0.5] * k for k in lengths], pa.list_(pa.float32())),
            "teacher_logprobs": pa.array([[-0.25] * k for k in teacher_lengths], pa.list_(pa.float32())),
            "teacher_checkpoint": ["models/policy-0000"] * len(lengths),
        }
    )


def test_every_artifact_has_a_schema_with_comments():
    for name, cols in ARTIFACTS.items():
        assert schema_for(name).names == [c.name for c in cols]
        assert empty_table(name).num_rows == 0
        validate(empty_table(name), name)


def test_valid_tables_pass_and_are_cast_to_canonical_types():
    t = _rollouts()
    # polars-style wide types are accepted and narrowed
    wide = t.set_column(0, "rollout_id", t.column("rollout_id").cast(pa.large_string()))
    wide = wide.set_column(5, "response_token_ids", t.column("response_token_ids").cast(pa.large_list(pa.int64())))
    out = validate(wide, "rollouts")
    assert out.schema.field("rollout_id").type == pa.string()
    assert out.schema.field("response_token_ids").type == pa.list_(pa.int32())


def test_missing_column_names_file_and_columns():
    t = _rollouts().drop_columns(["finish_reason"])
    with pytest.raises(SchemaError, match=r"x\.parquet: rollouts is missing column\(s\) finish_reason; expected columns: rollout_id"):
        validate(t, "rollouts", source="x.parquet")


def test_wrong_type_names_column_and_expected_type():
    t = _scores()
    t = t.set_column(1, "student_logprobs", pa.array(["a", "b", "c"]))
    with pytest.raises(SchemaError, match=r"s\.parquet: scores: column 'student_logprobs' has type string, expected list<item: float>"):
        validate(t, "scores", source="s.parquet")


def test_list_length_mismatch_within_table_names_row():
    t = _scores(lengths=(2, 3, 1), teacher_lengths=(2, 4, 1))
    with pytest.raises(SchemaError, match=r"scores: row 1: len\(teacher_logprobs\) = 4 but len\(student_logprobs\) = 3"):
        validate(t, "scores")


def test_list_length_mismatch_against_rollouts_names_rollout():
    with pytest.raises(SchemaError, match=r"rollout_id 'p1#0': len\(student_logprobs\) = 5 but len\(response_token_ids\) = 1"):
        check_token_lengths(_rollouts(), _scores(lengths=(2, 3, 5)), "scores")


def test_check_token_lengths_reorders_and_reports_missing_and_extra():
    s = _scores()
    rev = s.take([2, 1, 0])
    assert check_token_lengths(_rollouts(), rev, "scores").column("rollout_id").to_pylist() == ["p0#0", "p0#1", "p1#0"]
    with pytest.raises(SchemaError, match=r"has no row for 1 rollout\(s\), e.g. rollout_id 'p1#0'"):
        check_token_lengths(_rollouts(), s.slice(0, 2), "scores")
    with pytest.raises(SchemaError, match="unknown rollouts"):
        check_token_lengths(_rollouts(n=2, lengths=(2, 3)), s, "scores")


def test_nan_and_null_are_rejected_with_row():
    t = _scores()
    bad = t.set_column(2, "teacher_logprobs", pa.array([[-0.1, -0.2], [-0.3, math.nan, -0.1], [-1.0]], pa.list_(pa.float32())))
    with pytest.raises(SchemaError, match=r"column 'teacher_logprobs' has NaN or inf at row 1"):
        validate(bad, "scores")
    nul = t.set_column(0, "rollout_id", pa.array(["a", None, "c"]))
    with pytest.raises(SchemaError, match=r"column 'rollout_id' has 1 null value\(s\) \(first at row 1\)"):
        validate(nul, "scores")


def test_duplicate_ids_rejected():
    t = _scores(ids=["a", "b", "a"])
    with pytest.raises(SchemaError, match="rollout_id 'a' appears more than once"):
        validate(t, "scores")


def test_malformed_parquet_file_names_file(tmp_path):
    p = tmp_path / "scores.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match=r"scores\.parquet: not a readable Parquet file"):
        read_artifact(p, "scores")


def test_reader_accepts_file_and_folder_of_shards(tmp_path):
    s = _scores()
    write_artifact(s, tmp_path / "a" / "scores.parquet", "scores")
    folder = tmp_path / "b" / "scores"
    folder.mkdir(parents=True)
    pq.write_table(s.slice(0, 2), folder / "part-00000.parquet")
    pq.write_table(s.slice(2), folder / "part-00001.parquet")
    one = read_artifact(tmp_path / "a" / "scores", "scores")
    two = read_artifact(folder, "scores")
    assert one.equals(two)
    assert read_artifact(tmp_path / "b" / "scores.parquet", "scores").equals(one)


def test_optional_extra_context_columns_are_validated_when_present():
    base = _scores(lengths=(2, 3, 1))
    nested = pa.list_(pa.list_(pa.float32()))
    kinds = pa.array([["wrong_hint"] * 2] * 3, pa.list_(pa.string()))
    good = [[[-1.0] * k] * 2 for k in (2, 3, 1)]
    t = base.append_column("extra_teacher_logprobs", pa.array(good, nested)).append_column("extra_teacher_kinds", kinds)
    assert validate(t, "scores").column_names[-2:] == ["extra_teacher_logprobs", "extra_teacher_kinds"]
    assert validate(base, "scores").column_names == schema_for("scores").names  # absent: nothing required
    # row 1's second context is one value short of its response
    short = [good[0], [[-1.0] * 3, [-1.0] * 2], good[2]]
    with pytest.raises(SchemaError, match=r"row 1: an entry of extra_teacher_logprobs has 2 values but "
                                          r"len\(student_logprobs\) = 3"):
        validate(base.append_column("extra_teacher_logprobs", pa.array(short, nested))
                 .append_column("extra_teacher_kinds", kinds), "scores")
    nan = [good[0], good[1], [[-1.0], [math.nan]]]
    with pytest.raises(SchemaError, match=r"'extra_teacher_logprobs' has NaN or inf at row 2"):
        validate(base.append_column("extra_teacher_logprobs", pa.array(nan, nested))
                 .append_column("extra_teacher_kinds", kinds), "scores")
    with pytest.raises(SchemaError, match=r"row 0: len\(extra_teacher_logprobs\) = 2 but len\(extra_teacher_kinds\) = 1"):
        validate(t.set_column(5, "extra_teacher_kinds", pa.array([["wrong_hint"]] * 3, pa.list_(pa.string()))), "scores")
    with pytest.raises(SchemaError, match=r"'extra_teacher_logprobs' needs column 'extra_teacher_kinds'"):
        validate(base.append_column("extra_teacher_logprobs", pa.array(good, nested)), "scores")
