"""Benchmark: graded rollouts/s, worker-process pool vs in-process sequential grading (same run).

    python bench/verify.py [--data data/raw/math500_test.jsonl] [--workers 2] [--repeats 2]

Rows: every MATH500 gold solution against its own answer (correct) plus a shuffled pairing
(almost all incorrect, and slower: no early match). Both modes grade the same rows with the same
timeouts and must return identical verdicts. Round 1 is cold for both (fresh antlr DFA caches;
the pool's time includes starting its workers, as the stage pays it); later rounds reuse the warm
process / pool. The pool's speed-up is bounded by the number of cores it actually gets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from tcrlsd.verify import GradeLimits, GradeRequest, GradingPool, grade_sequential


def _rows(path: Path) -> list[GradeRequest]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    perm = list(range(len(recs)))
    random.Random(0).shuffle(perm)
    own = [GradeRequest("math_verify", r["solution"], r["answer"]) for r in recs]
    wrong = [GradeRequest("math_verify", recs[j]["solution"], recs[i]["answer"])
             for i, j in enumerate(perm) if i != j]
    return own + wrong


def _cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU seconds of live processes (Linux /proc), to show how the work was split."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/raw/math500_test.jsonl", help="MATH500 JSONL (problem, solution, answer)")
    ap.add_argument("--workers", type=int, default=2, help="pool worker processes")
    ap.add_argument("--repeats", type=int, default=2, help="rounds (round 1 cold, later rounds warm)")
    ap.add_argument("--start-method", default="forkserver", choices=["forkserver", "fork", "spawn"])
    args = ap.parse_args(argv)

    path = Path(args.data)
    if not path.exists():
        print(f"bench/verify.py: {path}: no such file (pass --data)", file=sys.stderr)
        return 2
    rows = _rows(path)
    limits = GradeLimits(3, 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(rows)} rows ({path.name}: own solutions + shuffled pairs), {args.workers} workers "
          f"({args.start_method}), {cores} cores, timeouts parse/verify {limits.parse_timeout_s}/"
          f"{limits.verify_timeout_s} s")

    table = []
    with GradingPool(args.workers, limits, row_deadline_s=30.0, start_method=args.start_method) as pool:
        for rnd in range(1, args.repeats + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            seq = grade_sequential(rows, limits)
            t_seq, c_seq = time.perf_counter() - t0, time.process_time() - c0
            pids = [w.proc.pid for w in pool._workers if w is not None]
            w0, t0 = _cpu_seconds(pids), time.perf_counter()
            par = pool.grade(rows)
            t_par = time.perf_counter() - t0
            # Worker CPU, when the same workers served the whole round (none started or killed).
            same = pids and pids == [w.proc.pid for w in pool._workers if w is not None]
            w1 = _cpu_seconds(pids) if same else None
            c_par = (w1 - w0) if (w0 is not None and w1 is not None) else None
            if par != seq:
                bad = next(i for i, (a, b) in enumerate(zip(par, seq)) if a != b)
                print(f"MISMATCH at row {bad}: pool {par[bad]} vs sequential {seq[bad]}", file=sys.stderr)
                return 1
            label = "cold" if rnd == 1 else "warm"
            table.append((f"round {rnd} ({label})", "sequential (baseline)", t_seq, len(rows) / t_seq, 1.0, c_seq))
            table.append((f"round {rnd} ({label})", f"pool x{args.workers}", t_par, len(rows) / t_par, t_seq / t_par, c_par))
        kills = pool.stats["deadline_kills"]

    correct = sum(g.reward for g in seq)
    print(f"verdicts identical in both modes; {int(correct)} / {len(rows)} correct; deadline kills: {kills}\n")
    print(f"{'round':<16} {'mode':<22} {'seconds':>8} {'rows/s':>9} {'ratio':>7} {'CPU s':>7}")
    for rnd, mode, secs, rate, ratio, cpu in table:
        cpu_s = f"{cpu:7.2f}" if cpu is not None else f"{'-':>7}"
        print(f"{rnd:<16} {mode:<22} {secs:8.2f} {rate:9.1f} {ratio:6.2f}x {cpu_s}")
    print("\nCPU s: this process's CPU (sequential) or the workers' CPU summed (pool; '-' when workers were "
          "started during the round).\nratio = sequential seconds / pool seconds; it is bounded by the cores "
          "that are free: compare `uptime`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
