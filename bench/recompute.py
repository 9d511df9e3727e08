"""Benchmark ``tcrlsd recompute`` on a synthetic iteration of ~8M response tokens (and 4x that).

    python bench/recompute.py [--rollouts 8192] [--group 8] [--mean-len 1000] [--scales 1,4]
                              [--row-group-rows 256] [--loop-rows 256] [--repeats 2] [--estimator rlsd_hybrid]

Measured in the same run, each in a fresh subprocess (interpreter start and imports included), peak
memory from ``os.wait4``'s rusage of that one child:

- floor:     read the columns recompute reads (rollouts: rollout_id, prompt_id, iteration,
             response_token_ids; verdicts: rollout_id, reward; scores: rollout_id, student_logprobs,
             teacher_logprobs) whole with pyarrow and write a table of the output's columns and size
             (rollout_id, group_advantage, advantages, estimator) with the same write options.
- recompute: ``python -m tcrlsd.cli recompute DIR --estimator E --out FILE --json``.
- loop:      the per-row Python loop (``reference_token_advantages`` on to_pylist rows, output built
             from Python lists) timed on the first --loop-rows rows and extrapolated linearly by tokens,
             plus the floor's I/O time (a loop implementation has to read and write too). Only at 1x.
- compute only: the same loop vs the vectorised kernel (token_advantages on flat values + offsets)
             on those rows in memory, no I/O: the speed-up of the computation itself.

CPU seconds (user + sys of the child, all threads) are printed beside wall seconds: on a shared
machine the wall times move with the load; the CPU times much less.

The synthetic scores and rollouts are written with --row-group-rows rows per row group (several
row groups, as a sharded or streamed writer produces), zstd, like the stages write.
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

from tcrlsd.schemas import schema_for

WRITE_OPTS = dict(compression="zstd", use_dictionary=False, write_statistics=False)

FLOOR = r"""
import sys, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc
d, out = sys.argv[1], sys.argv[2]
r = pq.read_table(f"{d}/rollouts.parquet", columns=["rollout_id", "prompt_id", "iteration", "response_token_ids"])
v = pq.read_table(f"{d}/verdicts.parquet", columns=["rollout_id", "reward"])
s = pq.read_table(f"{d}/scores.parquet", columns=["rollout_id", "student_logprobs", "teacher_logprobs"])
n = s.num_rows
t = pa.table({"rollout_id": s.column("rollout_id"), "group_advantage": v.column("reward"),
              "advantages": s.column("student_logprobs"), "estimator": pa.array(["x"] * n)})
pq.write_table(t, out, compression="zstd", use_dictionary=False, write_statistics=False)
"""


def make_iteration(folder: Path, n_rollouts: int, group: int, mean_len: int, row_group_rows: int, seed: int = 0) -> int:
    """Write rollouts, verdicts, scores of one synthetic iteration; return the number of tokens."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w_r = pq.ParquetWriter(folder / "rollouts.parquet", schema_for("rollouts"), **WRITE_OPTS)
    w_s = pq.ParquetWriter(folder / "scores.parquet", schema_for("scores"), **WRITE_OPTS)
    rewards, ids_all, tokens = [], [], 0
    chunk = max(group, (row_group_rows // group) * group)
    for start in range(0, n_rollouts, chunk):
        n = min(chunk, n_rollouts - start)
        rows = np.arange(start, start + n)
        ids = [f"p{i // group:06d}#{i % group}" for i in rows]
        lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=n)  # (n,)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        total = int(lengths.sum())
        tokens += total
        resp = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 32000, total, dtype=np.int32)))
        w_r.write_table(pa.table({
            "rollout_id": ids, "prompt_id": [f"p{i // group:06d}" for i in rows],
            "sample_idx": pa.array(rows % group, pa.int32()), "iteration": pa.array(np.full(n, 3), pa.int32()),
            "prompt_token_ids": pa.array([[1, 2, 3, 4]] * n, pa.list_(pa.int32())), "response_token_ids": resp,
            "response_text": ["..."] * n, "finish_reason": ["stop"] * n,
            "sampler_logprobs": pa.ListArray.from_arrays(offsets, pa.array(np.zeros(total, np.float32))),
            "sampler": pa.nulls(n, pa.string()),  # made here, not sampled
        }, schema=schema_for("rollouts")))
        student = (-rng.exponential(1.5, total)).astype(np.float32)  # (T,)
        feedback = np.repeat(rng.random(n) < 0.5, lengths)  # (T,) half the rows have a teacher gap
        teacher = np.where(feedback, student + rng.normal(0, 0.5, total).astype(np.float32), student)
        w_s.write_table(pa.table({
            "rollout_id": ids,
            "student_logprobs": pa.ListArray.from_arrays(offsets, pa.array(student)),
            "teacher_logprobs": pa.ListArray.from_arrays(offsets, pa.array(teacher.astype(np.float32))),
            "teacher_checkpoint": ["policy"] * n,
        }, schema=schema_for("scores")))
        rewards.append((rng.random(n) < 0.4).astype(np.float32))
        ids_all += ids
    w_r.close()
    w_s.close()
    r = np.concatenate(rewards)
    pq.write_table(pa.table({
        "rollout_id": ids_all, "reward": r, "is_correct": r > 0, "extracted_answer": ["1"] * len(r),
        "reason": ["correct"] * len(r), "verifier": ["bench"] * len(r),
    }), folder / "verdicts.parquet", **WRITE_OPTS)
    return tokens


def run_child(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + sys, all threads), peak RSS MiB) of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def best(cmd: list[str], repeats: int) -> tuple[float, float, float]:
    """Fastest wall time, least CPU time and largest peak RSS over ``repeats`` runs."""
    runs = [run_child(cmd) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)


def compute_only(folder: Path, n_rows: int, estimator: str, repeats: int = 20) -> dict:
    """The computation alone, in this process, on the first n_rows score rows held in memory.

    loop:       to_pylist rows -> reference_token_advantages per row -> pa.array of the result
    vectorised: flat values + offsets -> token_advantages -> ListArray.from_arrays (best of ``repeats``)
    Both start from the same pyarrow batch and the same group advantages and end with a list<float32>.
    """
    from tcrlsd.advantages.inputs import flat_list
    from tcrlsd.advantages import (AdvantagesParams, group_advantages, reference_token_advantages,
                                   settings_for, token_advantages)

    pf = pq.ParquetFile(folder / "scores.parquet")
    head = next(pf.iter_batches(batch_size=n_rows, columns=["rollout_id", "student_logprobs", "teacher_logprobs"]))
    v = pq.read_table(folder / "verdicts.parquet", columns=["reward"])
    r = pq.read_table(folder / "rollouts.parquet", columns=["prompt_id"])
    group = np.unique(np.asarray(r.column("prompt_id").to_pylist()), return_inverse=True)[1]
    params = AdvantagesParams(estimator=estimator)
    s = settings_for(params, 3)
    adv = group_advantages(group, v.column("reward").to_numpy(), params.norm_by_std)[: head.num_rows]  # (B,)

    t0, c0 = time.perf_counter(), time.process_time()
    students = head.column("student_logprobs").to_pylist()
    teachers = head.column("teacher_logprobs").to_pylist()
    out = [reference_token_advantages(estimator, float(adv[i]), st, te, s)
           for i, (st, te) in enumerate(zip(students, teachers))]
    loop_list = pa.array(out, pa.list_(pa.float32()))
    loop = (time.perf_counter() - t0, time.process_time() - c0)

    vec = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        student, offsets = flat_list(head.column("student_logprobs"))
        teacher, _ = flat_list(head.column("teacher_logprobs"))
        values = token_advantages(estimator, adv, offsets, student, teacher, s)
        vec_list = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        vec = (min(vec[0], time.perf_counter() - t0), min(vec[1], time.process_time() - c0))
    np.testing.assert_allclose(vec_list.values.to_numpy(), loop_list.values.to_numpy(), rtol=1e-5, atol=1e-5)
    return {"rows": head.num_rows, "tokens": len(student), "loop": loop, "vec": vec}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=8192)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mean-len", type=int, default=1000)
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--row-group-rows", type=int, default=256)
    ap.add_argument("--loop-rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--estimator", default="rlsd_hybrid")
    ap.add_argument("--tmp", default=None, help="parent folder for the synthetic data (default: system temp)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-recompute-", dir=args.tmp))
    results, co = [], None
    try:
        for scale in (int(x) for x in args.scales.split(",")):
            folder = root / f"x{scale}" / "iter-0003"
            t0 = time.perf_counter()
            tokens = make_iteration(folder, args.rollouts * scale, args.group, args.mean_len, args.row_group_rows)
            gen = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            print(f"x{scale}: {args.rollouts * scale} rollouts, {tokens / 1e6:.1f}M tokens, inputs {size:.0f} MiB "
                  f"on disk (generated in {gen:.1f} s)", file=sys.stderr)
            out = root / f"x{scale}" / "out.parquet"
            floor = best([sys.executable, "-c", FLOOR, str(folder), str(out)], args.repeats)
            cand = best([sys.executable, "-m", "tcrlsd.cli", "recompute", str(folder), "--estimator", args.estimator,
                         "--out", str(out), "--json"], args.repeats)
            loop = None
            if scale == 1:
                co = compute_only(folder, args.loop_rows, args.estimator)
                k = tokens / co["tokens"]
                loop = co["loop"][0] * k + floor[0], co["loop"][1] * k + floor[1], co["tokens"]
            results.append((scale, tokens, size, floor, cand, loop))
            shutil.rmtree(root / f"x{scale}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nrecompute --estimator {args.estimator}; rows per input row group {args.row_group_rows}; "
          f"best of {args.repeats} wall times, each a fresh process; RSS = peak resident memory\n")
    head = (f"{'data':>5} {'tokens':>7} | {'floor':>6} {'recompute':>9} {'ratio':>6} {'loop':>7} {'loop/rec':>8} | "
            f"{'floor':>6} {'recompute':>9} {'ratio':>6} {'loop':>7} {'loop/rec':>8} | {'floor':>7} {'recompute':>9}")
    print(f"{'':14}| {'wall seconds':<48}| {'CPU seconds (user + sys)':<48}| peak RSS MiB")
    print(head)
    print("-" * len(head))
    for scale, tokens, _, floor, cand, loop in results:
        cells = [f"{scale:>4}x {tokens / 1e6:6.1f}M"]
        for k in (0, 1):
            lp = f"{loop[k]:7.1f} {loop[k] / cand[k]:7.1f}x" if loop else f"{'-':>7} {'-':>8}"
            cells.append(f"{floor[k]:6.2f} {cand[k]:9.2f} {cand[k] / floor[k]:5.2f}x {lp}")
        cells.append(f"{floor[2]:7.0f} {cand[2]:9.0f}")
        print(" | ".join(cells))
    if co is not None:
        print(f"\nloop: per-row Python loop timed on the first {args.loop_rows} rows "
              f"({co['tokens']} tokens), extrapolated linearly to all tokens, plus the floor's I/O time")
        print(f"\ncompute only (in process, first {co['rows']} rows = {co['tokens']} tokens in memory, "
              "no I/O; vectorised best of 20):")
        print(f"{'':12} {'wall ms':>9} {'CPU ms':>9}")
        print(f"{'loop':12} {co['loop'][0] * 1e3:9.1f} {co['loop'][1] * 1e3:9.1f}")
        print(f"{'vectorised':12} {co['vec'][0] * 1e3:9.1f} {co['vec'][1] * 1e3:9.1f}")
        print(f"{'ratio':12} {co['loop'][0] / co['vec'][0]:8.0f}x {co['loop'][1] / co['vec'][1]:8.0f}x")
    if len(results) > 1:
        (_, t0_, _, f0, c0, _), (_, t1, _, f1, c1, _) = results[0], results[-1]
        print(f"data x{t1 / t0_:.2f} -> recompute peak RSS x{c1[2] / c0[2]:.2f} (floor, which reads whole "
              f"tables: x{f1[2] / f0[2]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
