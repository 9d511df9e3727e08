"""Benchmark ``tcrlsd inspect`` on a synthetic iteration of ~8M response tokens.

    python bench/inspect_list.py [--rollouts 8192] [--group 8] [--mean-len 1000] [--parts 8] [--repeats 2]

(Not bench/inspect.py: run as a script, that name would shadow the standard library's `inspect`
module, which numpy imports.)

Measured in the same run, each in a fresh subprocess (interpreter start and imports included):

- naive:  what a script without the command does: read every artifact whole with pyarrow (all
          columns), join by rollout_id in Python, compute each row's Δ-gap, length and mean |Â|
          from the Python lists, print the first 50 rows.
- list:   ``python -m tcrlsd.cli inspect DIR`` (the first 50 rows), and with ``--sort delta
          --incorrect`` (a filter and a sort over every row), and ``--search`` (reads the texts).
- sample: ``--id ROLLOUT_ID`` (one row, every column), and ``--format html`` of the first page.

CPU seconds (user + sys of the child, all threads) are printed beside wall seconds: on a shared
machine the wall times move with the load, the CPU times much less. Ratios: naive / case, by wall
and by CPU time; the best of --repeats runs (by wall time) is kept.

The iteration is laid out like the stages write it: rollouts, critiques and scores as folders of
``part-NNNNN.parquet`` (zstd, row groups of 1,024 rows), verdicts and advantages as one file;
prompts in the parent folder. Half the rows (the wrong ones) have a critique and a teacher context.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tcrlsd.artifacts import ROW_GROUP_ROWS
from tcrlsd.schemas import schema_for

WRITE_OPTS = dict(compression="zstd", use_dictionary=False, write_statistics=False, row_group_size=ROW_GROUP_ROWS)
WORDS = np.array("the a step result so add multiply subtract 1 2 3 4 5 6 7 8 9 0 = + - * answer is boxed".split())

NAIVE = r"""
import sys, glob, os, pyarrow.parquet as pq
d = sys.argv[1]
def read(name):
    p = os.path.join(d, name)
    files = sorted(glob.glob(os.path.join(p, "part-*.parquet"))) if os.path.isdir(p) else [p + ".parquet"]
    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return {r["rollout_id"]: r for r in rows}
ro, ve, cr, sc, ad = (read(n) for n in ("rollouts", "verdicts", "critiques", "scores", "advantages"))
out = []
for rid, r in ro.items():
    s, a = sc[rid], ad[rid]
    n = len(r["response_token_ids"])
    gap = sum(q - p for p, q in zip(s["student_logprobs"], s["teacher_logprobs"])) / max(n, 1)
    adv = sum(abs(x) for x in a["advantages"]) / max(n, 1)
    out.append((rid, r["prompt_id"], ve[rid]["reward"], ve[rid]["reason"], cr[rid]["feedback_text"] is not None,
                gap, n, a["group_advantage"], adv))
for row in out[:50]:
    print(*row)
"""


def _write_parts(table: pa.Table, folder: Path, parts: int) -> None:
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i in range(parts):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), folder / f"part-{i:05d}.parquet", **WRITE_OPTS)


def make_iteration(root: Path, n: int, group: int, mean_len: int, parts: int, seed: int = 0) -> tuple[Path, int]:
    rng = np.random.default_rng(seed)
    it = root / "iter-0000"
    n_prompts = n // group
    pids = [f"synthetic/{i:06d}" for i in range(n_prompts)]
    prompts = pa.table({
        "prompt_id": pids, "split": ["train"] * n_prompts, "problem": [f"Start with {i % 97}. Add 3." for i in range(n_prompts)],
        "prompt": [f"Q: Start with {i % 97}. Add 3.\nA:" for i in range(n_prompts)], "answer": ["7"] * n_prompts,
        "solution": [None] * n_prompts, "source": ["synthetic"] * n_prompts,
        "level": pa.array([None] * n_prompts, pa.int32()), "subject": [None] * n_prompts,
    }, schema=schema_for("prompts"))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(prompts, root / "prompts.parquet", **WRITE_OPTS)

    lens = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total = int(offsets[-1])
    ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(3, 32000, total).astype(np.int32)))
    words = WORDS[rng.integers(0, len(WORDS), total)]
    texts = [" ".join(words[offsets[i]:offsets[i + 1]]) for i in range(n)]
    rid = [f"{pids[i // group]}#{i % group}" for i in range(n)]
    prompt_ids = pa.array([list(range(3, 103))] * n, pa.list_(pa.int32()))
    rollouts = pa.table({
        "rollout_id": rid, "prompt_id": [pids[i // group] for i in range(n)],
        "sample_idx": pa.array([i % group for i in range(n)], pa.int32()), "iteration": pa.array([0] * n, pa.int32()),
        "prompt_token_ids": prompt_ids, "response_token_ids": ids, "response_text": texts, "finish_reason": ["stop"] * n,
        "sampler_logprobs": pa.ListArray.from_arrays(offsets, pa.array(np.zeros(total, np.float32))),
        "sampler": pa.nulls(n, pa.string()),  # made here, not sampled
    }, schema=schema_for("rollouts"))
    _write_parts(rollouts, it / "rollouts", parts)

    correct = rng.random(n) < 0.5
    pq.write_table(pa.table({
        "rollout_id": rid, "reward": pa.array(correct.astype(np.float32)), "is_correct": correct,
        "extracted_answer": ["7"] * n, "reason": np.where(correct, "correct", "incorrect").tolist(),
        "verifier": ["math_verify"] * n,
    }, schema=schema_for("verdicts")), it / "verdicts.parquet", **WRITE_OPTS)

    fb = [None if c else "Step 2 is wrong: 4 + 3 is 7, not 8. " * 8 for c in correct]
    critiques = pa.table({
        "rollout_id": rid, "mode": ["critique"] * n, "critic": ["reference"] * n, "feedback_text": fb,
        "template": ["v1"] * n, "teacher_prompt": [None if f is None else "Q: Start with 4. Add 3.\nFeedback: " + f for f in fb],
        "error": [None] * n, "leaks_answer": rng.random(n) < 0.05, "suspected_false_negative": rng.random(n) < 0.02,
    }, schema=schema_for("critiques"))
    _write_parts(critiques, it / "critiques", parts)

    logp = -rng.exponential(1.0, total).astype(np.float32)
    row_of = np.repeat(np.arange(n), lens)
    delta = np.where(correct[row_of], 0.0, rng.normal(-0.3, 0.8, total)).astype(np.float32)
    scores = pa.table({
        "rollout_id": rid,
        "student_logprobs": pa.ListArray.from_arrays(offsets, pa.array(logp)),
        "teacher_logprobs": pa.ListArray.from_arrays(offsets, pa.array(logp + delta)),
        "teacher_checkpoint": ["models/policy-0000"] * n,
    }, schema=schema_for("scores"))
    _write_parts(scores, it / "scores", parts)

    A = np.where(correct, 1.0, -1.0).astype(np.float32)
    pq.write_table(pa.table({
        "rollout_id": rid, "group_advantage": pa.array(A),
        "advantages": pa.ListArray.from_arrays(offsets, pa.array(A[row_of] + 0.3 * delta)),
        "estimator": ["rlsd_add"] * n,
    }, schema=schema_for("advantages")), it / "advantages.parquet", **WRITE_OPTS)
    return it, total


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; its output is discarded, failure raises."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=8192)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mean-len", type=int, default=1000)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; the best wall time is kept")
    ap.add_argument("--keep", default=None, help="build the iteration in this folder and keep it")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    try:
        t0 = time.perf_counter()
        it, total = make_iteration(tmp / "data", args.rollouts, args.group, args.mean_len, args.parts)
        size = sum(f.stat().st_size for f in it.rglob("*.parquet"))
        print(f"iteration: {args.rollouts} rollouts, {total:,} response tokens, {size / 2**20:.0f} MiB Parquet "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        py, cli = sys.executable, [sys.executable, "-m", "tcrlsd.cli", "inspect", str(it)]
        out_html = tmp / "page.html"
        cases = [
            ("naive: pyarrow read all + Python", [py, "-c", NAIVE, str(it)]),
            ("inspect (list, first 50)", cli),
            ("inspect --incorrect --sort delta", cli + ["--incorrect", "--sort", "delta"]),
            ("inspect --search 'not 8'", cli + ["--search", "not 8"]),
            ("inspect --id (one sample)", cli + ["--id", f"synthetic/{args.rollouts // args.group // 2:06d}#3"]),
            ("inspect --format html (50 cards)", cli + ["--format", "html", "--out", str(out_html)]),
        ]
        results = []
        for name, cmd in cases:
            runs = [timed(cmd) for _ in range(args.repeats)]
            results.append((name, *min(runs)))
        base_wall, base_cpu = results[0][1], results[0][2]
        print(f"{'case':<36} {'wall s':>8} {'cpu s':>8} {'naive/case wall':>16} {'naive/case cpu':>15}")
        for name, wall, cpu in results:
            print(f"{name:<36} {wall:8.2f} {cpu:8.2f} {base_wall / wall:15.1f}x {base_cpu / cpu:14.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
