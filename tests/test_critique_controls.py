"""The critique stage's controls (blank, shuffled), the reference critic's noise, the sibling mode, and
the content metrics (intermediate leaks, agreement with the reference critic) -- issue 20."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from tcrlsd.critique import CritiqueParams, ReferenceCritic, critique_metrics, critique_rows
from tcrlsd.critique.content import agrees_with_reference, reveals_intermediate
from tcrlsd.critique.controls import attach_sources, shuffled_sources, sibling_sources
from tcrlsd.critique.stage import needs_feedback, templates_for
from tcrlsd.prepare import DEFAULT_PROMPT_TEMPLATE
from tcrlsd.reference_critic import CONTENT_FREE_FEEDBACK, NOISE_KINDS, named_step, noise_draw, reference_critique
from tcrlsd.synthetic import make_problems


# "Start with 12. Add 9, then subtract 5." gold: 12 + 9 = 21 / 21 - 5 = 16
GOLD = "12 + 9 = 21\n21 - 5 = 16\nThe answer is \\boxed{16}."
PROBLEM = "Start with 12. Add 9, then subtract 5. What is the result?"
DROPPED_CARRY = "12 + 9 = 21\n21 - 5 = 26\nThe answer is \\boxed{26}."  # step 2 borrows: the demonstrator's slip
WRONG_FIRST = "12 + 9 = 11\n11 - 5 = 6\nThe answer is \\boxed{6}."


def _row(pid: str, j: int, response: str, correct: bool, problem: str = PROBLEM, solution: str = GOLD,
         answer: str = "16") -> dict:
    from tcrlsd.answers import last_boxed

    return {"rollout_id": f"{pid}#{j}", "prompt_id": pid, "response_text": response, "is_correct": correct,
            "reason": "correct" if correct else "incorrect", "extracted_answer": last_boxed(response),
            "problem": problem, "prompt": DEFAULT_PROMPT_TEMPLATE.replace("{problem}", problem), "answer": answer,
            "solution": solution}


def _first_step_off_by_one(p) -> str:
    """``p``'s solution with step 1's result one too big, carried through the later steps."""
    from tcrlsd.synthetic import solution_steps

    out, value = [], None
    for i, (a, op, b, r) in enumerate(p.steps):
        a = a if value is None else value
        value = (a + b if op == "+" else a - b if op == "-" else a * b) + (1 if i == 0 else 0)
        out.append((a, op, b, value))
    return solution_steps(out, value)


def _groups(n_prompts: int = 4, wrong: tuple[int, ...] = (0, 1, 2), size: int = 4) -> list[dict]:
    rows = []
    for k, p in enumerate(make_problems(n_prompts, seed=3, levels=(2,))):
        for j in range(size):
            bad = j in wrong
            text = _first_step_off_by_one(p) if bad else p.solution
            rows.append(_row(f"p{k}", j, text, not bad, p.problem, p.solution, p.answer))
    return rows


def _run(rows, **kw):
    params = CritiqueParams(**kw)
    rows = [dict(r) for r in rows]
    which = params.effective_which()
    attach_sources(rows, [i for i, r in enumerate(rows) if needs_feedback(params.mode, which, r["is_correct"])],
                   params.mode, params.control, params.seed)
    critic = ReferenceCritic(noise=params.reference_noise, seed=params.seed)
    return critique_rows(rows, params, critic, templates_for(params)).to_pylist()


def test_blank_control_gives_every_wrong_rollout_the_content_free_sentence():
    out = _run(_groups(), control="blank")
    wrong = [r for r, g in zip(out, _groups()) if not g["is_correct"]]
    assert len(wrong) == 12 and all(r["feedback_text"] == CONTENT_FREE_FEEDBACK for r in wrong)
    assert all(r["critic"] == "control:blank" and CONTENT_FREE_FEEDBACK in r["teacher_prompt"] for r in wrong)
    assert all(r["feedback_text"] is None for r, g in zip(out, _groups()) if g["is_correct"])


def test_shuffled_control_is_a_seeded_permutation_across_prompts():
    rows = _groups()
    eligible = [i for i, r in enumerate(rows) if not r["is_correct"]]
    pairs = shuffled_sources(rows, eligible, seed=0)
    assert sorted(pairs) == eligible and sorted(pairs.values()) == eligible  # a permutation of the wrong rows
    assert all(rows[i]["prompt_id"] != rows[j]["prompt_id"] for i, j in pairs.items())
    assert pairs == shuffled_sources(rows, eligible, seed=0) != shuffled_sources(rows, eligible, seed=1)

    out = _run(rows, control="shuffled")
    own = _run(rows)
    by_id = {r["rollout_id"]: r for r in own}
    for i, j in pairs.items():
        got = out[i]
        # the source row's own critique, in THIS row's teacher context (its problem), recorded per row
        assert got["feedback_text"] == by_id[rows[j]["rollout_id"]]["feedback_text"]
        assert got["critic"] == f"reference|shuffled:{rows[j]['rollout_id']}"
        assert got["teacher_prompt"].startswith(rows[i]["problem"])


def test_shuffled_control_when_one_prompt_holds_most_wrong_rows():
    # 3 wrong rows of p0, 1 of p1: no permutation avoids own prompt; each row takes another prompt's row
    rows = [_row("p0", j, WRONG_FIRST, False) for j in range(3)] + [_row("p1", 0, WRONG_FIRST, False)]
    pairs = shuffled_sources(rows, range(4), seed=0)
    assert pairs[3] in (0, 1, 2) and all(pairs[i] == 3 for i in range(3))
    alone = shuffled_sources(rows[:3], range(3), seed=0)
    assert alone == {}
    out = _run(rows[:3], control="shuffled")
    assert all(r["feedback_text"] is None and "no row of another prompt" in r["error"] for r in out)


def test_reference_noise_kinds_by_hand():
    """The three kinds on a hand-computed case: step 2 of DROPPED_CARRY writes 26 for 21 - 5 = 16."""
    import random

    clean = reference_critique(DROPPED_CARRY, GOLD, reveal_final_answer=True).text
    assert clean == ("Step 2 has an arithmetic error: 21 - 5 is 16, not 26. Carry the corrected result into the "
                     "steps after it.")
    step = reference_critique(DROPPED_CARRY, GOLD, True, "wrong_step", random.Random(0))
    assert step.control == "noise:wrong_step" and named_step(step.text) == 1  # the only other step
    assert "12 + 9 is " in step.text and "12 + 9 is 21," not in step.text
    value = reference_critique(DROPPED_CARRY, GOLD, True, "wrong_value", random.Random(0))
    assert value.control == "noise:wrong_value" and named_step(value.text) == 2
    assert "21 - 5 is 16" not in value.text and ", not 26." in value.text
    bare = reference_critique(DROPPED_CARRY, GOLD, True, "no_value", random.Random(0))
    assert bare.text == "Step 2 has an arithmetic error: 21 - 5 is not 26. Redo this subtraction carefully."
    # other errors (a missing step) are left alone
    short = "12 + 9 = 21\nThe answer is \\boxed{21}."
    assert reference_critique(short, GOLD, False, "wrong_value").text == reference_critique(short, GOLD).text


def test_reference_noise_rate_is_deterministic_per_rollout_and_seed():
    draws = [noise_draw(0.3, 7, f"p{i}#0")[0] for i in range(4000)]
    assert draws == [noise_draw(0.3, 7, f"p{i}#0")[0] for i in range(4000)]
    assert draws != [noise_draw(0.3, 8, f"p{i}#0")[0] for i in range(4000)]
    kinds = Counter(d for d in draws if d is not None)
    assert abs(sum(kinds.values()) / 4000 - 0.3) < 0.03 and set(kinds) == set(NOISE_KINDS)
    assert all(noise_draw(0.0, 7, f"p{i}#0")[0] is None for i in range(100))

    rows = _groups(8)
    out = _run(rows, reference_noise=1.0, seed=5)
    tags = [r["critic"].split("|")[1] for r, g in zip(out, rows) if not g["is_correct"]]
    assert all(t.startswith("noise:") for t in tags)  # every critique of an arithmetic error made noisy
    clean = _run(rows, seed=5)
    assert all(a["feedback_text"] != b["feedback_text"] for a, b, g in zip(out, clean, rows) if not g["is_correct"])


def test_sibling_mode_shows_another_successful_rollout_never_the_sample():
    rows = _groups(3, wrong=(0, 1))  # per prompt: two wrong, two correct
    rows += [_row("p9", 0, WRONG_FIRST, False), _row("p9", 1, DROPPED_CARRY, False)]  # no sibling succeeded
    params = CritiqueParams(mode="sibling")
    assert params.effective_which() == "all"
    out = _run(rows, mode="sibling")
    for r, g in zip(out, rows):
        if g["prompt_id"] == "p9":
            assert r["feedback_text"] is None and r["error"] is None and r["teacher_prompt"] is None
            continue
        src = r["critic"].split(":", 1)[1]
        sib = next(x for x in rows if x["rollout_id"] == src)
        assert src != g["rollout_id"] and sib["prompt_id"] == g["prompt_id"] and sib["is_correct"]
        assert r["feedback_text"] == sib["response_text"] and "<reference>" in r["teacher_prompt"]
    pairs = sibling_sources(rows, range(len(rows)), seed=0)
    assert pairs == sibling_sources(rows, range(len(rows)), seed=0)
    # a correct rollout with one correct sibling always gets that one
    assert pairs[2] == 3 and pairs[3] == 2


def test_content_flags_by_hand():
    # "21 - 5 is 16": 16 is the final answer, not an intermediate; 21 the response wrote itself
    assert reveals_intermediate("Step 2: 21 - 5 is 16, not 26.", GOLD, DROPPED_CARRY, PROBLEM) is False
    # "12 + 9 is 21": 21 is gold's intermediate value and WRONG_FIRST never wrote it
    assert reveals_intermediate("Step 1: 12 + 9 is 21, not 11.", GOLD, WRONG_FIRST, PROBLEM) is True
    assert reveals_intermediate(None, GOLD, WRONG_FIRST, PROBLEM) is None
    assert reveals_intermediate("x", "no steps here", WRONG_FIRST, PROBLEM) is None
    assert agrees_with_reference("In step 2 you dropped the borrow.", DROPPED_CARRY, GOLD) is True
    assert agrees_with_reference("Step 1 is wrong.", DROPPED_CARRY, GOLD) is False
    assert agrees_with_reference(CONTENT_FREE_FEEDBACK, DROPPED_CARRY, GOLD) is False
    assert agrees_with_reference("Step 1", GOLD, GOLD) is None  # nothing wrong: the reference names no step


def test_critique_metrics_report_controls_leaks_and_agreement():
    rows = _groups(4)
    for kw, agree in (({}, 1.0), ({"control": "blank"}, 0.0)):
        params = CritiqueParams(**kw)
        table = pa.Table.from_pylist(_run(rows, **kw))
        verdicts = pa.table({"rollout_id": [r["rollout_id"] for r in rows], "is_correct": [r["is_correct"] for r in rows]})
        rollouts = pa.table({"rollout_id": [r["rollout_id"] for r in rows], "prompt_id": [r["prompt_id"] for r in rows],
                             "response_text": [r["response_text"] for r in rows]})
        prompts = pa.table({"prompt_id": [r["prompt_id"] for r in rows], "problem": [r["problem"] for r in rows],
                            "solution": [r["solution"] for r in rows], "answer": [r["answer"] for r in rows]})
        m = critique_metrics(table, verdicts, params, rollouts, prompts)
        assert m["control"] == kw.get("control", "none") and m["reference_step_agreement_rows"] == 12
        assert m["reference_step_agreement"] == pytest.approx(agree)
        # every wrong row's first step is off by one; the reference critic states the right result of
        # step 1 (an intermediate value the response never wrote): 12 of 12 leak one; blank: none
        assert m["intermediate_leakage_share"] == pytest.approx(agree)
    shuffled = CritiqueParams(control="shuffled")
    table = pa.Table.from_pylist(_run(rows, control="shuffled"))
    m = critique_metrics(table, verdicts, shuffled, rollouts, prompts)
    assert m["feedback_controls"] == {"shuffled": 12}


def test_shuffled_gold_shows_another_prompts_solution():
    rows = _groups(3)
    out = _run(rows, mode="gold", control="shuffled")
    for r, g in zip(out, rows):
        src = r["critic"].split("|shuffled:")[1]
        other = next(x for x in rows if x["rollout_id"] == src)
        assert other["prompt_id"] != g["prompt_id"] and r["feedback_text"] == other["solution"]
