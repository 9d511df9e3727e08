"""DVC stage ``verify``: rollouts + prompts -> ``verdicts`` (reward per rollout) and metrics.

    python stages/verify.py --params params.yaml --prompts data/prompts.parquet \
        --rollouts data/iter-0000/rollouts --out data/iter-0000/verdicts.parquet \
        --metrics data/iter-0000/metrics/verify.json

Grading is cheap (milliseconds a row in worker processes), so the stage is not resumable part by
part: it regrades everything and writes its outputs atomically (a killed run leaves the old files).
"""

from __future__ import annotations

import sys
import time

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.params import load_section
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics
from tcrlsd.verify import VerifyParams, verify_rollouts
from tcrlsd.verify.params import response_token_limit


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("verify",))
    ap.add_argument("--prompts", required=True, help="prompts Parquet (prompt_id, answer, source)")
    ap.add_argument("--rollouts", required=True, help="rollouts artifact: NAME.parquet or a folder of shards")
    ap.add_argument("--out", required=True, help="output verdicts Parquet file")
    ap.add_argument("--metrics", default=None, help="output JSON: reward mean, counts by reason / source / grader")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    return run_stage("verify", lambda: _run(args))


def _run(args) -> int:
    started = time.monotonic()
    params = load_section(args.params, "verify", VerifyParams, preset=args.preset)
    prompts = read_artifact(args.prompts, "prompts")
    rollouts = read_artifact(args.rollouts, "rollouts")
    limit = response_token_limit(args.params, args.preset) if params.overlong_penalty_buffer else None
    verdicts, metrics = verify_rollouts(rollouts, prompts, params, progress=not args.no_progress,
                                        prompts_source=args.prompts, overlong_max_tokens=limit)
    write_artifact(verdicts, args.out, "verdicts")
    write_metrics(metrics, args.metrics)
    took = time.monotonic() - started
    reasons = ", ".join(f"{k} {v}" for k, v in metrics["by_reason"].items() if v)
    print(
        f"verify: {verdicts.num_rows} rollouts, reward mean {metrics['reward_mean']:.4f} ({reasons}); "
        f"{took:.1f} s; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
