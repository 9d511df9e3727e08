"""dvc.lock's size and DVC's rewrite of it after each stage, for two lock layouts, at N iterations.

    python bench/lock_rewrite.py --before OLD/dvc.lock --after NEW/dvc.lock [--iterations 1,5,10,20] [--repeats 3]

DVC rewrites the whole dvc.lock after every stage it runs (a round-trip YAML load and dump in pure
Python), so a long run pays for the lock's size once per stage. Each lock given is cut to its
iteration 0000 (and the stages outside the loop), then padded with copies of iteration 0000's
entries to stand for a run of N iterations (bench/dvc_overhead.py's ``padded_lock``); the rewrite
is timed in this process, the two layouts alternating, median of ``--repeats``. Use the lock of a
run made before and after a layout change (e.g. the module-list deps of 5318498 against the code
fingerprints of the `code` stage: any experiment workspace's dvc.lock, and a workspace of the
pipeline test's small run).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dvc_overhead import lock_update_seconds, padded_lock  # noqa: E402 -- the same padding and rewrite


def first_iteration(text: str) -> str:
    """The lock ``text`` with only iteration 0000 of the per-iteration stages."""
    from dvc.utils.serialize._yaml import _dump, parse_yaml

    data = parse_yaml(text, "dvc.lock")
    data["stages"] = {k: v for k, v in data["stages"].items() if "@" not in k or k.endswith("@0000")}
    buf = io.StringIO()
    _dump(data, buf)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a dvc.lock of the old layout")
    ap.add_argument("--after", type=Path, required=True, help="a dvc.lock of the new layout")
    ap.add_argument("--iterations", default="1,5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = {arm: first_iteration(path.read_text()) for arm, path in (("before", args.before), ("after", args.after))}
    print(f"{'iterations':>10} | {'before KB':>9} | {'after KB':>8} | {'before s':>8} | {'after s':>7} | ratio")
    for n in [int(x) for x in args.iterations.split(",")]:
        locks = {arm: padded_lock(text, n) for arm, text in base.items()}
        times = {arm: [] for arm in locks}
        for _ in range(args.repeats):
            for arm in locks:
                times[arm].append(lock_update_seconds(locks[arm]))
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"{n:>10} | {len(locks['before']) / 1024:9.0f} | {len(locks['after']) / 1024:8.0f} | {b:8.3f} | {a:7.3f} | "
              f"{b / a:.2f}x")
    print("seconds: one rewrite, paid after every stage DVC runs (7 per iteration)")


if __name__ == "__main__":
    main()
