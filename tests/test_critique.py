"""The critique stage: reference critic, leakage / false-negative checks, teacher contexts, and the
openai backend against a real HTTP server on 127.0.0.1 (500s, stalls, dropped connections, a kill
mid-run and a resume), plus self-critique with the tiny random policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.answers import last_boxed
from tcrlsd.critique import CriticAborted, OpenAICritic
from tcrlsd.critique import (
    CritiqueParams,
    claims_correct,
    contains_answer,
    critique_metrics,
    load_template,
    default_templates_dir,
    mask_answer,
    relaxed_equal,
    render_critic_prompt,
    render_teacher_prompt,
    split_student_prompt,
)
from tcrlsd.generation import SamplingConfig, SamplingParams
from tcrlsd.reference_critic import reference_critique
from tcrlsd.synthetic import make_problems, solution_steps

from critic_server import CriticServer, reply_for
from fixtures import INSTRUCTION, rollouts_table, synthetic_prompts, verdicts_table

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "critique.py"
KEY = "sk-test-7f3a9c1e55d2-DO-NOT-LEAK"

# --------------------------------------------------------------------------------------------------
# helpers


def _wrong_first_step(p) -> str:
    a, op, b, r = p.steps[0]
    return f"{a} {op} {b} = {r + 1}\nThe answer is \\boxed{{{r + 1}}}."


def _default_response(p, j: int) -> str:
    # sample 0 = the gold solution (correct), 1 = arithmetic slip in step 1, 2 = no boxed answer
    return [p.solution, _wrong_first_step(p), p.solution.rsplit("\n", 1)[0]][j % 3]


def make_iteration(tmp_path: Path, n_prompts: int = 4, samples: int = 3, respond=_default_response,
                   tag: bool = False, finish=lambda i, j: "stop") -> dict[str, Path]:
    """prompts / rollouts / verdicts files of a few synthetic rows; verdict = boxed == gold answer;
    ``finish(i, j)``: the finish_reason of prompt i's sample j."""
    probs = make_problems(n_prompts, seed=7)
    prompts = synthetic_prompts(n_prompts, seed=7)
    rows, verdicts = [], []
    for i, p in enumerate(probs):
        for j in range(samples):
            rid = f"synthetic/train/{i}#{j}"
            text = respond(p, j)
            if tag:
                text = f"[[{rid}]]\n{text}"
            boxed = last_boxed(text)
            ok = boxed == p.answer
            rows.append({"rollout_id": rid, "prompt_id": f"synthetic/train/{i}", "sample_idx": j, "iteration": 0,
                         "prompt_token_ids": [1, 5, 6], "response_token_ids": [7, 8], "response_text": text,
                         "finish_reason": finish(i, j)})
            verdicts.append({"rollout_id": rid, "reward": float(ok), "is_correct": ok, "extracted_answer": boxed,
                             "reason": "correct" if ok else ("no_answer" if boxed is None else "incorrect"),
                             "verifier": "math_verify"})
    paths = {"prompts": tmp_path / "prompts.parquet", "rollouts": tmp_path / "rollouts.parquet",
             "verdicts": tmp_path / "verdicts.parquet"}
    write_artifact(prompts, paths["prompts"], "prompts")
    write_artifact(rollouts_table(rows), paths["rollouts"], "rollouts")
    write_artifact(verdicts_table(verdicts), paths["verdicts"], "verdicts")
    return paths


def write_params(tmp_path: Path, **critique) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"critique": critique}))
    return path


def stage_cmd(paths: dict, params: Path, out: Path, metrics: Path | None = None, extra=()) -> list[str]:
    cmd = [sys.executable, str(STAGE), "--params", str(params), "--prompts", str(paths["prompts"]),
           "--rollouts", str(paths["rollouts"]), "--verdicts", str(paths["verdicts"]), "--out", str(out)]
    if metrics is not None:
        cmd += ["--metrics", str(metrics)]
    return cmd + list(extra)


def run_stage(paths, params, out, metrics=None, extra=(), env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_cmd(paths, params, out, metrics, extra), capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def stage_main(argv: list[str]) -> int:
    """The stage's main() in this process (saves the torch import of a subprocess)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_critique_stage", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _fast_http(base_url: str, **over) -> dict:
    params = dict(mode="critique", critic="openai", critic_model="critic-test", base_url=base_url,
                  api_key_env="TCRLSD_TEST_CRITIC_KEY", max_concurrency=3, request_timeout_s=1.5,
                  max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    params.update(over)
    return params


# --------------------------------------------------------------------------------------------------
# reference critic (table)

# Problem: start with 12, add 7, multiply by 3, subtract 5  ->  12+7=19, 19*3=57, 57-5=52; answer 52.
GOLD = solution_steps([(12, "+", 7, 19), (19, "*", 3, 57), (57, "-", 5, 52)], 52)
S1, S2, S3 = "12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52"


@pytest.mark.parametrize("response, expect, forbid", [
    # arithmetic slip in step 1: the right intermediate result (19) may be stated
    ("12 + 7 = 20\n20 * 3 = 60\n60 - 5 = 55\n\\boxed{55}", "Step 1 has an arithmetic error: 12 + 7 is 19, not 20", None),
    # wrong starting number copied from the problem
    ("13 + 7 = 20\n20 * 3 = 60\n\\boxed{60}", "Step 1 starts from 13, but the problem starts with 12", None),
    # step 2 does not continue from step 1's result
    (f"{S1}\n20 * 3 = 60\n60 - 5 = 55\n\\boxed{{55}}", "Step 2 starts from 20, but the result of step 1 is 19", None),
    # wrong operation
    (f"{S1}\n19 + 3 = 22\n22 - 5 = 17\n\\boxed{{17}}", "Step 2 should multiply by 3, as the problem says, but it added 3", None),
    # wrong operand copied
    (f"{S1}\n19 * 4 = 76\n76 - 5 = 71\n\\boxed{{71}}", "the problem says to multiply by 3, but the step uses 4", None),
    # slip in the LAST step: its right result is the final answer, so it is not stated (no leak)
    (f"{S1}\n{S2}\n57 - 5 = 51\n\\boxed{{51}}", "Step 3 has an arithmetic error: 57 - 5 is not 51", "52"),
    # missing step
    (f"{S1}\n{S2}\nThe answer is \\boxed{{57}}.", "The next one is to subtract 5", "52"),
    # an extra step
    (f"{S1}\n{S2}\n{S3}\n52 + 1 = 53\n\\boxed{{53}}", "step 4 is an operation the problem does not ask for", "52"),
    # all steps right, no \boxed{}
    (f"{S1}\n{S2}\n{S3}", "the final answer is not written in \\boxed{}", "52"),
    # boxed answer differs from the last step
    (f"{S1}\n{S2}\n{S3}\nThe answer is \\boxed{{53}}.", "the boxed answer (53) is not the result of the last step", "52"),
    # nothing parsable
    ("I think it is big.", "no calculation steps and no final answer", None),
    ("The answer is \\boxed{52}.", "gives the answer 52 without any calculation steps", None),
    # everything right: the critic says so (a suspected false negative if the grader had rejected it)
    (f"{S1}\n{S2}\n{S3}\nThe answer is \\boxed{{52}}.", "I find no error", None),
])
def test_reference_critic_names_first_wrong_step(response, expect, forbid):
    reply = reference_critique(response, GOLD)
    assert reply.error is None and expect in reply.text
    if forbid is not None:
        assert not contains_answer(reply.text, forbid)


def test_reference_critic_reveal_and_missing_solution():
    text = reference_critique(f"{S1}\n{S2}\n57 - 5 = 51\n\\boxed{{51}}", GOLD, reveal_final_answer=True).text
    assert "57 - 5 is 52, not 51" in text and contains_answer(text, "52")
    reply = reference_critique(S1, "The answer is $x^2$. \\boxed{x^2}")
    assert reply.text is None and "gold solution" in reply.error


# --------------------------------------------------------------------------------------------------
# leakage, masking, relaxed grading, critic claims (tables)


@pytest.mark.parametrize("text, answer, leaks", [
    ("the result is 12", "12", True),
    ("the result is 112", "12", False),      # inside another number
    ("the result is 12.5", "12", False),     # a decimal that starts with 12
    ("so it ends at 12.", "12", True),       # sentence full stop is not a decimal
    ("you wrote -12", "12", False),          # another number
    ("\\boxed{12}", "12", True),
    ("x12y", "12", False),
    ("so it is \\frac{1}{2}.", "\\frac{1}{2}", True),   # LaTeX answers match verbatim
    ("3\\frac{1}{2}", "\\frac{1}{2}", False),  # the mixed number 3 1/2 is another number
    ("value -4 here", "-4", True),
    ("nothing", "", False),
    (None, "12", False),
])
def test_contains_answer_table(text, answer, leaks):
    assert contains_answer(text, answer) is leaks


def test_mask_answer():
    assert mask_answer("12 + 7 is 19, and 112 stays; 19.", "19", "[X]") == "12 + 7 is [X], and 112 stays; [X]."


@pytest.mark.parametrize("pred, gold, ok", [
    ("1,000", "1000", True), ("$5$", "5", True), ("\\text{5}", "5", True), ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("x = 3", "3", True), ("30^\\circ", "30", True),
    ("6", "5", False), (None, "5", False), ("", "5", False),
])
def test_relaxed_equal_table(pred, gold, ok):
    assert relaxed_equal(pred, gold) is ok


@pytest.mark.parametrize("text, claims", [
    ("Your final answer is actually correct; the grader is wrong.", True),
    ("I find no error in this attempt.", True),
    ("There are no mistakes here.", True),
    ("The attempt is correct.", True),
    ("The final answer is not correct: step 2 adds instead of multiplying.", False),
    ("Steps 1 and 2 are correct, but step 3 subtracts the wrong number.", False),
    (None, False),
])
def test_claims_correct_table(text, claims):
    assert claims_correct(text) is claims


# --------------------------------------------------------------------------------------------------
# templates and teacher context


def test_templates_have_ids_and_state_the_grader_as_fact():
    folder = default_templates_dir()
    for name in ("critic-incorrect", "critic-correct", "critic-gold-incorrect", "critic-gold-correct",
                 "self-incorrect", "self-correct", "teacher-critique", "teacher-gold"):
        assert load_template(folder, name).id == f"{name}@v1"
    body = load_template(folder, "critic-incorrect").body
    assert "The automatic grader is a parser" in body and "artifact" not in body and "may be" not in body


def test_model_text_is_data_not_template():
    tpl = load_template(default_templates_dir(), "critic-gold-incorrect")
    row = {"problem": "Start with 2. Add 3. What is the result?", "solution": "2 + 3 = 5\nThe answer is \\boxed{5}.",
           "answer": "5", "response_text": "${gold_solution} {problem} {0} $$ 2 + 3 = 6", "is_correct": False,
           "reason": "incorrect", "extracted_answer": "${problem}"}
    text = render_critic_prompt(tpl, row, max_response_chars=1000)
    assert "${gold_solution} {problem} {0} $$ 2 + 3 = 6" in text
    assert text.count("2 + 3 = 5") == 1  # the gold solution appears once: only in its own slot
    long = dict(row, response_text="a" * 500 + "TAIL")
    assert "characters omitted" in render_critic_prompt(tpl, long, max_response_chars=100)


def test_teacher_context_places_feedback_after_problem_and_keeps_instruction(tiny_policy, tmp_path):
    problem = "Start with 4. Add 2. What is the result?"
    prefix, prob, instruction = split_student_prompt(problem + INSTRUCTION, problem)
    assert (prefix, prob, instruction) == ("", problem, INSTRUCTION)
    tpl = load_template(default_templates_dir(), "teacher-critique")
    text = render_teacher_prompt(tpl, prefix, prob, instruction, "Step 1 is wrong.")
    assert text.startswith(problem) and text.endswith(INSTRUCTION)
    assert text.index(problem) < text.index("Step 1 is wrong.") < text.index("solve the original question")

    # chat template: a student prompt rendered by the tokenizer is unwrapped and the teacher re-wrapped
    from tcrlsd.templates import chat_wrap
    from tcrlsd.policy import load_tokenizer

    tok = load_tokenizer(tiny_policy)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
    student = tok.apply_chat_template([{"role": "user", "content": problem + INSTRUCTION}], tokenize=False,
                                      add_generation_prompt=True)
    wrap = chat_wrap(tok)
    prefix, prob, instruction = split_student_prompt(student, problem, wrap)
    assert (prefix, prob, instruction) == ("", problem, INSTRUCTION)
    teacher = render_teacher_prompt(tpl, prefix, prob, instruction, "fb", wrap)
    assert teacher.startswith("<|user|>" + problem) and teacher.endswith(INSTRUCTION + "<|end|><|assistant|>")


# --------------------------------------------------------------------------------------------------
# the stage through its CLI, reference critic / gold / none


def test_stage_default_reference_coverage_and_determinism(tmp_path):
    paths = make_iteration(tmp_path)
    params = write_params(tmp_path)  # defaults: mode critique, critic reference, which auto (= incorrect)
    out, metrics_path = tmp_path / "critiques", tmp_path / "metrics" / "critique.json"
    run_stage(paths, params, out, metrics_path)
    table = read_artifact(out, "critiques")
    verdicts = read_artifact(paths["verdicts"], "verdicts")
    rollouts = read_artifact(paths["rollouts"], "rollouts")
    assert table.column("rollout_id").to_pylist() == rollouts.column("rollout_id").to_pylist()
    rows = table.to_pylist()
    correct = verdicts.column("is_correct").to_pylist()
    for row, ok in zip(rows, correct):
        assert (row["feedback_text"] is None) == ok
        assert (row["teacher_prompt"] is None) == ok
        assert row["error"] is None and row["mode"] == "critique"
        if not ok:
            assert row["template"] == "reference-critic@v1+teacher-critique@v1" and row["critic"] == "reference"
            assert row["teacher_prompt"].endswith(INSTRUCTION) and row["feedback_text"] in row["teacher_prompt"]
    # sample 1 of each prompt slipped in step 1: named as such
    assert all("Step 1 has an arithmetic error" in r["feedback_text"] for r in rows if r["rollout_id"].endswith("#1"))
    metrics = json.loads(metrics_path.read_text())
    incorrect = sum(not c for c in correct)
    assert metrics["coverage"] == pytest.approx(incorrect / len(rows)) == pytest.approx(metrics["incorrect_share"])
    assert metrics["failures"] == 0 and metrics["mean_feedback_words"] > 5
    # same inputs -> byte-identical parts
    first = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    out2 = tmp_path / "critiques2"
    run_stage(paths, params, out2)
    assert first == {p.name: p.read_bytes() for p in out2.glob("part-*.parquet")}


def test_stage_wrong_hints_critique_the_rollout_against_other_prompts(tmp_path):
    from tcrlsd.critique.wrong_hints import pick_donors

    paths = make_iteration(tmp_path)  # 4 prompts x 3 samples
    prompts = {r["prompt_id"]: r for r in read_artifact(paths["prompts"], "prompts").to_pylist()}
    rollouts = {r["rollout_id"]: r for r in read_artifact(paths["rollouts"], "rollouts").to_pylist()}
    out, metrics_path = tmp_path / "critiques", tmp_path / "m.json"
    run_stage(paths, write_params(tmp_path, wrong_hints=2, rows_per_part=5), out, metrics_path)
    table = read_artifact(out, "critiques")  # validated, optional columns included
    n_fb = 0
    for row in table.to_pylist():
        assert row["extra_teacher_kinds"] == ["wrong_hint"] * 2
        if row["teacher_prompt"] is None:  # no feedback: no context to contrast with
            assert row["extra_teacher_prompts"] == [None, None] and row["extra_hint_prompt_ids"] == [None, None]
            continue
        n_fb += 1
        own = prompts[row["rollout_id"].split("#")[0]]
        donors = row["extra_hint_prompt_ids"]
        assert len(set(donors)) == 2 and own["prompt_id"] not in donors
        for donor, context in zip(donors, row["extra_teacher_prompts"]):
            # the same critic, given the other prompt's gold solution: the rollout's own wrong steps
            # become "departs from the other problem", rendered around the rollout's own problem
            want = reference_critique(rollouts[row["rollout_id"]]["response_text"], prompts[donor]["solution"]).text
            assert want and want != row["feedback_text"]
            prefix, _, _ = row["teacher_prompt"].partition(row["feedback_text"])
            assert context == row["teacher_prompt"].replace(row["feedback_text"], want) and context.startswith(prefix)
            assert own["problem"] in context and prompts[donor]["problem"] not in context
    assert n_fb > 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["wrong_hints"] == 2 and metrics["wrong_hint_contexts"] == 2 * n_fb
    assert metrics["wrong_hint_failures"] == 0
    # the draw depends on (seed, rollout id) and the iteration's prompts, not on how rows are cut into parts
    out2 = tmp_path / "critiques2"
    run_stage(paths, write_params(tmp_path, wrong_hints=2, rows_per_part=3), out2)
    assert read_artifact(out2, "critiques").equals(table)
    pool = [{"prompt_id": "a", "problem": "x"}, {"prompt_id": "b", "problem": "y"}, {"prompt_id": "c", "problem": "x"}]
    assert pick_donors("a#0", "x", pool, 3, seed=0) == [pool[1]]  # never the same problem text
    # wrong_hints = 0 (the default) writes the critiques of before: no extra columns
    out3 = tmp_path / "critiques3"
    run_stage(paths, write_params(tmp_path), out3)
    assert read_artifact(out3, "critiques").column_names == [c for c in table.column_names
                                                              if not c.startswith("extra_")]


def test_wrong_hints_unit_mask_own_answer_and_null_entries():
    from tcrlsd.critique.wrong_hints import add_wrong_hints, donor_pool
    from tcrlsd.templates import default_templates_dir, load_template

    def row(pid, problem, answer, i=0):
        return {"rollout_id": f"{pid}#{i}", "prompt_id": pid, "problem": problem, "prompt": problem + INSTRUCTION,
                "answer": answer, "solution": f"sol {answer}", "response_text": "x", "is_correct": False,
                "extracted_answer": None}

    rows = [row("a", "Start with 3. Add 4.", "7"), row("b", "Start with 5. Add 2.", "7"), row("c", "Start with 1.", "1")]
    table = pa.table({"rollout_id": [r["rollout_id"] for r in rows],
                      "teacher_prompt": pa.array(["ctx", None, "ctx"], pa.string())})  # b: no feedback
    asked = []

    def ask(views, p):  # a critic that writes the donor's answer into its feedback
        asked.extend(views)
        assert p.which == "all" and p.wrong_hints == 0
        return pa.table({"feedback_text": pa.array([f"the result is {v['answer']}" if v["answer"] != "1" else None
                                                    for v in views], pa.string())})

    params = CritiqueParams(wrong_hints=2, mask_leaked_answer=True)
    tpl = load_template(default_templates_dir(), "teacher-critique")
    out = add_wrong_hints(table, rows, params, tpl, donor_pool(rows), ask).to_pylist()
    assert sorted(v["rollout_id"] for v in asked) == ["a#0~wrong0", "a#0~wrong1", "c#0~wrong0", "c#0~wrong1"]
    assert {v["prompt_id"] for v in asked if v["rollout_id"].startswith("a#0")} == {"b", "c"}  # never its own
    a, b, c = out
    assert b["extra_teacher_prompts"] == [None, None] and b["extra_hint_prompt_ids"] == [None, None]
    by_donor = dict(zip(a["extra_hint_prompt_ids"], a["extra_teacher_prompts"]))
    assert "the result is [answer withheld]" in by_donor["b"]  # b's answer 7 is a's gold too: masked
    assert by_donor["c"] is None  # the critic failed for that hint: no text
    assert a["extra_teacher_prompts"][0] is None or a["extra_teacher_prompts"][0].startswith("Start with 3. Add 4.")
    assert all(t is None or "Start with 1." in t for t in c["extra_teacher_prompts"])
    assert {d: t for d, t in zip(c["extra_hint_prompt_ids"], c["extra_teacher_prompts"])}["a"].count("the result is 7")


def test_stage_gold_covers_all_and_reports_leakage(tmp_path):
    paths = make_iteration(tmp_path)
    out, metrics_path = tmp_path / "critiques", tmp_path / "m.json"
    run_stage(paths, write_params(tmp_path, mode="gold"), out, metrics_path)
    rows = read_artifact(out, "critiques").to_pylist()
    prompts = {r["prompt_id"]: r for r in read_artifact(paths["prompts"], "prompts").to_pylist()}
    assert all(r["feedback_text"] == prompts[r["rollout_id"].split("#")[0]]["solution"] for r in rows)
    assert all(r["template"] == "teacher-gold@v1" and r["critic"] == "gold" for r in rows)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["which"] == "all" and metrics["coverage"] == 1.0
    assert metrics["leakage_share"] == 1.0  # the gold solution states its answer, by construction

    # masking: the flag still records the leak, the stored text no longer has it
    out_m, m2 = tmp_path / "masked", tmp_path / "m2.json"
    run_stage(paths, write_params(tmp_path, mode="gold", mask_leaked_answer=True), out_m, m2)
    masked = read_artifact(out_m, "critiques").to_pylist()
    assert all(r["leaks_answer"] and "[answer withheld]" in r["feedback_text"] for r in masked)
    metrics = json.loads(m2.read_text())
    assert metrics["leakage_share"] == 1.0 and metrics["leakage_share_after_masking"] == 0.0


def test_stage_skips_truncated_responses_in_critic_modes_only(tmp_path):
    """Samples 1 and 2 are wrong (slip, no box); sample 2 of every prompt was cut by the token limit.
    skip_truncated (default true): critique mode gives sample 2 no feedback and records why; gold
    mode still gives it the gold solution; skip_truncated false asks the critic as before."""
    from tcrlsd.feedback import TRUNCATED_NOT_CRITIQUED

    paths = make_iteration(tmp_path, n_prompts=3, finish=lambda i, j: "length" if j == 2 else "stop")
    out, metrics_path = tmp_path / "c", tmp_path / "m.json"
    run_stage(paths, write_params(tmp_path), out, metrics_path)
    rows = read_artifact(out, "critiques").to_pylist()
    for r in rows:
        j = int(r["rollout_id"].rsplit("#", 1)[1])
        assert (r["feedback_text"] is not None) == (j == 1), r  # only the slipped, complete response
        assert r["error"] == (TRUNCATED_NOT_CRITIQUED if j == 2 else None)
        assert (r["teacher_prompt"] is None) == (j != 1)
    m = json.loads(metrics_path.read_text())
    assert m["skipped_truncated"] == 3 and m["failures"] == 0 and m["failed_rollout_ids"] == []

    run_stage(paths, write_params(tmp_path, mode="gold"), tmp_path / "g", tmp_path / "g.json")
    assert all(r["feedback_text"] is not None and r["error"] is None for r in read_artifact(tmp_path / "g", "critiques").to_pylist())

    run_stage(paths, write_params(tmp_path, skip_truncated=False), tmp_path / "a", tmp_path / "a.json")
    asked = read_artifact(tmp_path / "a", "critiques").to_pylist()
    assert [r["feedback_text"] is not None for r in asked] == [not r["rollout_id"].endswith("#0") for r in asked]
    assert json.loads((tmp_path / "a.json").read_text())["skipped_truncated"] == 0


def test_stage_none_and_suspected_false_negatives(tmp_path):
    # sample 0 boxes "1,000"-style formatting of the right answer: strict grading (string ==) rejects it
    def respond(p, j):
        return p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer}.0}}") if j == 0 else _wrong_first_step(p)

    paths = make_iteration(tmp_path, n_prompts=3, samples=2, respond=respond)
    out, metrics_path = tmp_path / "c", tmp_path / "m.json"
    run_stage(paths, write_params(tmp_path), out, metrics_path)
    rows = read_artifact(out, "critiques").to_pylist()
    for r in rows:
        # relaxed grader (5.0 == 5) and the critic ("I find no error") both flag sample 0, not sample 1
        assert r["suspected_false_negative"] is r["rollout_id"].endswith("#0")
    assert json.loads(metrics_path.read_text())["suspected_false_negatives"] == 3

    out_none = tmp_path / "n"
    run_stage(paths, write_params(tmp_path, mode="none"), out_none, tmp_path / "n.json")
    none_rows = read_artifact(out_none, "critiques").to_pylist()
    assert all(r["feedback_text"] is None and r["teacher_prompt"] is None and r["error"] is None for r in none_rows)
    assert json.loads((tmp_path / "n.json").read_text())["coverage"] == 0.0


# --------------------------------------------------------------------------------------------------
# openai backend against a real HTTP server


def test_openai_critic_retries_500s_stalls_and_drops_then_records_errors(tmp_path):
    # per rollout (by sample / prompt): two 500s then ok; a stall past the timeout then ok; a dropped
    # connection then ok; one rollout that fails with 500 on every attempt of the first run (transient:
    # its part stays unfinished, the rerun asks it alone) and one refused with 400 (permanent: recorded).
    def behaviour(tag, attempt):
        i, j = int(tag.split("#")[0].rsplit("/", 1)[1]), int(tag.split("#")[1])
        if i == 0 and j == 1:
            return ("status", 500) if attempt <= 3 else ("ok",)
        if i == 3 and j == 1:
            return ("status", 400)
        if j == 1 and attempt <= 2:
            return ("status", 500)
        if j == 2 and i % 2 == 0 and attempt == 1:
            return ("stall", 2.5)
        if j == 2 and i % 2 == 1 and attempt == 1:
            return ("drop",)
        return ("ok",)

    paths = make_iteration(tmp_path, n_prompts=4, samples=3, tag=True)
    out, metrics_path = tmp_path / "c", tmp_path / "m.json"
    env = dict(os.environ, TCRLSD_TEST_CRITIC_KEY=KEY)
    with CriticServer(behaviour, require_key=KEY) as server:
        params = write_params(tmp_path, **_fast_http(server.base_url))
        first = subprocess.run(stage_cmd(paths, params, out, metrics_path), capture_output=True, text=True,
                               cwd=REPO, env=env, timeout=120)
        assert first.returncode == 75, first.stderr
        assert "1 row(s) in 1 part(s)" in first.stderr and "'synthetic/train/0#1': http 500 after 3 attempts" in first.stderr
        assert not list(out.glob("part-*")) and not metrics_path.exists()
        journal = [json.loads(line) for line in (tmp_path / ".c.resume" / "journal-00000.jsonl").read_text().splitlines()]
        assert len(journal) == 7 and "synthetic/train/0#1" not in {r["rollout_id"] for r in journal}
        asked = dict(server.counts)
        proc = run_stage(paths, params, out, metrics_path, env=env)
    assert {k: v - asked.get(k, 0) for k, v in server.counts.items() if v != asked.get(k)} == {"synthetic/train/0#1": 1}
    rows = read_artifact(out, "critiques").to_pylist()
    incorrect = [r for r in rows if not r["rollout_id"].endswith("#0")]
    assert len(incorrect) == 8
    for r in incorrect:
        if r["rollout_id"] == "synthetic/train/3#1":
            assert r["feedback_text"] is None and r["teacher_prompt"] is None
            assert r["error"] == "http 400 (not retried)"
            assert server.counts[r["rollout_id"]] == 1
        else:
            assert r["feedback_text"] == reply_for(r["rollout_id"]) and r["error"] is None
            assert r["template"] == "critic-incorrect@v1+teacher-critique@v1" and r["critic"] == "openai:critic-test"
    assert server.counts["synthetic/train/1#1"] == 3 and server.counts["synthetic/train/2#2"] == 2
    assert server.counts["synthetic/train/1#2"] == 2 and server.counts["synthetic/train/0#1"] == 4
    assert not any(k.endswith("#0") for k in server.counts)  # correct rollouts are not sent
    assert set(server.auth_headers) == {f"Bearer {KEY}"}
    metrics = json.loads(metrics_path.read_text())
    assert metrics["failures_by_reason"] == {"http 400 (not retried)": 1}
    assert metrics["failed_rollout_ids"] == ["synthetic/train/3#1"]
    assert metrics["coverage"] == pytest.approx(7 / 12)
    # the key is never written anywhere
    for f in [*out.rglob("*"), *(tmp_path / ".c.resume").rglob("*"), metrics_path, params]:
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in proc.stdout + proc.stderr + first.stdout + first.stderr


def test_openai_stage_resumes_after_kill_without_reasking(tmp_path):
    answered_before_hang = 5
    state = {"ok": 0, "hang": True}
    lock = threading.Lock()

    def behaviour(tag, attempt):
        with lock:
            if state["hang"] and state["ok"] >= answered_before_hang:
                return ("hang",)
            state["ok"] += 1
            return ("ok",)

    paths = make_iteration(tmp_path, n_prompts=6, samples=3, tag=True)
    out, metrics_path = tmp_path / "c", tmp_path / "m.json"
    journal = tmp_path / ".c.resume" / "journal-00000.jsonl"  # beside the tracked output, not in it
    with CriticServer(behaviour) as server:
        params = write_params(tmp_path, **_fast_http(server.base_url, request_timeout_s=30.0, max_concurrency=2))
        proc = subprocess.Popen(stage_cmd(paths, params, out, metrics_path), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_bytes().count(b"\n") >= answered_before_hang:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not list(out.glob("part-*.parquet"))
        journaled = [json.loads(line)["rollout_id"] for line in journal.read_text().splitlines()]
        assert len(journaled) == answered_before_hang
        state["hang"] = False
        server.release()
        run_stage(paths, params, out, metrics_path)
    rows = read_artifact(out, "critiques").to_pylist()
    incorrect = [r for r in rows if not r["rollout_id"].endswith("#0")]
    assert all(r["feedback_text"] == reply_for(r["rollout_id"]) for r in incorrect)
    for rid in journaled:  # answered before the kill: asked exactly once
        assert server.counts[rid] == 1
    # only the requests in flight at the kill (<= max_concurrency) were asked twice
    assert sum(server.counts.values()) - len(incorrect) <= 2
    assert not journal.exists()  # removed once its part is written


def test_openai_critic_aborts_when_server_is_down(tmp_path):
    # a closed port: every row fails; the run stops instead of writing a part full of errors
    with CriticServer() as server:
        base_url = server.base_url
    critic = OpenAICritic(base_url, "m", "TCRLSD_TEST_CRITIC_KEY", SamplingConfig(max_new_tokens=8), 100,
                          max_concurrency=2, request_timeout_s=0.5, max_attempts=2, backoff_initial_s=0.01,
                          backoff_max_s=0.02, abort_after_failures=3)
    from tcrlsd.critique import CritiqueRequest

    reqs = [CritiqueRequest(f"r{i}", "[[r]] x", "p", "y", None, "1", False, None) for i in range(10)]
    got = []
    with pytest.raises(CriticAborted, match="failed 3 rows in a row"):
        critic.critique(reqs, lambda i, reply: got.append(reply))
    assert len(got) == 3 and all(r.error == "connection error after 2 attempts" for r in got)


# --------------------------------------------------------------------------------------------------
# self mode: the tiny random policy critiques itself


class RecordingBackend:
    """The real transformers backend, keeping what was sent (prompt ids, n, sampling) and what came back."""

    def __init__(self, inner):
        self.inner, self.stop_ids, self.calls = inner, inner.stop_ids, []

    def generate(self, prompts, samples_per_prompt, sampling):
        out = self.inner.generate(prompts, samples_per_prompt, sampling)
        self.calls.append({"prompts": [list(p) for p in prompts], "n": samples_per_prompt, "sampling": sampling,
                           "out": out})
        return out


@pytest.fixture
def recorded(monkeypatch):
    """Every transformers backend the code under test builds is wrapped in a RecordingBackend."""
    import functools

    from tcrlsd.generate import backends as registry

    made, real = [], registry.BACKENDS["transformers"]

    @functools.wraps(real)  # same signature: make_backend checks the options against it
    def factory(model_path, **options):
        made.append(RecordingBackend(real(model_path, **options)))
        return made[-1]

    monkeypatch.setitem(registry.BACKENDS, "transformers", factory)
    return made


CHAT = ("{{ bos_token }}{% for m in messages %}<|user|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_self_mode_sends_chat_rendered_critic_prompts_and_stores_the_replies(tmp_path, tiny_policy, recorded):
    import shutil

    from tcrlsd.critique import clean_feedback, join_inputs
    from tcrlsd.policy import encode_prompt, load_tokenizer
    from tcrlsd.templates import render_user_message

    policy = tmp_path / "chat-policy"  # the tiny policy with a chat template, so "applied" is visible
    shutil.copytree(tiny_policy, policy)
    tok = load_tokenizer(policy)
    tok.chat_template = CHAT
    tok.save_pretrained(policy)
    paths = make_iteration(tmp_path, n_prompts=2, samples=3)
    params = write_params(tmp_path, mode="self", sampling={"max_new_tokens": 12, "temperature": 1.0}, seed=3,
                          chunk_rows=2)
    outs = []
    for k in range(2):
        out = tmp_path / f"self{k}"
        argv = stage_cmd(paths, params, out, tmp_path / f"m{k}.json", extra=["--policy", str(policy)])[2:]
        assert stage_main(argv) == 0
        outs.append(out)
    table = read_artifact(outs[0], "critiques").to_pylist()
    rows = join_inputs(*(read_artifact(paths[k], k) for k in ("rollouts", "verdicts", "prompts")))
    wrong = [i for i, r in enumerate(rows) if not r["is_correct"]]
    assert 0 < len(wrong) < len(rows)

    # What was sent: one request per incorrect rollout, in order, chunks of chunk_rows, one sample each,
    # the self-incorrect critic prompt rendered through the policy's chat template (one BOS).
    backend = recorded[0]
    assert [len(c["prompts"]) for c in backend.calls] == [2] * (len(wrong) // 2) + [1] * (len(wrong) % 2)
    assert all(c["n"] == 1 and c["sampling"] == SamplingConfig(1.0, 1.0, 12, 3) for c in backend.calls)
    sent = [p for c in backend.calls for p in c["prompts"]]
    replies = [g[0] for c in backend.calls for g in c["out"]]
    tpl = load_template(default_templates_dir(), "self-incorrect")
    assert len(sent) == len(wrong)
    for ids, i in zip(sent, wrong):
        want = render_user_message(tok, render_critic_prompt(tpl, rows[i], 6000))
        assert ids == encode_prompt(tok, want) and ids.count(tok.bos_token_id) == 1
        text = tok.decode(ids)
        assert text.startswith("<s><|user|>\n") and text.endswith("<|end|>\n<|assistant|>\n")
        assert rows[i]["problem"] in text and rows[i]["response_text"] in text

    # What was stored: each incorrect row holds the cleaned reply it got (or the reason it has none).
    for row in (table[i] for i in range(len(rows)) if i not in wrong):
        assert row["feedback_text"] is None and row["error"] is None and row["critic"] == "none"
    for i, reply in zip(wrong, replies):
        want = clean_feedback(reply.text, CritiqueParams().max_feedback_chars)
        assert (table[i]["feedback_text"], table[i]["error"]) == (want.text, want.error)
        assert table[i]["critic"] == f"self:transformers:{policy}"
        assert table[i]["template"] == "self-incorrect@v1+teacher-critique@v1"
        if want.text is not None:
            assert want.text in table[i]["teacher_prompt"]
    assert sum(table[i]["feedback_text"] is not None for i in wrong) >= 1
    parts = [sorted(p.read_bytes() for p in o.glob("part-*.parquet")) for o in outs]
    assert parts[0] == parts[1]  # deterministic on CPU
    assert not list(outs[0].glob("journal-*")) and not list((tmp_path / ".self0.resume").glob("journal-*"))
    verdicts = read_artifact(paths["verdicts"], "verdicts")
    metrics = critique_metrics(read_artifact(outs[0], "critiques"), verdicts, CritiqueParams(mode="self"))
    assert metrics["eligible_rollouts"] == len(wrong)


def test_stage_shards_and_which_all(tmp_path):
    paths = make_iteration(tmp_path, n_prompts=4, samples=3)
    params = write_params(tmp_path, which="all", rows_per_part=4)  # 12 rows -> 3 parts
    out, metrics_path = tmp_path / "c", tmp_path / "m.json"
    run_stage(paths, params, out, metrics_path, extra=["--shard", "1/2"])
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00001.parquet"] and not metrics_path.exists()
    run_stage(paths, params, out, metrics_path, extra=["--shard", "0/2"])
    rows = read_artifact(out, "critiques").to_pylist()
    assert [r["rollout_id"] for r in rows] == read_artifact(paths["rollouts"], "rollouts").column("rollout_id").to_pylist()
    assert json.loads(metrics_path.read_text())["coverage"] == 1.0
    assert all("I find no error" in r["feedback_text"] for r in rows if r["rollout_id"].endswith("#0"))


def test_transformers_critic_with_tiny_model(tiny_policy, recorded):
    from tcrlsd.critique import CritiqueRequest, clean_feedback, make_critic
    from tcrlsd.policy import encode_prompt, load_tokenizer

    params = CritiqueParams(critic="transformers", sampling=SamplingParams(temperature=1.0, max_new_tokens=8), seed=1,
                            chunk_rows=2)
    critic = make_critic("transformers", params, str(tiny_policy))
    assert critic.label == f"transformers:{tiny_policy}" and critic.journaled
    reqs = [CritiqueRequest(f"r{i}", f"Problem {i}: 2 + {i} = ?", "p", "y", None, "1", False, None) for i in range(3)]
    runs = []
    for _ in range(2):
        got = {}
        critic.critique(reqs, lambda i, reply: got.__setitem__(i, reply))
        runs.append(got)
    assert sorted(runs[0]) == [0, 1, 2] and runs[0] == runs[1]
    # sent: the request prompts (no chat template on this tokenizer: the text itself), in chunks of 2
    tok = load_tokenizer(tiny_policy)
    (backend,) = recorded
    calls = backend.calls[:2]  # the first critique() call
    assert [c["prompts"] for c in calls] == [[encode_prompt(tok, r.prompt) for r in reqs[:2]],
                                            [encode_prompt(tok, reqs[2].prompt)]]
    # received: each reply is the cleaned completion text of its own request
    replies = [g[0].text for c in calls for g in c["out"]]
    assert [runs[0][i] for i in range(3)] == [clean_feedback(t, params.max_feedback_chars) for t in replies]
    assert any(r.text for r in runs[0].values())
