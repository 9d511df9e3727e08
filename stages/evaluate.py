"""DVC stage `evaluate`: held-out accuracy (greedy mean@1, sampled avg@k) of one policy checkpoint.

    python stages/evaluate.py --params params.yaml --prompts data/prompts.parquet \
        --policy models/policy-0001 --out data/iter-0000/evaluations \
        --metrics data/iter-0000/metrics/evaluate.json

Reads params sections `evaluate` (decoding) and `verify` (the graders, as in training). Writes the
`evaluations` artifact as a folder of parts (resumable; --shard i/N splits it between workers), the
metrics JSON (overall, by source and by level).
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.artifacts import ShardSpec
from tcrlsd.evaluate import load_params, run_evaluate
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("evaluate", "verify"))
    ap.add_argument("--prompts", required=True, help="the prompts artifact (rows with split == val are evaluated)")
    ap.add_argument("--policy", required=True, help="policy checkpoint folder (Hugging Face format, safetensors)")
    ap.add_argument("--out", required=True, help="output folder of the evaluations artifact")
    ap.add_argument("--metrics", default=None, help="detail metrics JSON (written once the artifact is complete)")
    ap.add_argument("--shard", default=None, help="i/N: this worker evaluates parts p with p %% N == i")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--restart", action="store_true",
                    help="delete finished parts made with other code/inputs/params (refused while another worker runs)")
    args = ap.parse_args(argv)
    return run_stage("evaluate", lambda: _run(args))


def _run(args) -> int:
    params, verify_params = load_params(args.params, args.preset)
    metrics = run_evaluate(params, verify_params, args.prompts, args.policy, args.out,
                           shard=ShardSpec.parse(args.shard), progress=not args.no_progress, restart=args.restart)
    if not metrics["complete"]:
        print(f"evaluate: {metrics['parts_done']}/{metrics['parts_total']} parts done", file=sys.stderr)
        return 0
    write_metrics(metrics, args.metrics)
    avg = "" if metrics["avg_at_k"] is None else f", avg@{metrics['samples']} {metrics['avg_at_k']:.4f}"
    print(f"evaluate: {args.policy}: {metrics['prompts']} val prompts, greedy mean@1 "
          f"{metrics['greedy_mean_at_1']:.4f}{avg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
