"""DVC stage ``prepare``: raw problem sets (params ``prepare.sources``) -> the ``prompts`` artifact.

    python stages/prepare.py --params params.yaml [--preset FILE] --out data/prompts.parquet \
        [--metrics data/metrics/prepare.json]
"""

from __future__ import annotations

import sys

from tcrlsd.artifacts import write_artifact
from tcrlsd.params import load_section
from tcrlsd.prepare import PrepareParams, prepare
from tcrlsd.stagecli import run_stage, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("prepare",))
    ap.add_argument("--out", required=True, help="output prompts Parquet file")
    ap.add_argument("--metrics", default=None, help="output JSON: rows per source, split and level; skipped records")
    args = ap.parse_args(argv)
    return run_stage("prepare", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "prepare", PrepareParams, preset=args.preset)
    table, metrics = prepare(params)
    write_artifact(table, args.out, "prompts")
    write_metrics(metrics, args.metrics)
    by_split = ", ".join(f"{k} {v}" for k, v in metrics["rows_by_split"].items())
    print(f"prepare: wrote {table.num_rows} prompts ({by_split}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
