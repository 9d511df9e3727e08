"""Kill tests: every stage SIGKILLed at seeded random points and rerun ends with the same bytes as an
uninterrupted run; no partial file is ever visible under a final name (a watcher reads every one
while the stage runs); finished parts are not recomputed (same inode and mtime); two ``--shard``
workers running at once produce the same bytes as one worker.

The stages run in forked children of this process (tests/harness.py) on a tiny random policy and a
16-prompt synthetic iteration.
"""

from __future__ import annotations

import json

import pytest

from harness import (
    OUTPUTS,
    check_complete_files,
    identities,
    kill_points,
    run_and_kill,
    run_stage,
    snapshot,
    stage_argv,
    start,
    temporaries,
    timed_run,
    write_params,
)

SHARDED = ("generate", "critique", "score")


@pytest.fixture
def ref(reliability_iteration):
    return reliability_iteration, reliability_iteration / "params.yaml"


def _kill_and_resume(stage, d, src, policy, params, ref_out, kills=3):
    argv = stage_argv(stage, d, src, policy, params)
    out = d / OUTPUTS[stage][1]
    sharded = stage in SHARDED
    if sharded:  # after 0..n-2 parts are visible, plus up to a short while
        n_parts = len([q for q in ref_out.iterdir() if q.name.startswith("part-")])
        points = kill_points(stage, kills, max(1, n_parts - 1), 0.0, 0.15)
        # In order of progress, the first before any part exists: a tiny policy can write every
        # remaining part within one kill delay, and a run that finishes first ends the sequence.
        points = sorted(points)
        points[0] = (0, points[0][1])
    else:  # at 10-90 % of an uninterrupted run's time (a probe run into another folder)
        probe = d.parent / "probe"
        probe.mkdir()
        took = timed_run(stage, stage_argv(stage, probe, src, policy, params))
        points = kill_points(stage, kills, 1, 0.1 * took, 0.9 * took)
    happened = 0
    for after, delay in points:
        kept = identities(out) if out.exists() else {}
        for _ in range(4):  # a run that finished before its kill point is retried with half the delay
            killed = run_and_kill(stage, argv, out, after if sharded else 0, delay)
            now = identities(out)
            assert {k: now.get(k) for k in kept} == kept, "a finished part was rewritten by a later run"
            if killed or sharded:
                break
            delay /= 2  # (the finished output stays: the next kill lands while it is being replaced)
        happened += killed
        if sharded and not killed:
            break  # finished before the kill point: nothing left to interrupt
    kept = identities(out) if out.exists() else {}
    assert run_stage(stage, argv) == 0
    assert snapshot(out) == snapshot(ref_out)
    after = identities(out)
    assert {k: after[k] for k in kept} == kept, "the final rerun recomputed finished parts"
    assert not temporaries(d)
    return happened, len(kept)


@pytest.mark.parametrize("stage", ["prepare", "generate", "verify", "score", "advantages"])
def test_killed_stage_reruns_to_the_same_bytes(stage, ref, tmp_path):
    src, params = ref
    d = tmp_path / "k"
    d.mkdir()
    happened, _ = _kill_and_resume(stage, d, src, src / "policy", params, src / OUTPUTS[stage][1])
    assert happened >= 1, f"no kill landed while {stage} ran"


def test_killed_warm_start_leaves_the_old_checkpoint_or_the_new_one(ref, tmp_path):
    """The checkpoint folder appears whole or not at all; killed while replacing one, the old one stays."""
    src, params = ref
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run_stage("warmstart", stage_argv("warmstart", whole, src, src / "policy", params)) == 0
    d = tmp_path / "k"
    d.mkdir()
    happened, _ = _kill_and_resume("warmstart", d, src, src / "policy", params, whole / "warm-policy", kills=2)
    assert happened >= 1
    assert sorted(q.name for q in d.iterdir() if q.name.startswith(".")) == []  # no temporary folder left


def test_killed_http_critique_keeps_answered_rows(ref, tmp_path):
    """The HTTP critic (answers slowly): kills land mid-part; the journal keeps what was answered."""
    from critic_server import CriticServer

    src, _ = ref
    with CriticServer(lambda tag, attempt: ("stall", 0.03)) as server:
        params = write_params(tmp_path, critique={
            "mode": "critique", "critic": "openai", "critic_model": "m", "base_url": server.base_url,
            "api_key_env": "TCRLSD_TEST_NO_KEY", "max_concurrency": 2, "rows_per_part": 4,
            "request_timeout_s": 10.0})
        whole = tmp_path / "whole"
        whole.mkdir()
        assert run_stage("critique", stage_argv("critique", whole, src, src / "policy", params)) == 0
        asked_whole = sum(server.counts.values())
        d = tmp_path / "k"
        d.mkdir()
        happened, _ = _kill_and_resume("critique", d, src, src / "policy", params, whole / "critiques")
        asked_killed = sum(server.counts.values()) - asked_whole
    assert happened >= 1
    # journaled answers are not asked again: at most the requests in flight at each kill are repeated
    assert asked_killed <= asked_whole + happened * 2


@pytest.mark.parametrize("stage", SHARDED)
def test_two_shard_workers_at_once_give_one_workers_bytes(stage, ref, tmp_path):
    src, params = ref
    d = tmp_path / "w"
    d.mkdir()
    argv = stage_argv(stage, d, src, src / "policy", params)
    out = d / OUTPUTS[stage][1]
    workers = [start(stage, argv + ["--shard", f"{i}/2"]) for i in range(2)]
    while any(w.is_alive() for w in workers):
        check_complete_files(out, OUTPUTS[stage][0])
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert snapshot(out) == snapshot(src / OUTPUTS[stage][1])
    assert json.loads((d / "metrics" / f"{stage}.json").read_text())  # the worker that completed it wrote them
    assert not temporaries(d)
