"""The score stage takes the sampler's log-probs as the student's where they are the same numbers
(tcrlsd/score/reuse.py, tcrlsd.sampler.reuse_blocker, params score.reuse_sampler_logprobs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from harness import build_iteration, run_stage, stage_argv, write_params
from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.sampler import reuse_blocker, sampler_record
from tcrlsd.score import ScoreError, student_source

DIGEST = "a" * 64
EXACT = dict(backend="transformers", device="cpu", dtype="auto", temperature=1.0, top_p=1.0, policy=DIGEST)


# ----------------------------------------------------------------------------- the rule, by hand


@pytest.mark.parametrize("change,scorer,blocked", [
    ({}, {}, None),                                              # the default CPU iteration: exact
    ({"dtype": "float32"}, {}, None),                            # auto on CPU is float32 (tcrlsd.policy.resolve_dtype)
    ({"temperature": 0.0, "top_p": 0.9}, {}, None),              # greedy: the raw log-softmax, top_p unused
    ({"backend": "vllm"}, {}, "vllm backend"),                   # other kernels: issue 19's mismatch
    ({"dtype": "bfloat16"}, {}, "sampled in bfloat16"),
    ({}, {"dtype": "bfloat16"}, "scored in bfloat16"),
    ({"device": "cuda"}, {}, "sampled in bfloat16"),             # auto -> bfloat16 there (the dtype speaks first)
    ({"device": "cuda", "dtype": "float32"}, {}, "sampled on cuda"),
    ({}, {"device": "cuda"}, "scored on cuda"),
    ({"temperature": 0.7}, {}, "temperature 0.7"),               # log-probs of logits / 0.7: not log pi
    ({"top_p": 0.9}, {}, "top_p 0.9"),                           # renormalised over the nucleus: not log pi
    ({"policy": "b" * 64}, {}, "another checkpoint"),
    ({"device": "auto"}, {}, "not a resolvable pair"),
])
def test_reuse_blocker_table(change, scorer, blocked):
    record = sampler_record(**(EXACT | change))
    why = reuse_blocker(record, **({"policy": DIGEST, "device": "cpu", "dtype": "float32"} | scorer))
    if blocked is None:
        assert why is None
    else:
        assert why is not None and blocked in why, why


def test_reuse_blocker_without_or_with_a_broken_record():
    assert "do not record what sampled them" in reuse_blocker(None, policy=DIGEST, device="cpu", dtype="float32")
    assert "unreadable" in reuse_blocker("{not json", policy=DIGEST, device="cpu", dtype="float32")
    assert "unreadable" in reuse_blocker('{"backend": "transformers"}', policy=DIGEST, device="cpu", dtype="float32")


def test_transformers_sampler_records_the_processed_distribution():
    # Why temperature != 1 is refused: the backend's log-prob is of logits / T (tcrlsd.generation),
    # log softmax([2, 0] / 0.5)[0] = -log(1 + e^-4) = -0.01815, while the model's own
    # log softmax([2, 0])[0] = -log(1 + e^-2) = -0.12693.
    import torch

    from tcrlsd.generate.transformers_backend import sample_next
    from tcrlsd.generation import SamplingConfig

    logits = torch.tensor([[2.0, 0.0]] * 64)
    gen = torch.Generator().manual_seed(0)
    ids, lp = sample_next(logits, SamplingConfig(temperature=0.5, top_p=1.0), gen)
    chosen0 = ids == 0
    assert bool(chosen0.any())
    assert torch.allclose(lp[chosen0], torch.tensor(-np.log1p(np.exp(-4.0)), dtype=torch.float32), atol=1e-6)
    ids, lp = sample_next(logits, SamplingConfig(temperature=1.0, top_p=1.0), gen)
    assert torch.allclose(lp[ids == 0], torch.tensor(-np.log1p(np.exp(-2.0)), dtype=torch.float32), atol=1e-6)


def _rollouts(records: list[str | None] | None) -> pa.Table:
    """Rows with these ``sampler`` values (None: no sampler column)."""
    n = len(records or [None])
    t = pa.table({"rollout_id": [f"p#{i}" for i in range(n)],
                  "sampler_logprobs": pa.array([[-0.5]] * n, pa.list_(pa.float32()))})
    return t if records is None else t.append_column("sampler", pa.array(records, pa.string()))


def test_student_source_by_mode():
    exact, hot = sampler_record(**EXACT), sampler_record(**(EXACT | {"temperature": 0.7}))
    kw = dict(policy_digest=DIGEST, device="cpu", dtype="float32", where="data/iter-0003/rollouts")
    assert student_source("auto", _rollouts([exact, exact]), **kw).source == "sampler"
    assert student_source(True, _rollouts([exact]), **kw).source == "sampler"
    off = student_source(False, _rollouts([exact]), **kw)
    assert off.source == "forward" and off.blocked_by is None  # not asked, no reason
    # one row drawn otherwise (another shard's worker) is enough for auto to fall back ...
    mixed = student_source("auto", _rollouts([exact, hot]), **kw)
    assert mixed.source == "forward" and "temperature 0.7" in mixed.blocked_by
    assert "no sampler column" in student_source("auto", _rollouts(None), **kw).blocked_by
    assert "or null" in student_source("auto", _rollouts([exact, None]), **kw).blocked_by  # a hand-made row
    no_lp = _rollouts([exact]).drop_columns(["sampler_logprobs"])
    assert "no sampler_logprobs" in student_source("auto", no_lp, **kw).blocked_by
    # ... and for true to refuse, naming the rollouts and the reason
    with pytest.raises(ScoreError, match=r"data/iter-0003/rollouts: .*reuse_sampler_logprobs is true.*temperature 0\.7"):
        student_source(True, _rollouts([exact, hot]), **kw)


# ----------------------------------------------------------------------------- the stage on a real iteration


@pytest.fixture(scope="module")
def iteration(tiny_policy, tmp_path_factory):
    """prepare .. critique of tests/harness.py at the default response cap (96 tokens), 8 prompts x 4."""
    d = tmp_path_factory.mktemp("reuse")
    shutil.copytree(tiny_policy, d / "policy")
    params = write_params(d, generate={"samples_per_prompt": 4, "sampling": {"max_new_tokens": 96}})
    build_iteration(d, d / "policy", params, stages=("prepare", "generate", "verify", "critique"))
    return d


def _score(d, tmp_path, name, restart=False, **score):
    params = write_params(tmp_path, score=score)
    argv = stage_argv("score", tmp_path, d, d / "policy", params, out=tmp_path / name)
    argv += ["--metrics", str(tmp_path / f"{name}.json")] + (["--restart"] if restart else [])
    rc = run_stage("score", argv)
    return rc, (json.loads((tmp_path / f"{name}.json").read_text()) if rc == 0 else None)


def _flat(table, column):
    return pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)


def test_reused_student_logprobs_equal_the_forward(iteration, tmp_path):
    rollouts = read_artifact(iteration / "rollouts", "rollouts")
    assert rollouts.column("sampler").unique().to_pylist() == [sampler_record(
        backend="transformers", device="cpu", dtype="auto", temperature=1.0, top_p=1.0,
        policy=json.loads(rollouts.column("sampler")[0].as_py())["policy"])]
    rc, fwd_m = _score(iteration, tmp_path, "forward", reuse_sampler_logprobs=False)
    assert rc == 0
    rc, reuse_m = _score(iteration, tmp_path, "reused", reuse_sampler_logprobs=True)
    assert rc == 0
    fwd, reused = read_artifact(tmp_path / "forward", "scores"), read_artifact(tmp_path / "reused", "scores")
    assert fwd_m["run"]["student_logprobs_from"] == "forward"
    assert reuse_m["run"]["student_logprobs_from"] == "sampler" and reuse_m["run"]["reuse_blocked_by"] is None

    # The claim: the sampler's numbers are the student forward's, to 1e-5 on every token.
    s_fwd, s_reused = _flat(fwd, "student_logprobs"), _flat(reused, "student_logprobs")
    assert len(s_fwd) == int(pc.sum(pc.list_value_length(rollouts.column("response_token_ids"))).as_py()) > 1000
    assert np.abs(s_fwd - s_reused).max() <= 1e-5
    assert np.array_equal(s_reused, _flat(rollouts, "sampler_logprobs"))  # taken as stored, bit for bit
    # The teacher pass is the same computation either way (batched with or without student sequences).
    assert np.abs(_flat(fwd, "teacher_logprobs") - _flat(reused, "teacher_logprobs")).max() <= 1e-5
    assert fwd_m["rollouts_with_feedback"] == reuse_m["rollouts_with_feedback"] > 0
    # Rows without feedback still get teacher = student, now the reused numbers.
    assert reuse_m["teacher_equals_student_without_feedback"] is True
    # The student sequences are the forward tokens saved: every rollout's prompt + response.
    lengths = [len(p) + len(r) for p, r in zip(rollouts.column("prompt_token_ids").to_pylist(),
                                                rollouts.column("response_token_ids").to_pylist()) if r]
    assert fwd_m["run"]["forward_tokens"] - reuse_m["run"]["forward_tokens"] == sum(lengths)
    assert reuse_m["sampler_mismatch"]["mean_abs_log_ratio"] == 0.0


def test_resume_sees_the_outcome_not_the_param(iteration, tmp_path, capsys):
    rc, m = _score(iteration, tmp_path, "scores", reuse_sampler_logprobs="auto")
    assert rc == 0 and m["run"]["student_logprobs_from"] == "sampler"
    first = {p.name: p.read_bytes() for p in sorted((tmp_path / "scores").glob("part-*"))}
    # true decides the same: every part is kept, none recomputed
    rc, m = _score(iteration, tmp_path, "scores", reuse_sampler_logprobs=True)
    assert rc == 0 and m["run"]["parts_done"] == 0 and m["run"]["parts_skipped"] == len(first)
    # false computes other numbers: the finished parts are stale (named), recomputed under --restart
    capsys.readouterr()
    rc, _ = _score(iteration, tmp_path, "scores", reuse_sampler_logprobs=False)
    assert rc == 2 and "settings.student_logprobs_from" in capsys.readouterr().err
    rc, m = _score(iteration, tmp_path, "scores", restart=True, reuse_sampler_logprobs=False)
    assert rc == 0 and m["run"]["parts_done"] == len(first) and m["run"]["student_logprobs_from"] == "forward"


def test_inexact_rollouts_fall_back_under_auto_and_fail_under_true(iteration, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(iteration, src, ignore=shutil.ignore_patterns(".*"))
    rollouts = read_artifact(iteration / "rollouts", "rollouts")
    rec = json.loads(rollouts.column("sampler")[0].as_py()) | {"temperature": 0.6}
    hot = rollouts.set_column(rollouts.schema.get_field_index("sampler"), "sampler",
                              pa.array([json.dumps(rec)] * rollouts.num_rows, pa.string()))
    shutil.rmtree(src / "rollouts")
    write_artifact(hot, src / "rollouts.parquet", "rollouts")
    rc, m = _score(src, tmp_path, "auto", reuse_sampler_logprobs="auto")
    assert rc == 0 and m["run"]["student_logprobs_from"] == "forward"
    assert "temperature 0.6" in m["run"]["reuse_blocked_by"]
    capsys.readouterr()
    rc, _ = _score(src, tmp_path, "demanded", reuse_sampler_logprobs=True)
    err = capsys.readouterr().err
    assert rc == 2 and "rollouts.parquet: params score.reuse_sampler_logprobs is true" in err and "temperature 0.6" in err
    assert not list((tmp_path / "demanded").glob("part-*"))


def test_no_teacher_context_runs_no_forward_at_all(iteration, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(iteration, src, ignore=shutil.ignore_patterns(".*"))
    critiques = read_artifact(iteration / "critiques", "critiques")
    for col in ("feedback_text", "teacher_prompt"):
        critiques = critiques.set_column(critiques.schema.get_field_index(col), col,
                                         pa.nulls(critiques.num_rows, pa.string()))
    shutil.rmtree(src / "critiques")
    write_artifact(critiques, src / "critiques.parquet", "critiques")
    rc, m = _score(src, tmp_path, "scores", reuse_sampler_logprobs="auto")
    assert rc == 0 and m["run"]["student_logprobs_from"] == "sampler"
    assert m["run"]["forward_tokens"] == 0 and m["rollouts_with_feedback"] == 0
    scores, rollouts = read_artifact(tmp_path / "scores", "scores"), read_artifact(src / "rollouts", "rollouts")
    assert np.array_equal(_flat(scores, "teacher_logprobs"), _flat(rollouts, "sampler_logprobs"))
