"""What a critique says, checked against the synthetic task's steps: leaks of intermediate values and
agreement with the reference critic (the critique metrics' content columns)."""

from __future__ import annotations

import re

import pyarrow as pa

from tcrlsd.reference_critic import named_step, parse_steps, reference_critique


_NUMBER = re.compile(r"(?<![0-9.])-?[0-9]+(?![0-9])")


def reveals_intermediate(feedback: str | None, solution: str | None, response: str, problem: str) -> bool | None:
    """Whether ``feedback`` states a right intermediate result (a gold step's result other than the
    last) that neither the problem nor the response contains: information beyond the attempt.

    None when there is no feedback or the gold solution has no ``a op b = r`` steps (only the
    synthetic format has them). "Step 2 ... 12 - 2 is 10, not 20" reveals 10 when the response never
    wrote 10; it does not count 12 (the response wrote it) nor 2 (in the problem).
    """
    steps = parse_steps(solution or "")
    if not feedback or not steps:
        return None
    known = set(_NUMBER.findall(problem)) | set(_NUMBER.findall(response))
    said = set(_NUMBER.findall(feedback))
    return any(str(s.result) in said and str(s.result) not in known for s in steps[:-1])


def reference_step(response: str, solution: str | None) -> int | None:
    """The step the reference critic names for ``response`` (1-based), None when it names none."""
    return named_step(reference_critique(response, solution).text)


def agrees_with_reference(feedback: str | None, response: str, solution: str | None) -> bool | None:
    """Whether ``feedback`` names first the step the reference critic names first; None when there is
    no feedback or the reference critic names no step (no step-by-step gold, or nothing wrong in a step)."""
    want = reference_step(response, solution)
    if feedback is None or want is None:
        return None
    return named_step(feedback) == want


def content_metrics(rows: list[dict], correct: dict, rollouts: pa.Table | None, prompts: pa.Table | None) -> dict:
    """What the feedback says, checked against the synthetic task's steps (None without step-by-step gold).

    ``intermediate_leakage_share``: feedback that states a right intermediate value the attempt and
    the problem do not contain (``leakage_share`` is the final-answer one). ``reference_step_agreement``:
    of the feedback rows on wrong rollouts where the reference critic names a step, the share whose
    feedback names that step first (self-critiques, model critics, controls: how often the feedback
    points where the reference critic points).
    """
    none = {"intermediate_leaks": None, "intermediate_leakage_share": None, "reference_step_agreement": None,
            "reference_step_agreement_rows": 0}
    if rollouts is None or prompts is None:
        return none
    pr = {r["prompt_id"]: r for r in prompts.select(["prompt_id", "problem", "solution"]).to_pylist()}
    resp = {r["rollout_id"]: r for r in rollouts.select(["rollout_id", "prompt_id", "response_text"]).to_pylist()}
    leaks, leak_rows, agree, agree_rows = 0, 0, 0, 0
    for r in rows:
        ro = resp.get(r["rollout_id"])
        if ro is None or r["feedback_text"] is None:
            continue
        p = pr.get(ro["prompt_id"], {"problem": "", "solution": None})
        leak = reveals_intermediate(r["feedback_text"], p["solution"], ro["response_text"], p["problem"])
        if leak is not None:
            leak_rows += 1
            leaks += leak
        if not correct.get(r["rollout_id"], False):
            same = agrees_with_reference(r["feedback_text"], ro["response_text"], p["solution"])
            if same is not None:
                agree_rows += 1
                agree += same
    if not leak_rows and not agree_rows:
        return none
    return {"intermediate_leaks": leaks, "intermediate_leakage_share": leaks / leak_rows if leak_rows else None,
            "reference_step_agreement": agree / agree_rows if agree_rows else None,
            "reference_step_agreement_rows": agree_rows}
