"""DVC stage `update`: one PPO-clip iteration of the policy on the token-level advantages.

    python stages/update.py --params params.yaml --rollouts data/iter-0000/rollouts \
        --scores data/iter-0000/scores --advantages data/iter-0000/advantages.parquet \
        --policy models/policy-0000 --state-in models/policy-0000-state \
        --policy-out models/policy-0001 --state-out models/policy-0001-state \
        --metrics data/iter-0000/metrics/update.json [--reference-policy PATH]

Runs alone (no launcher) or under ``torchrun --nproc_per_node N`` / ``deepspeed``: the processes
split every mini-batch. ``--state-in`` may be missing only for iteration 0 (or with
update.restart). The teacher folder for score.teacher lagged/ema is written to STATE_OUT/teacher.
"""

from __future__ import annotations

import argparse
import sys

from tcrlsd.artifacts import write_json
from tcrlsd.params import load_section, load_yaml
from tcrlsd.tracking import load_tracking
from tcrlsd.update.params import UpdateParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True,
                    help="params.yaml (section `update`, score.teacher, and `tracking`: live step curves)")
    ap.add_argument("--rollouts", required=True)
    ap.add_argument("--scores", required=True)
    ap.add_argument("--advantages", required=True)
    ap.add_argument("--policy", required=True, help="policy checkpoint that generated and scored the rollouts")
    ap.add_argument("--state-in", default=None, help="training state of the previous iteration (absent at k=0)")
    ap.add_argument("--policy-out", required=True, help="next policy checkpoint folder")
    ap.add_argument("--state-out", required=True, help="training state folder written beside it")
    ap.add_argument("--reference-policy", default=None, help="reference checkpoint of the k3 KL (update.kl_coef > 0)")
    ap.add_argument("--metrics", default=None, help="metrics JSON")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    params = load_section(args.params, "update", UpdateParams)
    teacher_mode = (load_yaml(args.params).get("score") or {}).get("teacher", "current")

    from tcrlsd.update.stage import run_update

    metrics = run_update(args.rollouts, args.scores, args.advantages, args.policy, args.policy_out, args.state_out,
                         params, state_in=args.state_in, teacher_mode=teacher_mode, reference=args.reference_policy,
                         tracking=load_tracking(args.params))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if args.metrics:
            write_json(metrics, args.metrics)
        print(f"update: iteration {metrics['iteration']}, {metrics['optimizer_steps']} steps "
              f"({metrics['skipped_steps']} skipped), pg_loss {metrics['pg_loss']}, entropy {metrics['entropy']:.4f}, "
              f"{metrics['tokens_per_s']} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
