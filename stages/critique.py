"""DVC stage ``critique``: rollouts + verdicts + prompts -> the ``critiques`` artifact (teacher feedback).

    python stages/critique.py --params params.yaml [--preset FILE] --prompts data/prompts.parquet \
        --rollouts data/iter-0000/rollouts --verdicts data/iter-0000/verdicts.parquet \
        --policy models/policy-0000 --out data/iter-0000/critiques [--shard i/N] \
        [--metrics data/iter-0000/metrics/critique.json]

Resumable: rerun the same command after a kill and it continues (finished parts are kept; a model
critic's answered rows are read back from the part's journal). Exit status 75 when rows failed
transiently or the critic went down: their parts stay unfinished; rerun later to ask only them. With ``--shard i/N`` several workers
share the parts; the worker that finds the artifact complete writes the metrics.
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.artifacts import ShardSpec, read_artifact
from tcrlsd.critique import CriticAborted, CriticRetryLater, CritiqueParams, critique_metrics, read_inputs, run_critique
from tcrlsd.params import load_section
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics

EX_TEMPFAIL = 75  # some rows failed transiently (or the critic went down): rerun later (sysexits.h)


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("critique",))
    ap.add_argument("--prompts", required=True, help="prompts artifact")
    ap.add_argument("--rollouts", required=True, help="rollouts artifact (file or folder of shards)")
    ap.add_argument("--verdicts", required=True, help="verdicts artifact")
    ap.add_argument("--policy", default=None, help="policy checkpoint (used by mode 'self')")
    ap.add_argument("--out", required=True, help="output critiques folder (part-NNNNN.parquet shards)")
    ap.add_argument("--shard", default=None, help="i/N: this worker does parts p with p %% N == i")
    ap.add_argument("--metrics", default=None, help="output metrics JSON (written once the artifact is complete)")
    ap.add_argument("--restart", action="store_true",
                    help="delete finished parts made with other code/inputs/params (refused while another worker runs)")
    args = ap.parse_args(argv)
    return run_stage("critique", lambda: _run(args), exits={(CriticAborted, CriticRetryLater): (EX_TEMPFAIL, "unfinished")})


def _run(args) -> int:
    shard = ShardSpec.parse(args.shard)
    params = load_section(args.params, "critique", CritiqueParams, preset=args.preset)
    rollouts, verdicts, prompts = read_inputs(args.prompts, args.rollouts, args.verdicts)
    complete = run_critique(rollouts, verdicts, prompts, params, args.out, shard, args.policy,
                            input_paths={"prompts": args.prompts, "rollouts": args.rollouts,
                                         "verdicts": args.verdicts}, restart=args.restart)
    if not complete:
        print(f"critique: shard {shard.index}/{shard.count} done; other parts still pending", file=sys.stderr)
        return 0
    critiques = read_artifact(args.out, "critiques")
    metrics = critique_metrics(critiques, verdicts, params, rollouts, prompts)
    write_metrics(metrics, args.metrics)
    print(f"critique: {metrics['rollouts_with_feedback']}/{metrics['rollouts']} rollouts with feedback "
          f"(coverage {metrics['coverage']:.3f}, {metrics['failures']} failures, "
          f"leakage {metrics['leakage_share']:.3f}) in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
