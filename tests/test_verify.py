"""The verify stage: graders (hand tables), the percent fix, the process pool (MATH500, deadlines),
the stage through its CLI, and `tcrlsd grade`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from fixtures import rollouts_table
from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.params import ParamsError, from_mapping
from tcrlsd.schemas import schema_for
from tcrlsd.verify import (
    GRADERS,
    REASONS,
    GradeLimits,
    GradeRequest,
    GradingPool,
    VerifyParams,
    grade_math_verify,
    grade_sequential,
    grade_string,
    normalize_number,
)

REPO = Path(__file__).resolve().parents[1]
LIMITS = GradeLimits(parse_timeout_s=3, verify_timeout_s=3)


def _math500_path() -> Path | None:
    for p in (REPO / "data/raw/math500_test.jsonl", Path("/work/shared/data/math500_test.jsonl")):
        if p.exists():
            return p
    return None


# --------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "raw, expected",
    [("1,234", "1234"), ("$18.50", "18.5"), ("18.00", "18"), ("72.", "72"), (" -3 ", "-3"), (".5", "0.5"),
     ("\\$1{,}000", "1000"), ("-0.0", "0"), ("\\text{12}", "12"), ("eighteen", "eighteen")],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


# --------------------------------------------------------------------------------------------
# Graders: hand tables (reward, extracted_answer, reason)


MATH_VERIFY_TABLE = [
    # response, gold, expected (reward, extracted, reason)
    ("The answer is \\boxed{5}.", "5", (1.0, "5", "correct")),
    ("\\boxed{4}", "5", (0.0, "4", "incorrect")),
    ("the answer is 5", "5", (0.0, None, "no_answer")),  # no box: math_verify grades only boxes
    ("\\boxed{}", "5", (0.0, None, "no_answer")),
    ("\\boxed{ 5", "5", (0.0, None, "no_answer")),  # cut off inside the box
    ("\\boxed{@@#}", "5", (0.0, "@@#", "unparsable")),  # found, but not math
    ("\\boxed{2} then \\boxed{3}", "3", (1.0, "3", "correct")),
    ("\\boxed{3} then \\boxed{2}", "3", (0.0, "2", "incorrect")),  # math-verify alone would merge {3, 2}
    ("\\boxed{\\frac{1}{2}}", "0.5", (1.0, "\\frac{1}{2}", "correct")),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", (1.0, "\\dfrac{14}{3}", "correct")),
    ("\\boxed{x = 5}", "5", (1.0, "x = 5", "correct")),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", (1.0, "3\\sqrt{2}", "correct")),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", (1.0, "x^2+2x+1", "correct")),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", (1.0, "\\{1,2\\}", "correct")),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)",
     (1.0, "\\left( 3, \\frac{\\pi}{2} \\right)", "correct")),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", (1.0, "\\text{Evelyn}", "correct")),
    ("\\boxed{7}", "so the total is \\boxed{7}.", (1.0, "7", "correct")),  # a gold solution: its last box
]


@pytest.mark.parametrize("response, gold, expected", MATH_VERIFY_TABLE)
def test_math_verify_grader_table(response, gold, expected):
    assert tuple(grade_math_verify(response, gold, LIMITS)) == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        # The antlr 4.9.3 percentage bug (tcrlsd/verify/mathverify_compat.py): all of these failed before the fix.
        ("so \\boxed{28\\%}", "0.28", (1.0, "28\\%", "correct")),
        ("so \\boxed{28\\%}", "28\\%", (1.0, "28\\%", "correct")),
        ("\\boxed{0.28}", "28\\%", (1.0, "0.28", "correct")),
        ("\\boxed{29\\%}", "0.28", (0.0, "29\\%", "incorrect")),
    ],
)
def test_percent_fix(response, gold, expected):
    assert tuple(grade_math_verify(response, gold, LIMITS)) == expected


def test_percent_fix_is_needed_and_idempotent():
    """Without the patch, the installed math-verify fails the percentage (fresh interpreter, so this
    process keeps its patched parser); the patch is applied once and re-applying is a no-op."""
    from latex2sympy2_extended.antlr_parser import PSParser

    from tcrlsd.verify import mathverify_compat

    assert hasattr(PSParser.AtomContext, "FUNC_GAMMA")
    assert mathverify_compat.apply_percent_fix() is False
    if not mathverify_compat.PERCENT_FIX_NEEDED:
        pytest.skip("this antlr runtime's parser has FUNC_GAMMA: the fix is not needed")
    code = textwrap.dedent(
        r"""
        import sys
        from math_verify import parse, verify
        raw = verify(parse("$0.28$"), parse("\\boxed{28\\%}"))
        import tcrlsd.verify.mathverify_compat
        fixed = verify(parse("$0.28$"), parse("\\boxed{28\\%}"))
        print(raw, fixed)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


STRING_TABLE = [
    # GSM8K: last \boxed{} or else the last number; commas, $, trailing .0, whitespace removed.
    ("... so she pays $1,234.00 in total.", "1234", (1.0, "1234", "correct")),
    ("\\boxed{18}", "#### 18", (1.0, "18", "correct")),  # raw GSM8K gold
    ("\\boxed{\\$18.50}", "18.5", (1.0, "18.5", "correct")),
    ("\\boxed{18} but 20 later", "18", (1.0, "18", "correct")),  # a box wins over later numbers
    ("The answer is 17.", "18", (0.0, "17", "incorrect")),
    ("First 18, then 17", "18", (0.0, "17", "incorrect")),  # the LAST number
    ("I don't know", "18", (0.0, None, "no_answer")),
    ("\\boxed{ }", "18", (0.0, None, "no_answer")),
    ("\\boxed{eighteen}", "18", (0.0, "eighteen", "unparsable")),
    ("-3", "-3", (1.0, "-3", "correct")),
    ("0.50", ".5", (1.0, "0.5", "correct")),
]


@pytest.mark.parametrize("response, gold, expected", STRING_TABLE)
def test_string_grader_table(response, gold, expected):
    assert tuple(grade_string(response, gold, LIMITS)) == expected


def test_every_reason_is_known_and_rewards_match():
    for fn in GRADERS.values():
        for response, gold, _ in MATH_VERIFY_TABLE + STRING_TABLE:
            g = fn(response, gold, LIMITS)
            assert g.reason in REASONS
            assert g.reward == (1.0 if g.reason == "correct" else 0.0)


# --------------------------------------------------------------------------------------------
# Params


def test_params_reject_unknown_grader_and_float_timeouts():
    assert from_mapping(VerifyParams, {}, "verify") == VerifyParams()
    with pytest.raises(ParamsError, match="graders_by_source.*'sympy'.*known: math_verify, string"):
        from_mapping(VerifyParams, {"graders_by_source": {"gsm8k": "sympy"}}, "verify")
    with pytest.raises(ParamsError, match="verify.parse_timeout_s: expected an integer"):
        from_mapping(VerifyParams, {"parse_timeout_s": 2.5}, "verify")
    with pytest.raises(ParamsError, match="unknown key"):
        from_mapping(VerifyParams, {"timeout": 3}, "verify")


# --------------------------------------------------------------------------------------------
# The pool


def test_math500_gold_solutions_pass_and_shuffled_fail():
    """Each MATH500 record's own gold solution, graded against its `answer`, must score 1.0 for
    >= 99% of records; a shuffled pairing (a derangement, so no record meets its own answer) must
    score < 2%. Measured: 500/500 own pairs correct (no misses to explain); 8/500 shuffled pairs
    pass (seed 0), all genuinely equal answers of different problems (3, 2, 9, 9, 10, 5, 12, 3).
    The pool's verdicts must equal in-process grading of the same rows (order preserved)."""
    path = _math500_path()
    if path is None:
        pytest.skip("MATH500 not found (data/raw/math500_test.jsonl)")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(recs) == 500
    own = [GradeRequest("math_verify", r["solution"], r["answer"]) for r in recs]
    rng = random.Random(0)
    perm = list(range(len(recs)))
    while True:
        rng.shuffle(perm)
        if all(i != j for i, j in enumerate(perm)):
            break
    shuffled = [GradeRequest("math_verify", recs[j]["solution"], recs[i]["answer"]) for i, j in enumerate(perm)]
    with GradingPool(workers=2, limits=LIMITS, row_deadline_s=20.0) as pool:
        grades = pool.grade(own + shuffled)
        assert pool.stats["deadline_kills"] == 0
    own_g, shuf_g = grades[: len(own)], grades[len(own):]
    misses = [(r["unique_id"], r["answer"], g) for r, g in zip(recs, own_g) if g.reward != 1.0]
    assert len(misses) <= 0.01 * len(recs), misses
    accepted = sum(g.reward for g in shuf_g)
    assert accepted < 0.02 * len(recs), [(recs[i]["answer"], g.extracted_answer) for i, g in enumerate(shuf_g) if g.reward]
    # Differential: the pool returns what in-process grading returns, in order.
    sample = list(range(0, 1000, 23))
    seq = grade_sequential([(own + shuffled)[k] for k in sample], LIMITS)
    assert [grades[k] for k in sample] == seq


def test_gsm8k_gold_solutions_pass_string_grader():
    """GSM8K test set: each reference solution (ending '#### N') graded against itself passes; a
    shuffled pairing mostly fails (measured 15/1318 coincidences, all equal small integers)."""
    path = REPO / "data/raw/gsm8k_test.jsonl"
    if not path.exists():
        pytest.skip("GSM8K not found (data/raw/gsm8k_test.jsonl)")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    own = grade_sequential([GradeRequest("string", r["answer"], r["answer"]) for r in recs], LIMITS)
    assert all(g.reason == "correct" for g in own)
    perm = list(range(len(recs)))
    random.Random(0).shuffle(perm)
    shuffled = grade_sequential(
        [GradeRequest("string", recs[j]["answer"], recs[i]["answer"]) for i, j in enumerate(perm) if i != j], LIMITS)
    assert sum(g.reward for g in shuffled) < 0.02 * len(shuffled)


ADVERSARIAL = [
    "so \\boxed{10^{10^{10^{10}}}}",
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "\\boxed{" + "1+" * 500_000 + "1}",  # 1 MB inside a box
]


def test_adversarial_rows_cost_at_most_the_deadline():
    """Inner timeouts (5 s) longer than the row deadline (1.5 s): the parent must kill and replace
    the stuck workers; each adversarial row is `timeout` (or a legitimate 0 verdict if it was
    fast), normal rows around them are graded right, and the whole batch stays within the
    deadlines' budget."""
    deadline = 1.5
    normal = [GradeRequest("math_verify", "\\boxed{\\frac{1}{2}}", "0.5"), GradeRequest("string", "so 42", "42")]
    big_plain = "x" * 1_000_000  # 1 MB with no box: no_answer, quickly
    reqs = normal + [GradeRequest("math_verify", a, "5") for a in ADVERSARIAL] + [
        GradeRequest("math_verify", big_plain, "5")] + normal
    with GradingPool(workers=2, limits=GradeLimits(5, 5), row_deadline_s=deadline) as pool:
        t0 = time.monotonic()
        grades = pool.grade(reqs)
        took = time.monotonic() - t0
        kills = pool.stats["deadline_kills"]
    assert [g.reason for g in grades[:2]] == ["correct", "correct"]
    assert [g.reason for g in grades[-2:]] == ["correct", "correct"]
    for g in grades[2:5]:
        assert g.reward == 0.0 and g.reason in ("timeout", "unparsable", "incorrect"), g
    assert grades[5] == (0.0, None, "no_answer")
    assert kills >= 1  # at least one row really needed the outer deadline
    # 3 adversarial rows at <= 1.5 s each on 2 workers, plus start-up and replacements.
    assert took < 3 * deadline + 8.0, took


def test_inner_integer_timeout_is_reported_as_timeout():
    """Deadline far away, inner timeout 1 s: math-verify's own alarm fires and the row is `timeout`
    (math-verify by itself would have reported a plain False, i.e. `incorrect`)."""
    with GradingPool(workers=1, limits=GradeLimits(1, 1), row_deadline_s=30.0) as pool:
        (g,) = pool.grade([GradeRequest("math_verify", ADVERSARIAL[0], "5")])
        assert pool.stats["deadline_kills"] == 0
    assert g == (0.0, "10^{10^{10^{10}}}", "timeout")


def test_pool_deduplicates_and_keeps_order():
    reqs = [GradeRequest("string", f"answer {i % 3}", str(i % 2)) for i in range(12)]
    with GradingPool(workers=2, limits=LIMITS) as pool:
        out = pool.grade(reqs)
    assert out == grade_sequential(reqs, LIMITS)


def test_forked_worker_limit_counts_from_what_it_inherits():
    """A worker forked from a process that maps more than worker_memory_mb (torch and DeepSpeed map
    gigabytes) must still grade: the limit is what the worker may add. With the limit counted from
    zero, every allocation in the child failed (MemoryError at math-verify's import)."""
    import mmap

    reserved = mmap.mmap(-1, 3 * 2**30)  # 3 GiB of address space, untouched: costs no memory
    try:
        with GradingPool(workers=1, limits=LIMITS, start_method="fork", worker_memory_mb=512) as pool:
            out = pool.grade([GradeRequest("math_verify", "so \\boxed{12}", "12")])
            assert pool.stats["worker_crashes"] == 0
    finally:
        reserved.close()
    assert out[0].reward == 1.0


# --------------------------------------------------------------------------------------------
# The stage through its CLI


def _prompts_table() -> pa.Table:
    ids = ["syn/0", "gsm/1", "math/2"]
    return pa.table(
        {
            "prompt_id": ids,
            "split": ["train"] * 3,
            "problem": ["Start with 2. Add 3.", "Tom has 1,000 apples...", "Convert 28% to a decimal."],
            "prompt": ["p0", "p1", "p2"],
            "answer": ["5", "1000", "0.28"],
            "solution": [None, None, None],
            "source": ["synthetic", "gsm8k", "math"],
            "level": pa.array([1, None, 2], pa.int32()),
            "subject": [None, None, "Prealgebra"],
        }
    )


def _rollouts_table(prompt_ids, texts) -> pa.Table:
    return rollouts_table([{"prompt_id": p, "response_token_ids": [3] * (i + 1), "response_text": text}
                           for i, (p, text) in enumerate(zip(prompt_ids, texts))])


def _run_stage(tmp_path, rollouts_path, out, metrics):
    params = tmp_path / "params.yaml"
    if not params.exists():
        params.write_text("verify:\n  workers: 2\n  graders_by_source: {gsm8k: string}\n  row_deadline_s: 20.0\n")
    cmd = [sys.executable, str(REPO / "stages/verify.py"), "--params", str(params),
           "--prompts", str(tmp_path / "prompts.parquet"), "--rollouts", str(rollouts_path),
           "--out", str(out), "--metrics", str(metrics), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)


def test_stage_cli_writes_verdicts_deterministically(tmp_path):
    write_artifact(_prompts_table(), tmp_path / "prompts.parquet", "prompts")
    pids = ["syn/0", "syn/0", "gsm/1", "gsm/1", "math/2", "math/2", "math/2"]
    texts = ["2 + 3 = 5. \\boxed{5}", "\\boxed{6}", "So 1,000 apples.", "I give up",
             "\\boxed{28\\%}", "\\boxed{@@}", "\\boxed{0.28"]
    write_artifact(_rollouts_table(pids, texts), tmp_path / "rollouts.parquet", "rollouts")

    out, metrics = tmp_path / "iter" / "verdicts.parquet", tmp_path / "iter" / "metrics" / "verify.json"
    res = _run_stage(tmp_path, tmp_path / "rollouts.parquet", out, metrics)
    assert res.returncode == 0, res.stderr
    verdicts = read_artifact(out, "verdicts")
    assert verdicts.schema == schema_for("verdicts")
    rows = verdicts.to_pylist()
    assert [r["rollout_id"] for r in rows] == ["syn/0#0", "syn/0#1", "gsm/1#0", "gsm/1#1",
                                                "math/2#0", "math/2#1", "math/2#2"]
    assert [(r["reward"], r["reason"], r["verifier"]) for r in rows] == [
        (1.0, "correct", "math_verify"),
        (0.0, "incorrect", "math_verify"),
        (1.0, "correct", "string"),
        (0.0, "no_answer", "string"),
        (1.0, "correct", "math_verify"),
        (0.0, "unparsable", "math_verify"),
        (0.0, "no_answer", "math_verify"),
    ]
    assert [r["is_correct"] for r in rows] == [r["reward"] == 1.0 for r in rows]
    assert rows[2]["extracted_answer"] == "1000" and rows[3]["extracted_answer"] is None
    m = json.loads(metrics.read_text())
    assert m["n_rollouts"] == 7 and m["reward_mean"] == pytest.approx(3 / 7)
    assert m["by_reason"] == {"correct": 3, "incorrect": 1, "no_answer": 2, "unparsable": 1, "timeout": 0}
    assert m["by_source"]["gsm8k"] == {"n": 2, "reward_mean": 0.5}
    assert m["groups"] == {"n": 3, "all_correct": 0, "all_incorrect": 0, "mixed": 3}

    # Rerun: byte-identical outputs.
    first = out.read_bytes(), metrics.read_bytes()
    res = _run_stage(tmp_path, tmp_path / "rollouts.parquet", out, metrics)
    assert res.returncode == 0, res.stderr
    assert (out.read_bytes(), metrics.read_bytes()) == first


@pytest.mark.parametrize("buffer,factor,expected", [
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then -(|y| - 6) / 4, -1 at the limit (and past it).
    (4, 1.0, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]),
    (4, 0.5, [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]),
    (10, 1.0, [0.0, -0.6, -0.7, -0.8, -1.0, -1.0]),  # buffer = L_max: linear from the first token
    (0, 1.0, [0.0] * 6),  # off
])
def test_overlong_penalty_hand_table(buffer, factor, expected):
    from tcrlsd.verify.overlong import overlong_penalty

    got = overlong_penalty([0, 6, 7, 8, 10, 11], 10, buffer, factor)
    assert got.tolist() == pytest.approx(expected)


def test_overlong_penalty_rejects_a_buffer_past_the_limit():
    from tcrlsd.verify.overlong import overlong_penalty

    with pytest.raises(ValueError, match=r"overlong_penalty_buffer = 11 must lie in 1\.\.10"):
        overlong_penalty([3], 10, 11, 1.0)


def test_stage_cli_adds_the_overlong_penalty_from_generate_max_new_tokens(tmp_path):
    """The rollouts have 1..7 response ids. generate.sampling.max_new_tokens 6, buffer 4: penalties 0, 0,
    -1/4, -2/4, -3/4, -1, -1 added to the rewards; is_correct and the group counts keep the grade."""
    write_artifact(_prompts_table(), tmp_path / "prompts.parquet", "prompts")
    pids = ["syn/0", "syn/0", "gsm/1", "gsm/1", "math/2", "math/2", "math/2"]
    texts = ["\\boxed{5}", "\\boxed{6}", "\\boxed{1000}", "\\boxed{7}", "\\boxed{0.28}", "\\boxed{1}", "\\boxed{2}"]
    write_artifact(_rollouts_table(pids, texts), tmp_path / "rollouts.parquet", "rollouts")
    (tmp_path / "params.yaml").write_text(
        "verify:\n  workers: 2\n  graders_by_source: {gsm8k: string}\n  row_deadline_s: 20.0\n"
        "  overlong_penalty_buffer: 4\n  overlong_penalty_factor: 1.0\ngenerate: {sampling: {max_new_tokens: 6}}\n")
    out, metrics = tmp_path / "verdicts.parquet", tmp_path / "verify.json"
    res = _run_stage(tmp_path, tmp_path / "rollouts.parquet", out, metrics)
    assert res.returncode == 0, res.stderr
    rows = read_artifact(out, "verdicts").to_pylist()
    assert [r["is_correct"] for r in rows] == [True, False, True, False, True, False, False]
    assert [r["reward"] for r in rows] == pytest.approx([1.0, 0.0, 0.75, -0.5, 0.25, -1.0, -1.0])
    m = json.loads(metrics.read_text())
    assert m["overlong_penalty"] == {"buffer": 4, "factor": 1.0, "max_tokens": 6, "penalized": 5,
                                     "mean": pytest.approx(-3.5 / 7)}
    assert m["groups"] == {"n": 3, "all_correct": 0, "all_incorrect": 0, "mixed": 3}


def test_stage_cli_names_a_missing_prompt(tmp_path):
    write_artifact(_prompts_table(), tmp_path / "prompts.parquet", "prompts")
    write_artifact(_rollouts_table(["syn/0", "gone/9"], ["\\boxed{5}", "\\boxed{1}"]),
                   tmp_path / "rollouts.parquet", "rollouts")
    out = tmp_path / "verdicts.parquet"
    res = _run_stage(tmp_path, tmp_path / "rollouts.parquet", out, tmp_path / "m.json")
    assert res.returncode == 2
    assert "'gone/9'" in res.stderr and "gone/9#0" in res.stderr and "prompts.parquet" in res.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# tcrlsd grade


def test_grade_cli_single_and_jsonl(tmp_path):
    from typer.testing import CliRunner

    from tcrlsd.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["grade", "so \\boxed{28\\%}", "--gold", "0.28"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"reward": 1.0, "extracted_answer": "28\\%", "reason": "correct",
                                      "grader": "math_verify"}

    lines = [
        json.dumps({"response": "\\boxed{4}", "gold": "5"}),
        "{not json",
        json.dumps({"response": "total: 1,000", "gold": "1000", "grader": "string"}),
        json.dumps({"response": "\\boxed{5}"}),
        json.dumps({"response": "\\boxed{\\frac{1}{2}}", "gold": "0.5"}),
    ]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["grade", "--jsonl", str(f)])
    assert res.exit_code == 1  # a bad line is reported in place, and the status says so
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5]
    assert (out[0]["reason"], out[0]["extracted_answer"]) == ("incorrect", "4")
    assert "line 2" in out[1]["error"] and "not valid JSON" in out[1]["error"]
    assert (out[2]["reason"], out[2]["grader"]) == ("correct", "string")
    assert "'gold'" in out[3]["error"]
    assert out[4]["reward"] == 1.0

    res = runner.invoke(app, ["grade", "x", "--gold", "1", "--grader", "nope"])
    assert res.exit_code == 2 and "unknown grader 'nope'" in res.output
