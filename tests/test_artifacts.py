"""Atomic writes, deterministic bytes, resumable sharded outputs."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tcrlsd.artifacts import ShardSpec, StaleOutputError, read_artifact, split_evenly, write_json, write_table
from tcrlsd.resume import ShardedOutput
from tcrlsd.schemas import SchemaError


def _verdicts(ids):
    n = len(ids)
    return pa.table({
        "rollout_id": ids, "reward": pa.array([1.0] * n, pa.float32()), "is_correct": [True] * n,
        "extracted_answer": ["3"] * n, "reason": ["correct"] * n, "verifier": ["math_verify"] * n,
    })


def test_same_table_gives_same_bytes(tmp_path):
    t = _verdicts(["a", "b"])
    write_table(t, tmp_path / "1.parquet", "verdicts")
    write_table(t, tmp_path / "2.parquet", "verdicts")
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "verdicts.parquet"
    write_table(_verdicts(["a"]), p, "verdicts")
    before = p.read_bytes()
    bad = _verdicts(["a"]).drop_columns(["reason"])
    with pytest.raises(SchemaError):
        write_table(bad, p, "verdicts")
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["verdicts.parquet"]


def test_write_json_rejects_nan_without_clobbering(tmp_path):
    p = tmp_path / "m.json"
    write_json({"a": 1}, p)
    with pytest.raises(ValueError):
        write_json({"a": float("nan")}, p)
    assert p.read_text().strip().startswith("{")
    assert len(list(tmp_path.iterdir())) == 1


def test_shard_spec_parse():
    assert ShardSpec.parse("1/3") == ShardSpec(1, 3)
    assert ShardSpec.parse(None) == ShardSpec(0, 1)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError, match="i/N"):
            ShardSpec.parse(bad)
    assert [p for p in range(7) if ShardSpec(1, 3).owns(p)] == [1, 4]


def test_split_evenly_covers_everything():
    for n, k in [(10, 3), (3, 10), (0, 4), (8, 8)]:
        parts = split_evenly(n, k)
        assert [i for r in parts for i in r] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_output_resume_and_stale_fingerprint(tmp_path):
    folder = tmp_path / "verdicts"
    out = ShardedOutput(folder, "verdicts", 3, {"seed": 1})
    out.write(0, _verdicts(["a"]))
    out.write(2, _verdicts(["c"]))
    with pytest.raises(SchemaError, match=r"incomplete verdicts artifact: 1 of 3 part\(s\) missing \(e.g. part-00001"):
        read_artifact(folder, "verdicts")
    again = ShardedOutput(folder, "verdicts", 3, {"seed": 1})
    assert again.pending() == [1]
    assert again.pending(ShardSpec(0, 2)) == []
    again.write(1, _verdicts(["b"]))
    assert again.complete()
    assert read_artifact(folder, "verdicts").column("rollout_id").to_pylist() == ["a", "b", "c"]
    # a changed fingerprint is an error that deletes nothing; restart=True starts over
    with pytest.raises(StaleOutputError, match=r"3 finished part\(s\) were made with other seed.*--restart"):
        ShardedOutput(folder, "verdicts", 3, {"seed": 2})
    assert again.complete()
    fresh = ShardedOutput(folder, "verdicts", 3, {"seed": 2}, restart=True)
    assert fresh.pending() == [0, 1, 2]
