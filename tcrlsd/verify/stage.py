"""The verify stage's one library call: rollouts + prompts -> verdicts and metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tcrlsd.verify.graders import REASONS, GradeRequest
from tcrlsd.verify.overlong import overlong_penalty
from tcrlsd.verify.params import VerifyError, VerifyParams, grader_for_source
from tcrlsd.verify.pool import GradingPool

# ---------------------------------------------------------------------------------------------
# The stage's one library call


def _gold_by_rollout(rollouts, prompts, prompts_source: str | None) -> tuple[list[str], list[str]]:
    ids = prompts.column("prompt_id").to_pylist()
    answers = prompts.column("answer").to_pylist()
    sources = prompts.column("source").to_pylist()
    index = {pid: i for i, pid in enumerate(ids)}
    golds, srcs = [], []
    for row, (rid, pid) in enumerate(zip(rollouts.column("rollout_id").to_pylist(),
                                         rollouts.column("prompt_id").to_pylist())):
        i = index.get(pid)
        if i is None:
            where = f"{prompts_source}" if prompts_source else "the prompts table"
            raise VerifyError(
                f"rollouts row {row} (rollout_id {rid!r}) has prompt_id {pid!r}, which is not in {where} "
                f"({len(ids)} prompts); were the rollouts generated from another prompts file?"
            )
        golds.append(answers[i])
        srcs.append(sources[i])
    return golds, srcs


def verdict_metrics(verdicts, sources: Sequence[str], prompt_ids: Sequence[str]) -> dict:
    """Reward mean, counts by reason, per source and per grader, and GRPO group mix."""
    rewards = verdicts.column("reward").to_pylist()
    correct = [float(c) for c in verdicts.column("is_correct").to_pylist()]
    reasons = verdicts.column("reason").to_pylist()
    graders = verdicts.column("verifier").to_pylist()
    n = len(rewards)

    def summary(idx: list[int]) -> dict:
        return {"n": len(idx), "reward_mean": (sum(rewards[i] for i in idx) / len(idx)) if idx else 0.0}

    by_source: dict[str, list[int]] = {}
    by_grader: dict[str, list[int]] = {}
    groups: dict[str, list[float]] = {}
    for i in range(n):
        by_source.setdefault(sources[i], []).append(i)
        by_grader.setdefault(graders[i], []).append(i)
        groups.setdefault(prompt_ids[i], []).append(correct[i])  # correctness (rewards may carry a penalty)
    counts = Counter(reasons)
    all_right = sum(1 for g in groups.values() if min(g) == 1.0)
    all_wrong = sum(1 for g in groups.values() if max(g) == 0.0)
    return {
        "n_rollouts": n,
        "reward_mean": (sum(rewards) / n) if n else 0.0,
        "by_reason": {r: counts.get(r, 0) for r in REASONS},
        "by_source": {s: summary(idx) for s, idx in sorted(by_source.items())},
        "by_grader": {g: summary(idx) for g, idx in sorted(by_grader.items())},
        # GRPO learns only from groups with mixed rewards (the others have A = 0 for every sample).
        "groups": {
            "n": len(groups),
            "all_correct": all_right,
            "all_incorrect": all_wrong,
            "mixed": len(groups) - all_right - all_wrong,
        },
    }


def verify_rollouts(rollouts, prompts, params: VerifyParams, progress: bool = False,
                    prompts_source: str | None = None, overlong_max_tokens: int | None = None):
    """Grade every rollout; returns (verdicts table ordered like ``rollouts``, metrics dict).

    ``rollouts`` needs rollout_id, prompt_id, response_text; ``prompts`` needs prompt_id, answer,
    source. A rollout whose prompt_id is not in ``prompts`` is an error naming it.
    ``overlong_max_tokens`` (the response limit, ``generate.sampling.max_new_tokens``): add DAPO's overlong
    penalty (:mod:`tcrlsd.verify.overlong`; needs response_token_ids) when
    ``params.overlong_penalty_buffer`` > 0; None (evaluation) never penalises.
    """
    import pyarrow as pa

    from tcrlsd.schemas import schema_for

    golds, sources = _gold_by_rollout(rollouts, prompts, prompts_source)
    responses = rollouts.column("response_text").to_pylist()
    requests = [GradeRequest(grader_for_source(s, params), r, g) for r, g, s in zip(responses, golds, sources)]
    bar = None
    if progress:
        from tcrlsd.progress import progress_bar

        bar = progress_bar(total=len(requests), desc="verify", unit="rollout")
    try:
        with GradingPool.from_params(params, max_workers=max(1, len(set(requests)))) as pool:
            grades = pool.grade(requests, on_result=bar.update if bar is not None else None)
            stats = dict(pool.stats)
    finally:
        if bar is not None:
            bar.close()
    rewards = [g.reward for g in grades]
    penalty = None
    if overlong_max_tokens is not None and params.overlong_penalty_buffer > 0:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(rollouts.column("response_token_ids")).to_numpy(zero_copy_only=False)
        penalty = overlong_penalty(lengths, overlong_max_tokens, params.overlong_penalty_buffer,
                                   params.overlong_penalty_factor)
        rewards = [r + float(p) for r, p in zip(rewards, penalty)]
    verdicts = pa.table(
        {
            "rollout_id": rollouts.column("rollout_id").cast(pa.string()),
            "reward": pa.array(rewards, pa.float32()),
            "is_correct": pa.array([g.reason == "correct" for g in grades], pa.bool_()),
            "extracted_answer": pa.array([g.extracted_answer for g in grades], pa.string()),
            "reason": pa.array([g.reason for g in grades], pa.string()),
            "verifier": pa.array([r.grader for r in requests], pa.string()),
        },
        schema=schema_for("verdicts"),
    )
    metrics = verdict_metrics(verdicts, sources, rollouts.column("prompt_id").to_pylist())
    # Deadline kills and crashes depend on machine load; they are reported but kept out of the
    # verdicts' bytes (a timeout row is already visible through its reason).
    metrics["pool"] = {"deadline_kills": stats.get("deadline_kills", 0),
                       "worker_crashes": stats.get("worker_crashes", 0)}
    if penalty is not None:
        metrics["overlong_penalty"] = {"buffer": params.overlong_penalty_buffer,
                                       "factor": params.overlong_penalty_factor, "max_tokens": overlong_max_tokens,
                                       "penalized": int((penalty < 0).sum()),
                                       "mean": float(penalty.mean()) if len(penalty) else 0.0}
    return verdicts, metrics
