"""DVC stage `summarize`: the per-iteration table (DVC plots) and the headline metrics (DVC metrics).

    python stages/summarize.py --metrics-dir data/metrics --table data/summary/iterations.csv \
        --headline data/summary/headline.json [--params params.yaml]

Reads every stage's detail JSON under --metrics-dir (iter-<id>/<stage>.json, evaluate-baseline.json)
and writes one CSV row per iteration and one small JSON of headline numbers. With --params, the
rows also go to the live tracking folder (params `tracking`: DVCLive, optional TensorBoard).
"""

from __future__ import annotations

import sys

from tcrlsd.stagehost import hand_off

hand_off()  # with a warm stage host (tcrlsd iterate / experiment) it runs this script and this exits

from tcrlsd.stagecli import process_main, run_stage, stage_parser, write_metrics
from tcrlsd.summarize import collect_rows, headline, track_rows, write_table
from tcrlsd.tracking import Tracker, load_tracking


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)  # no params but the optional tracking section (--params below)
    ap.add_argument("--metrics-dir", required=True, help="folder of the stages' detail metrics JSONs")
    ap.add_argument("--table", required=True, help="output CSV: one row per iteration")
    ap.add_argument("--headline", required=True, help="output JSON: headline numbers (DVC metrics)")
    ap.add_argument("--params", default=None, help="params.yaml: its `tracking` section (live per-iteration series)")
    args = ap.parse_args(argv)
    return run_stage("summarize", lambda: _run(args))


def _run(args) -> int:
    rows = collect_rows(args.metrics_dir)
    write_table(rows, args.table)
    write_metrics(headline(args.metrics_dir, rows), args.headline)
    if args.params:
        with Tracker(load_tracking(args.params)) as tracker:
            track_rows(rows, tracker)
    print(f"summarize: {len(rows)} iteration(s) -> {args.table}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(process_main(main))
