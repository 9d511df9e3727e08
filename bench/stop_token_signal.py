"""What the signals say about the stop token in one iteration folder (a measurement, not a speed bench).

    python bench/stop_token_signal.py data/iter-0000 --policy models/policy-0000

Reads rollouts, verdicts, scores and advantages of the iteration and prints: the share of rollouts
that finished with ``stop`` and the share whose response ids END with a stop id (the contract
since the stop token became part of the response); for those, whether the last token has a
student/teacher log-prob and an advantage; and the per-token gap Delta = teacher - student on the
stop token, over wrong and right rollouts (mean, and mean over rows with feedback).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    from tcrlsd.artifacts import read_artifact
    from tcrlsd.policy import load_generation_config, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("iteration", help="iteration folder holding rollouts, verdicts, scores, advantages")
    ap.add_argument("--policy", required=True, help="the checkpoint that generated it (for its stop ids)")
    args = ap.parse_args()

    tok = load_tokenizer(args.policy)
    stop = {tok.eos_token_id}
    gc = load_generation_config(args.policy)
    if gc is not None and gc.eos_token_id is not None:
        stop |= set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
    d = args.iteration
    rollouts = read_artifact(f"{d}/rollouts", "rollouts").to_pylist()
    verdicts = {r["rollout_id"]: r["is_correct"] for r in read_artifact(f"{d}/verdicts", "verdicts").to_pylist()}
    scores = {r["rollout_id"]: r for r in read_artifact(f"{d}/scores", "scores").to_pylist()}
    advantages = {r["rollout_id"]: r for r in read_artifact(f"{d}/advantages", "advantages").to_pylist()}
    critiques = {r["rollout_id"]: r["feedback_text"] is not None
                 for r in read_artifact(f"{d}/critiques", "critiques").to_pylist()}

    n = len(rollouts)
    stopped = [r for r in rollouts if r["finish_reason"] == "stop"]
    ends = [r for r in stopped if r["response_token_ids"] and r["response_token_ids"][-1] in stop]
    scored = [r for r in ends if len(scores[r["rollout_id"]]["student_logprobs"]) == len(r["response_token_ids"])
              and np.isfinite(scores[r["rollout_id"]]["student_logprobs"][-1])]
    with_adv = [r for r in ends if len(advantages[r["rollout_id"]]["advantages"]) == len(r["response_token_ids"])]
    out = {
        "rollouts": n,
        "finish_stop_share": len(stopped) / n if n else None,
        "ends_with_stop_id_share": len(ends) / n if n else None,
        "stop_rows_whose_last_token_is_the_stop_id_and_scored": len(scored),
        "stop_rows_whose_last_token_has_an_advantage": len(with_adv),
    }
    for label, want in (("wrong", False), ("right", True)):
        rows = [r for r in ends if verdicts[r["rollout_id"]] is want]
        delta = [scores[r["rollout_id"]]["teacher_logprobs"][-1] - scores[r["rollout_id"]]["student_logprobs"][-1]
                 for r in rows]
        fb = [x for x, r in zip(delta, rows) if critiques[r["rollout_id"]]]
        adv = [advantages[r["rollout_id"]]["advantages"][-1] for r in rows]
        out[f"{label}_rollouts_ending_in_stop"] = len(rows)
        out[f"{label}_stop_token_delta_mean"] = float(np.mean(delta)) if delta else None
        out[f"{label}_stop_token_delta_mean_feedback_rows"] = float(np.mean(fb)) if fb else None
        out[f"{label}_feedback_rows"] = len(fb)
        out[f"{label}_stop_token_student_logprob_mean"] = (
            float(np.mean([scores[r["rollout_id"]]["student_logprobs"][-1] for r in rows])) if rows else None)
        out[f"{label}_stop_token_advantage_mean"] = float(np.mean(adv)) if adv else None
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
