"""DVC stage `update`: one PPO-clip iteration of the policy on the token-level advantages.

    python stages/update.py --params params.yaml --rollouts data/iter-0000/rollouts \
        --scores data/iter-0000/scores --advantages data/iter-0000/advantages.parquet \
        --policy models/policy-0000 --state-in models/policy-0000-state \
        --policy-out models/policy-0001 --state-out models/policy-0001-state \
        --metrics data/iter-0000/metrics/update.json [--reference-policy models/policy-0000]

Runs alone (no launcher) or under ``torchrun --nproc_per_node N`` / ``deepspeed``: the processes
split every mini-batch. ``--state-in`` may be missing only for iteration 0 (or with
update.restart). For score.teacher lagged / ema the next teacher is written into the new policy's
folder (POLICY_OUT/teacher), where the next iteration's score stage finds it.
"""

from __future__ import annotations

import argparse
import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.params import load_section
from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics
from tcrlsd.tracking import load_tracking
from tcrlsd.update.params import UpdateParams
from tcrlsd.update.teacher import teacher_mode


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("update", "score.teacher", "tracking"))
    ap.add_argument("--rollouts", required=True, help="rollouts artifact")
    ap.add_argument("--scores", required=True, help="scores artifact (student_logprobs are the old log-probs)")
    ap.add_argument("--advantages", required=True, help="advantages artifact")
    ap.add_argument("--policy", required=True, help="policy checkpoint that generated and scored the rollouts")
    ap.add_argument("--state-in", default=None, help="training state of the previous iteration (absent at k=0)")
    ap.add_argument("--policy-out", required=True, help="next policy checkpoint folder")
    ap.add_argument("--state-out", required=True, help="training state folder written beside it")
    ap.add_argument("--reference-policy", default=None,
                    help="reference checkpoint of the k3 KL, read when update.kl_coef > 0 (dvc.yaml: the starting policy)")
    ap.add_argument("--metrics", default=None, help="metrics JSON (written by rank 0)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    return run_stage("update", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "update", UpdateParams, preset=args.preset)
    mode = teacher_mode(args.params, preset=args.preset)

    from tcrlsd.update.stage import run_update

    metrics = run_update(args.rollouts, args.scores, args.advantages, args.policy, args.policy_out, args.state_out,
                         params, state_in=args.state_in, teacher_mode=mode, reference=args.reference_policy,
                         tracking=load_tracking(args.params))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        write_metrics(metrics, args.metrics)
        print(f"update: iteration {metrics['iteration']}, {metrics['optimizer_steps']} steps "
              f"({metrics['skipped_steps']} skipped), pg_loss {metrics['pg_loss']}, entropy {metrics['entropy']:.4f}, "
              f"{metrics['tokens_per_s']} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
