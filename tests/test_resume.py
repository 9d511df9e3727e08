"""The resume scheme (tcrlsd.resume via tcrlsd.artifacts): writer-unique temporaries, fsync + rename,
umask permissions, content fingerprints with code identity, live workers that cannot collide, and a
tracked folder whose bytes do not depend on how it was produced."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tcrlsd.artifacts as A
import tcrlsd.resume as R
from tcrlsd.artifacts import AtomicParquetWriter, ShardSpec, StaleOutputError, read_artifact, write_json, write_table
from tcrlsd.resume import ShardedOutput, code_digest, content_digest, output_settings, resume_dir, stage_fingerprint
from tcrlsd.schemas import schema_for


def _verdicts(ids):
    n = len(ids)
    return pa.table({
        "rollout_id": ids, "reward": pa.array([1.0] * n, pa.float32()), "is_correct": [True] * n,
        "extracted_answer": ["3"] * n, "reason": ["correct"] * n, "verifier": ["math_verify"] * n,
    })


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _temp_name(final: str, pid: int, host: str | None = None) -> str:
    return f".{final}.{host or A.host_tag()}-{pid}-0123abcd-0.tmp"


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_final_files_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    write_table(_verdicts(["a"]), tmp_path / "v.parquet", "verdicts")
    write_json({"a": 1}, tmp_path / "m.json")
    with AtomicParquetWriter(tmp_path / "s.parquet", schema_for("verdicts")) as w:
        w.write(_verdicts(["b"]).cast(schema_for("verdicts")))
    out = ShardedOutput(tmp_path / "parts", "verdicts", 1, {"x": 1})
    out.write(0, _verdicts(["c"]))
    for name in ("v.parquet", "m.json", "s.parquet", "parts/part-00000.parquet", "parts/_manifest.json"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name


def test_fsync_before_rename_and_of_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    write_table(_verdicts(["a"]), tmp_path / "v.parquet", "verdicts")
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1] and events[0][1].endswith(".tmp")  # the temporary, before its rename
    assert events[2][1] == str(tmp_path)  # then the folder, so the rename itself is durable


def test_failed_streaming_write_leaves_nothing(tmp_path):
    p = tmp_path / "adv.parquet"
    write_table(_verdicts(["old"]), p, "verdicts")
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with AtomicParquetWriter(p, schema_for("verdicts")) as w:
            w.write(_verdicts(["new"]).cast(schema_for("verdicts")))
            raise RuntimeError("killed mid-stream")
    assert p.read_bytes() == before and sorted(q.name for q in tmp_path.iterdir()) == ["adv.parquet"]


def test_only_provably_stale_temporaries_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / _temp_name("part-00000.parquet", sleeper.pid)
        dead_tmp = tmp_path / _temp_name("part-00001.parquet", dead.pid)
        other_host = tmp_path / _temp_name("part-00002.parquet", dead.pid, host="ffffffff")
        for q in (live_tmp, dead_tmp, other_host):
            q.write_bytes(b"partial")
        ShardedOutput(tmp_path, "verdicts", 3, {"x": 1})
        assert live_tmp.exists()  # a live writer's file: never touched
        assert not dead_tmp.exists()  # its writer is gone on this host: provably stale
        assert other_host.exists()  # another host's writer may be alive
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- fingerprints


def test_content_digest_ignores_paths_mtimes_and_hidden_files(tmp_path, monkeypatch):
    f = tmp_path / "data" / "x.parquet"
    write_table(_verdicts(["a", "b"]), f, "verdicts")
    d = content_digest(f, {})
    monkeypatch.chdir(tmp_path)
    assert content_digest("data/x.parquet", {}) == d == content_digest(str(f.resolve()), {})
    os.utime(f, (1, 1))
    assert content_digest(f, {}) == d  # touched: same bytes, same digest
    folder = content_digest(tmp_path / "data", {})
    (tmp_path / "data" / ".x.parquet.abc.tmp").write_bytes(b"junk")
    (tmp_path / "data" / ".x.resume").mkdir()
    (tmp_path / "data" / ".x.resume" / "fingerprint.json").write_text("{}")
    assert content_digest(tmp_path / "data", {}) == folder
    write_table(_verdicts(["a", "c"]), f, "verdicts")
    assert content_digest(f, {}) != d and content_digest(tmp_path / "data", {}) != folder


def test_digest_cache_skips_rehashing_unchanged_inputs(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(1 << 16))
    cache_dir = tmp_path / ".out.resume"
    calls = []
    real = R.hashlib.sha256
    monkeypatch.setattr(R.hashlib, "sha256", lambda *a: (calls.append(a), real(*a))[1])
    first = stage_fingerprint(code=[], settings={}, inputs={"big": f}, cache_dir=cache_dir)
    n = len(calls)
    assert stage_fingerprint(code=[], settings={}, inputs={"big": f}, cache_dir=cache_dir) == first
    assert len(calls) == n  # the digest came from .out.resume/digests.json: the file was not read again
    f.write_bytes(os.urandom(1 << 16))
    assert stage_fingerprint(code=[], settings={}, inputs={"big": f}, cache_dir=cache_dir) != first


def test_code_digest_follows_the_source(tmp_path, monkeypatch):
    pkg = tmp_path / "fakestage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("X = 1\n")
    (tmp_path / "single.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_digest(["fakestage", "single"])
    (pkg / "core.py").write_text("X = 2  # a fix\n")
    after = code_digest(["fakestage", "single"])
    assert after["fakestage"] != before["fakestage"] and after["single"] == before["single"]
    with pytest.raises(ValueError, match="no module named 'nosuchmodule'"):
        code_digest(["nosuchmodule"])


def test_output_settings_drops_only_named_performance_fields():
    from tcrlsd.generate import GenerateParams

    s = output_settings(GenerateParams(), ignore=("num_threads", "engine.device"))
    assert "num_threads" not in s and "device" not in s["engine"] and s["engine"]["dtype"] == "auto"
    assert s["sampling"]["temperature"] == 1.0
    with pytest.raises(KeyError, match="no field 'threads'"):
        output_settings(GenerateParams(), ignore=("threads",))
    with pytest.raises(KeyError, match="no field 'engine.threads'"):
        output_settings(GenerateParams(), ignore=("engine.threads",))


# ----------------------------------------------------------------------------- sharded outputs


def test_tracked_folder_bytes_do_not_depend_on_the_fingerprint(tmp_path):
    """Two productions of the same parts under different fingerprints: the folder hashes alike."""
    digests = []
    for k, fp in enumerate(({"code": "v1", "t": 1}, {"code": "v2", "t": 2})):
        out = ShardedOutput(tmp_path / f"run{k}" / "verdicts", "verdicts", 2, fp)
        out.write(1, _verdicts(["b"]))
        out = ShardedOutput(tmp_path / f"run{k}" / "verdicts", "verdicts", 2, fp)  # a resume
        out.write(0, _verdicts(["a"]))
        digests.append(content_digest(out.folder, {}))
        assert sorted(q.name for q in out.folder.iterdir()) == ["_manifest.json", "part-00000.parquet",
                                                               "part-00001.parquet"]
        assert (resume_dir(out.folder) / "fingerprint.json").exists()
    assert digests[0] == digests[1]


def test_parts_of_unknown_origin_are_not_trusted(tmp_path):
    out = ShardedOutput(tmp_path / "v", "verdicts", 2, {"x": 1})
    out.write(0, _verdicts(["a"]))
    import shutil

    shutil.rmtree(resume_dir(out.folder))  # e.g. a dvc checkout restores the folder, not the resume state
    with pytest.raises(StaleOutputError, match="no recorded fingerprint"):
        ShardedOutput(tmp_path / "v", "verdicts", 2, {"x": 1})
    assert out.done(0)
    assert ShardedOutput(tmp_path / "v", "verdicts", 2, {"x": 1}, restart=True).pending() == [0, 1]


def test_journals_survive_a_resume_but_not_another_fingerprint(tmp_path):
    out = ShardedOutput(tmp_path / "c", "critiques", 2, {"critic": "a"})
    out.journal_path(0).write_text('{"rollout_id": "r", "prompt_sha": "x", "feedback_text": "from critic a"}\n')
    out.close()
    assert ShardedOutput(tmp_path / "c", "critiques", 2, {"critic": "a"}).journal_path(0).exists()
    # no part finished yet, so the other fingerprint takes over -- without critic a's answers
    assert not ShardedOutput(tmp_path / "c", "critiques", 2, {"critic": "b"}).journal_path(0).exists()


def _hold_worker(folder, fp, ready, release):
    out = ShardedOutput(folder, "verdicts", 4, fp)
    ready.set()
    release.wait(30)
    out.write(1, _verdicts(["b"]))
    os._exit(0)


def test_a_live_worker_with_other_settings_is_never_overridden(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    folder = tmp_path / "v"
    first = ShardedOutput(folder, "verdicts", 4, {"x": 1})
    first.write(0, _verdicts(["a"]))
    first.close()
    child = ctx.Process(target=_hold_worker, args=(folder, {"x": 1}, ready, release))
    child.start()
    try:
        assert ready.wait(30)
        for restart in (False, True):
            with pytest.raises(StaleOutputError, match="another live worker"):
                ShardedOutput(folder, "verdicts", 4, {"x": 2}, restart=restart)
        same = ShardedOutput(folder, "verdicts", 4, {"x": 1})  # the same fingerprint joins in
        assert same.pending(ShardSpec(0, 2)) == [2]
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0 and first.done(0) and first.done(1)
    # the child is gone now: its registration is dead, and a restart may proceed
    assert ShardedOutput(folder, "verdicts", 4, {"x": 2}, restart=True).pending() == [0, 1, 2, 3]


def _worker(folder, shard, delay):
    out = ShardedOutput(folder, "verdicts", 6, {"x": 1})
    for p in out.pending(ShardSpec(*shard)):
        time.sleep(delay)
        out.write(p, _verdicts([f"r{p}"]))
    os._exit(0)


def test_concurrent_workers_and_a_late_joiner_finish_one_artifact(tmp_path):
    ctx = mp.get_context("fork")
    folder = tmp_path / "v"
    procs = [ctx.Process(target=_worker, args=(folder, s, 0.02)) for s in ((0, 2), (1, 2), (0, 1))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    table = read_artifact(folder, "verdicts")
    assert table.column("rollout_id").to_pylist() == [f"r{p}" for p in range(6)]
    assert not [q for q in folder.iterdir() if q.name.startswith(".")]
    # killed or exited workers cannot unregister; the next worker finds their locks gone and drops them
    assert len(list((resume_dir(folder) / "workers").iterdir())) == 3
    last = ShardedOutput(folder, "verdicts", 6, {"x": 1})
    assert [q.name for q in (resume_dir(folder) / "workers").iterdir()] == [last._worker.name]
