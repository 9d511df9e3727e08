"""DVC stage `score`: student and teacher log-probs of every response token.

    python stages/score.py --params params.yaml --rollouts data/iter-0000/rollouts \
        --critiques data/iter-0000/critiques --policy models/policy-0000 \
        [--teacher-policy DIR] --out data/iter-0000/scores \
        [--shard i/N] --metrics data/iter-0000/metrics/score.json

Writes the folder artifact ``scores/`` part by part (resumable; ``--shard i/N`` workers split the
parts). The metrics JSON (Delta-gap and its spread over token positions, throughput) is written by
whichever run finds the artifact complete.
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.artifacts import ShardSpec, artifact_path, read_artifact
from tcrlsd.params import load_section
from tcrlsd.score import ScoreParams, artifact_metrics, build_inputs, run_score
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("score",))
    ap.add_argument("--rollouts", required=True, help="rollouts artifact (file or folder of shards)")
    ap.add_argument("--critiques", required=True, help="critiques artifact (file or folder of shards)")
    ap.add_argument("--policy", required=True, help="student policy checkpoint folder")
    ap.add_argument("--teacher-policy", default=None,
                    help="score.teacher lagged / ema: the teacher checkpoint folder (default: the one kept in "
                         "--policy's teacher/ folder, else --policy itself: the starting policy)")
    ap.add_argument("--out", required=True, help="scores artifact folder to write")
    ap.add_argument("--shard", default=None, help="i/N: this worker does parts p with p %% N == i")
    ap.add_argument("--metrics", default=None, help="metrics JSON, written once the artifact is complete")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--restart", action="store_true",
                    help="delete finished parts made with other code/inputs/params (refused while another worker runs)")
    args = ap.parse_args(argv)
    return run_stage("score", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "score", ScoreParams, preset=args.preset)
    rollouts = read_artifact(args.rollouts, "rollouts")
    critiques = read_artifact(args.critiques, "critiques")
    inputs = build_inputs(rollouts, critiques, critiques_source=str(artifact_path(args.critiques)))
    paths = {"rollouts": artifact_path(args.rollouts), "critiques": artifact_path(args.critiques)}
    stats = run_score(rollouts, inputs, args.policy, args.out, params, teacher_policy=args.teacher_policy,
                      shard=ShardSpec.parse(args.shard), input_paths=paths, progress=not args.no_progress,
                      restart=args.restart)
    if not stats.complete:
        print(f"score: wrote {stats.parts_done} part(s); other parts still pending (other shards); "
              "metrics are written by the run that completes the artifact", file=sys.stderr)
        return 0
    metrics = artifact_metrics(args.out, inputs)  # one part file at a time, each validated
    metrics["teacher"] = params.teacher
    metrics["run"] = stats.as_dict()
    write_metrics(metrics, args.metrics)
    print(f"score: {metrics['rollouts']} rollouts, coverage {metrics['critique_coverage']}, "
          f"delta_gap {metrics['delta_gap']}, {stats.as_dict()['tokens_per_s']} tok/s, student log-probs from the "
          f"{stats.extra['student_logprobs_from']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
