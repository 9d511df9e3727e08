"""Why a policy does or does not learn from its groups: where its wrong answers go wrong, from stored signals.

    python bench/diagnose_errors.py ITER_DIR [ITER_DIR ...] [--policy CHECKPOINT]

For each iteration folder (rollouts, verdicts, scores as the pipeline wrote them; the synthetic task
only) and each wrong rollout, the first wrong step of its worked solution (the reference critic's
step parser, each step recomputed from the value the rollout wrote before it) is classified:

- carry: a sum written 10 too small or a difference 10 too large at a step that needs a carry/borrow;
- slip: any other wrong result (another digit, a wrong operand);
- no step wrong: the steps are right but the boxed answer or the format is not.

Printed per folder: the shares of those classes; how many distinct facts (a op b) the first errors
fall on (few facts shared by many rollouts = one skill the group signal can push on every
iteration; as many facts as errors = each fact is seen about once); and the student's own
probability of the token it sampled at the first wrong digit (from the score stage's
student_logprobs): near 1 = a confident error, which sampling rarely avoids, so GRPO groups
seldom contain the right alternative; near 0.5 or below = the right digit is in reach. Where the
teacher saw feedback, Δ = teacher − student log-prob at that token against every other token: how
precisely the teacher's signal lands on the mistake. ``--scores NAME`` reads another scores folder of
the same rollouts (e.g. one scored after a critique stage with ``critique.control: blank``): the
same positions under a content-free feedback block show what the block's presence alone does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import Counter
from pathlib import Path


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def first_error(text: str):
    """(kind, step index, (a, op, b), written result, true result) of the first wrong step, or None."""
    from tcrlsd.reference_critic import parse_steps
    from tcrlsd.warmstart.data import needs_carry

    steps = parse_steps(text, limit=16)
    for i, s in enumerate(steps):
        a = s.left
        true = _apply(a, s.op, s.right)
        if s.result != true:
            carry = needs_carry(a, s.op, s.right) and s.result == true + (-10 if s.op == "+" else 10)
            return ("carry" if carry else "slip"), i, (a, s.op, s.right), s.result, true
    return None


def digit_token_index(tokenizer, response_ids: list[int], text: str, step: int):
    """Index of the first token of the written result of line ``step`` (None if not found).

    Located by decoding the response token by token (the response text is the decoded ids)."""
    target_line = [ln for ln in text.splitlines() if "=" in ln]
    if step >= len(target_line):
        return None
    line = target_line[step]
    offset = text.find(line) + line.rfind("=") + 1
    while offset < len(text) and text[offset] == " ":
        offset += 1
    pos = 0
    for k, tid in enumerate(response_ids):
        piece = tokenizer.decode([tid], skip_special_tokens=True)
        if pos + len(piece) > offset:
            return k
        pos += len(piece)
    return None


def diagnose(folder: Path, policy: Path | None = None, scores_name: str = "scores") -> dict:
    from tcrlsd.artifacts import read_artifact
    from tcrlsd.policy import load_tokenizer

    rollouts = read_artifact(folder / "rollouts", "rollouts").to_pylist()
    verdicts = {r["rollout_id"]: r for r in read_artifact(folder / "verdicts.parquet", "verdicts").to_pylist()}
    scores = {r["rollout_id"]: r for r in read_artifact(folder / scores_name, "scores").to_pylist()}
    key = folder.name.split("-", 1)[1]
    policy = policy or folder.parents[1] / "models" / f"policy-{key}"  # the default layout's checkpoint
    tokenizer = load_tokenizer(policy) if Path(policy).exists() else None
    kinds: Counter = Counter()
    facts: Counter = Counter()
    probs: list[float] = []
    delta_at: list[float] = []  # teacher - student log-prob at the first wrong digit (feedback rows)
    delta_else: list[float] = []  # ... at every other token of those rows
    delta_before: list[float] = []  # ... at the tokens before it (steps the feedback says nothing about)
    delta_after: list[float] = []  # ... at the tokens after it
    for r in rollouts:
        if verdicts[r["rollout_id"]]["reward"] > 0:
            continue
        err = first_error(r["response_text"])
        if err is None:
            kinds["no step wrong"] += 1
            continue
        kind, step, fact, written, _ = err
        kinds[kind] += 1
        facts[fact] += 1
        if tokenizer is not None:
            k = digit_token_index(tokenizer, r["response_token_ids"], r["response_text"], step)
            if k is not None:
                sc = scores[r["rollout_id"]]
                probs.append(math.exp(sc["student_logprobs"][k]))
                delta = [t - u for t, u in zip(sc["teacher_logprobs"], sc["student_logprobs"])]
                if any(abs(d) > 0 for d in delta):  # the teacher saw feedback
                    delta_at.append(delta[k])
                    delta_else += delta[:k] + delta[k + 1:]
                    delta_before += delta[:k]
                    delta_after += delta[k + 1:]
    wrong = sum(kinds.values())
    return {"rollouts": len(rollouts), "wrong": wrong, "kinds": kinds, "facts": len(facts),
            "errors_with_a_step": sum(facts.values()), "probs": probs, "delta_at": delta_at,
            "delta_else": delta_else, "delta_before": delta_before, "delta_after": delta_after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="iteration folders, e.g. data/iter-0000")
    ap.add_argument("--policy", type=Path, default=None,
                    help="the checkpoint that generated them, for its tokenizer (default: models/policy-<key>)")
    ap.add_argument("--scores", default="scores",
                    help="the scores folder inside each iteration folder (e.g. one scored with critique.control: blank)")
    args = ap.parse_args()
    for folder in args.folders:
        d = diagnose(folder, args.policy, args.scores)
        w = max(1, d["wrong"])
        print(f"{folder}: {d['wrong']} wrong of {d['rollouts']} rollouts")
        print("  first error: " + ", ".join(f"{k} {v / w:.0%}" for k, v in d["kinds"].most_common()))
        print(f"  distinct facts (a op b) under the {d['errors_with_a_step']} first wrong steps: {d['facts']}")
        if d["probs"]:
            ps = sorted(d["probs"])
            print(f"  student p(sampled token) at the first wrong digit: median {statistics.median(ps):.2f}, "
                  f"share > 0.9: {sum(p > 0.9 for p in ps) / len(ps):.0%}, share < 0.5: "
                  f"{sum(p < 0.5 for p in ps) / len(ps):.0%} (n = {len(ps)})")
        if d["delta_at"]:
            print(f"  teacher - student log-prob (feedback rows): at the first wrong digit mean "
                  f"{statistics.mean(d['delta_at']):+.2f} (n = {len(d['delta_at'])}), at every other token mean "
                  f"{statistics.mean(d['delta_else']):+.3f} (n = {len(d['delta_else'])}); before it "
                  f"{statistics.mean(d['delta_before'] or [0]):+.3f}, after it {statistics.mean(d['delta_after'] or [0]):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
