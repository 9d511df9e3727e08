"""DVC stage ``prepare``: raw problem sets (params ``prepare.sources``) -> the ``prompts`` artifact.

    python stages/prepare.py --params params.yaml [--preset FILE] --out data/prompts.parquet \
        [--metrics data/metrics/prepare.json]
"""

from __future__ import annotations

import argparse
import sys

from tcrlsd.artifacts import STAGE_ERRORS, write_artifact, write_json
from tcrlsd.params import load_section
from tcrlsd.prepare import PrepareError, PrepareParams, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", required=True, help="params.yaml (section 'prepare')")
    ap.add_argument("--preset", default=None, help="params-shaped YAML merged over --params (e.g. configs/data/math.yaml)")
    ap.add_argument("--out", required=True, help="output prompts Parquet file")
    ap.add_argument("--metrics", default=None, help="output JSON: rows per source, split and level; skipped records")
    args = ap.parse_args(argv)

    try:
        params = load_section(args.params, "prepare", PrepareParams, preset=args.preset)
        table, metrics = prepare(params)
        write_artifact(table, args.out, "prompts")
        if args.metrics:
            write_json(metrics, args.metrics)
    except (*STAGE_ERRORS, PrepareError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    by_split = ", ".join(f"{k} {v}" for k, v in metrics["rows_by_split"].items())
    print(f"prepare: wrote {table.num_rows} prompts ({by_split}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
