"""The peer, standalone: TRL's GRPOTrainer from a workspace's warm start (tcrlsd/commands/trl_grpo.py).

The peer is a row of the experiment report now (curve, peak / final table, paired by seed with grpo):

    pip install -e ".[bench]"
    tcrlsd experiment --presets grpo,trl_grpo --iterations K --seeds S --out DIR

This script runs the same code, nothing else, in one workspace prepared like a grpo run whose warm
start and baseline evaluation exist (e.g. an experiment's DIR/runs/trl_grpo-s0, or a project folder
with the grpo preset after `dvc repro baseline`), and prints its per-iteration table:

    python bench/trl_learning.py DIR/runs/trl_grpo-s0

The budget, schedule, lr and sampling come from the workspace's params.yaml and its iterations.yaml
(K items = K iterations); what TRL was told and did is in WORKSPACE/peer.json. A rerun trains again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path, help="a workspace prepared like a grpo run, after `dvc repro baseline`")
    args = ap.parse_args()

    from tcrlsd.commands.trl_grpo import main as peer

    code = peer(["--workspace", str(args.workspace)])
    table = args.workspace / "data" / "summary" / "iterations.csv"
    if code == 0 and table.exists():
        print(table.read_text(), end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
