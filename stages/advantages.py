"""DVC stage ``advantages``: scores + verdicts + rollouts -> the ``advantages`` artifact and its metrics.

    python stages/advantages.py --params params.yaml --rollouts data/iter-0000/rollouts \
        --verdicts data/iter-0000/verdicts.parquet --scores data/iter-0000/scores \
        [--critiques data/iter-0000/critiques] --out data/iter-0000/advantages.parquet \
        --metrics data/iter-0000/metrics/advantages.json

Params: section ``advantages`` (estimator, alpha, beta, lam0, lam_decay_steps, eps_w, norm_by_std,
delta_clip). λ follows the schedule at the rollouts' ``iteration``. The scores are streamed batch by
batch; the output is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.advantages import AdvantagesParams, IterationInputs, compute_advantages
from tcrlsd.artifacts import artifact_path
from tcrlsd.params import load_section
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("advantages",))
    ap.add_argument("--rollouts", required=True, help="rollouts artifact (NAME.parquet or NAME/ of shards)")
    ap.add_argument("--verdicts", required=True, help="verdicts artifact")
    ap.add_argument("--scores", required=True, help="scores artifact")
    ap.add_argument("--critiques", default=None, help="critiques artifact: critique coverage from feedback_text")
    ap.add_argument("--out", required=True, help="output advantages Parquet file")
    ap.add_argument("--metrics", default=None, help="output metrics JSON")
    args = ap.parse_args(argv)
    return run_stage("advantages", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "advantages", AdvantagesParams, preset=args.preset)
    inputs = IterationInputs(
        rollouts=artifact_path(args.rollouts),
        verdicts=artifact_path(args.verdicts),
        scores=artifact_path(args.scores),
        critiques=artifact_path(args.critiques) if args.critiques else None,
    )
    metrics = compute_advantages(inputs, params, args.out)  # validates inputs, writes atomically
    write_metrics(metrics, args.metrics)
    print(
        f"advantages: {metrics['estimator']} λ={metrics['lam']:.4g} on {metrics['rollouts']} rollouts, "
        f"{metrics['tokens']} tokens -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
