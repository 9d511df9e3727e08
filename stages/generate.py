"""DVC stage `generate`: sample a GRPO group of responses for each of this iteration's train prompts.

    python stages/generate.py --params params.yaml --prompts data/prompts.parquet \
        --policy models/policy-0000 --iteration 0 --out data/iter-0000/rollouts \
        [--shard i/N] [--metrics data/iter-0000/metrics/generate.json]

Writes the `rollouts` artifact as a folder of parts. Several workers share an iteration with
--shard i/N; a killed run resumes from the parts already written. Metrics are written only when
the artifact is complete (a worker that finishes early leaves them to the last one).
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.artifacts import ShardSpec
from tcrlsd.generate import GenerateParams, load_group_filter, run_generate
from tcrlsd.params import load_section
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("generate",))
    ap.add_argument("--prompts", required=True, help="the prompts artifact (rows with split == train are sampled)")
    ap.add_argument("--policy", required=True, help="policy checkpoint folder (Hugging Face format, safetensors)")
    ap.add_argument("--iteration", type=int, required=True, help="training step k (selects the prompts, seeds)")
    ap.add_argument("--out", required=True, help="output folder of the rollouts artifact")
    ap.add_argument("--shard", default=None, help="i/N: this worker generates parts p with p %% N == i")
    ap.add_argument("--metrics", default=None, help="metrics JSON to write once the artifact is complete")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--restart", action="store_true",
                    help="delete finished parts made with other code/inputs/params (refused while another worker runs)")
    args = ap.parse_args(argv)
    return run_stage("generate", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "generate", GenerateParams, preset=args.preset)
    # dynamic sampling grades as verify does and asks the estimator (advantages, critique sections)
    dynamic = load_group_filter(args.params, args.iteration) if params.dynamic_sampling else None
    metrics = run_generate(params, args.prompts, args.policy, args.iteration, args.out,
                           shard=ShardSpec.parse(args.shard), progress=not args.no_progress, restart=args.restart,
                           dynamic=dynamic)
    if metrics["complete"]:
        write_metrics(metrics, args.metrics)
    print(f"generate: {metrics['parts_done']}/{metrics['parts_total']} parts done, "
          f"{metrics['rollouts_generated_now']} rollouts now, {metrics['tokens_per_second']} tokens/s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
