"""Benchmark: one training iteration through `dvc repro`, stage by stage, against TRL's GRPOTrainer step.

    pip install -e ".[bench]"      # TRL, for the comparison row
    python bench/iteration.py [--prompts 32] [--samples 8] [--max-new-tokens 96] [--threads 2]
                              [--warmstart-steps 300] [--workdir DIR] [--no-trl]

In a temporary copy of the project (default params, except a shorter warm start), prepare and
warmstart run first (not timed); then each stage of iteration 0000 runs with `dvc repro -s
<stage>@0000`, its command wrapped by bench/stage_timer.py. Per stage:

- dvc: wall time of the `dvc repro -s` call;
- dvc overhead: dvc minus the stage process's age (DVC start-up, hashing, lock file, caching outputs);
- start+imports: the stage process's age minus its main() (interpreter start-up, torch/transformers/
  pyarrow (and deepspeed) imports, the stage module);
- parquet I/O: reading the stage's input artifacts and writing its outputs once more, timed apart;
- own work: main() minus parquet I/O.

TRL row (bench/trl_step.py, in its own process): the same workload (the prompts the generate stage
picked, the same samples, token limit, warm-started policy, math-verify grader as reward, lr, and the
update's schedule: one optimizer step per mini-batch of prompts, with the old log-probs forward the
score stage also runs) through ``trl.GRPOTrainer`` in fp32 without gradient checkpointing (TRL 1.x
defaults to bf16 autocast and checkpointing; the update stage does neither on CPU); the second
generation cycle is timed, at 1 torch thread and at --threads, and the faster is TRL at its best.
Ratios compare it with the sum of the stages that do the same work (generate, verify, score,
advantages, update; critique and evaluate have no counterpart in a GRPO step, and score computes a
teacher pass TRL does not).

Last, the fixed per-iteration overhead here and an estimate at the GPU preset's scale (DVC hashes
and copies every output into its cache: the 3B policy and its optimizer state dominate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: artifact_digests

ROOT = Path(__file__).resolve().parents[1]
COPY = [".dvcignore", "dvc.yaml", "params.yaml", "iterations.yaml", "stages", "configs", "data/raw", "tcrlsd",
        "bench/stage_timer.py"]
STAGES = ("generate", "verify", "critique", "score", "advantages", "update", "evaluate")
GRPO_EQUIVALENT = ("generate", "verify", "score", "advantages", "update")
# stage -> (input artifacts, output artifacts), paths relative to the workspace
IO = {
    "generate": ([("data/prompts.parquet", "prompts")], [("data/iter-0000/rollouts", "rollouts")]),
    "verify": ([("data/prompts.parquet", "prompts"), ("data/iter-0000/rollouts", "rollouts")],
               [("data/iter-0000/verdicts.parquet", "verdicts")]),
    "critique": ([("data/prompts.parquet", "prompts"), ("data/iter-0000/rollouts", "rollouts"),
                  ("data/iter-0000/verdicts.parquet", "verdicts")], [("data/iter-0000/critiques", "critiques")]),
    "score": ([("data/iter-0000/rollouts", "rollouts"), ("data/iter-0000/critiques", "critiques")],
              [("data/iter-0000/scores", "scores")]),
    "advantages": ([("data/iter-0000/rollouts", "rollouts"), ("data/iter-0000/verdicts.parquet", "verdicts"),
                    ("data/iter-0000/scores", "scores"), ("data/iter-0000/critiques", "critiques")],
                   [("data/iter-0000/advantages.parquet", "advantages")]),
    "update": ([("data/iter-0000/rollouts", "rollouts"), ("data/iter-0000/scores", "scores"),
                ("data/iter-0000/advantages.parquet", "advantages")], []),
    "evaluate": ([("data/prompts.parquet", "prompts")], [("data/iter-0000/evaluations", "evaluations")]),
}
# DVC's cost per GB of output (FACTS.md, 2 cores): hashing ~1.8 s, copying into the cache 1-3 s.
DVC_S_PER_GB = 1.8 + 2.0


def _run(cmd, cwd, log=None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if log is not None:
        log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def _workspace(work: Path, args) -> None:
    for rel in COPY:
        src, dst = ROOT / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    from tcrlsd.loop.iterations import truncate_iterations

    truncate_iterations(work / "iterations.yaml", 1)  # this checkout's own `tcrlsd iterate` may have appended more
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["warmstart"].update({"steps": args.warmstart_steps, "warmup_steps": min(100, args.warmstart_steps // 5)})
    params["generate"].update({"prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
                               "num_threads": args.threads})
    params["generate"]["sampling"]["max_new_tokens"] = args.max_new_tokens
    params["evaluate"]["num_threads"] = args.threads
    params["update"]["num_threads"] = args.threads
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = work / "bench-stages.jsonl"
    text = (work / "dvc.yaml").read_text()
    text = text.replace("python stages/", f"python bench/stage_timer.py {log} stages/")
    text = text.replace("update_launcher: python", f"update_launcher: python bench/stage_timer.py {log}")
    (work / "dvc.yaml").write_text(text)


def _outputs_digest(work: Path) -> str:
    """One digest of everything the workspace's stages wrote (bench/artifact_digests.py's per-file
    digests, metrics' timings left out)."""
    import hashlib

    from artifact_digests import digests

    return hashlib.sha256(json.dumps(digests(work, keep_timings=False), sort_keys=True).encode()).hexdigest()


def _cells(m: dict, io_s: float) -> dict:
    """One stage's split of its ``dvc repro`` wall time (``m``: dvc, process_s, main_s; ``io_s``: its
    Parquet I/O): DVC's overhead, process start-up + imports, and its own work (main() minus I/O)."""
    return {"dvc": m["dvc"], "ovh": m["dvc"] - m["process_s"], "imp": m["process_s"] - m["main_s"],
            "own": max(m["main_s"] - io_s, 0.0)}


def _clear_outputs(work: Path, stage: str) -> None:
    """Delete what the stage writes: generate, score and evaluate resume from parts already written
    (and their outputs persist), so a forced rerun over them would do no work."""
    paths = [work / rel for rel, _ in IO[stage][1]]
    if stage == "update":
        paths += [work / "models/policy-0001", work / "models/policy-0001-state"]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _host_arms(work: Path, dvc: str, repeats: int, log) -> dict:
    """Iteration 0000's stages, each rerun from scratch (outputs deleted, `dvc repro -s -f
    --no-run-cache`, commands wrapped by bench/stage_timer.py as above), once with every stage its own
    process and once through a warm stage host (as `tcrlsd iterate` runs them: the host runs the timer,
    which runs the stage; the host's one-time import, before the first stage, is timed apart),
    alternating ``repeats`` times. Per arm and stage: the medians of the dvc wall and of the timer's
    process and main() seconds; whether both arms wrote the same bytes."""
    from tcrlsd.stagehost import stage_host

    keys = ("dvc", "process_s", "main_s")
    got = {arm: {s: {k: [] for k in keys} for s in STAGES} for arm in ("process", "host")}
    digests = {"process": set(), "host": set()}
    preload = []
    records = work / "bench-stages.jsonl"
    for rep in range(repeats):
        for arm in (("process", "host") if rep % 2 == 0 else ("host", "process")):
            host_log = work / f"stage-host-{rep}.log"
            t0 = time.perf_counter()
            with stage_host(dict(os.environ), log_path=host_log, cwd=work, enabled=arm == "host") as env:
                if arm == "host":  # wait for its imports: paid once per `tcrlsd iterate`, not per iteration
                    while "serving on" not in (host_log.read_text() if host_log.exists() else ""):
                        time.sleep(0.05)
                    preload.append(time.perf_counter() - t0)
                for stage in STAGES:
                    _clear_outputs(work, stage)
                    records.unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    proc = subprocess.run([dvc, "repro", "-s", "-f", "--no-run-cache", f"{stage}@0000"], cwd=work,
                                          env=env, capture_output=True, text=True)
                    wall = time.perf_counter() - t0
                    log.write(proc.stdout + proc.stderr)
                    if proc.returncode != 0:
                        raise SystemExit(f"{arm}: dvc repro -s -f {stage}@0000 failed:\n{proc.stderr[-3000:]}")
                    rec = json.loads(records.read_text().splitlines()[-1])
                    for k, v in (("dvc", wall), ("process_s", rec["process_s"]), ("main_s", rec["main_s"])):
                        got[arm][stage][k].append(v)
            if arm == "host" and "refused" in host_log.read_text():
                raise SystemExit(f"the stage host refused a stage (see {host_log}): the arm did not measure it")
            digests[arm].add(_outputs_digest(work))
            print(f"  stage-host bench, repeat {rep + 1}/{repeats}, {arm}: "
                  f"{sum(v['dvc'][-1] for v in got[arm].values()):.1f} s", flush=True)
    med = {arm: {s: {k: statistics.median(v) for k, v in by.items()} for s, by in stages.items()}
           for arm, stages in got.items()}
    return {"stages": med, "same_bytes": len(digests["process"] | digests["host"]) == 1,
            "preload": statistics.median(preload)}


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _parquet_io(work: Path, stage: str) -> float:
    """Seconds to read the stage's input artifacts and write its outputs (validated, like the stage)."""
    from tcrlsd.artifacts import read_artifact, write_table

    ins, outs = IO[stage]
    took = 0.0
    t0 = time.perf_counter()
    for rel, name in ins:
        read_artifact(work / rel, name)
    took += time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        for rel, name in outs:
            table = read_artifact(work / rel, name)  # not timed: the stage has it in memory
            t0 = time.perf_counter()
            write_table(table, Path(tmp) / f"{name}.parquet", name)
            took += time.perf_counter() - t0
    return took


def _trl_cycles(work: Path, args) -> list[dict]:
    """bench/trl_step.py in a fresh process per thread count (1 and the stages' --threads): TRL at its
    best is the faster (a busy 2-core machine makes 2 OpenMP threads spin; see trl_step.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = []
    for threads in sorted({1, args.threads or 1}):
        proc = subprocess.run([sys.executable, str(ROOT / "bench/trl_step.py"), "--workdir", str(work),
                               "--threads", str(threads)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            if "No module named 'trl'" in proc.stderr or "No module named 'datasets'" in proc.stderr:
                raise ImportError(proc.stderr.strip().splitlines()[-1])
            raise SystemExit(f"bench/trl_step.py --threads {threads} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every stage and of TRL")
    ap.add_argument("--warmstart-steps", type=int, default=300)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspace here (default: a temp dir)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    ap.add_argument("--host-repeats", type=int, default=2,
                    help="repeats of the stage-host comparison (each: the iteration's stages in own processes and "
                         "through the warm stage host); 0 skips it")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tcrlsd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    _workspace(work, args)
    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    with open(work / "bench.log", "w") as log:
        _run([dvc, "init", "--no-scm", "-q"], work, log)
        _run([dvc, "config", "core.analytics", "false"], work, log)
        print(f"workspace {work}: prepare + warmstart ({args.warmstart_steps} steps), not timed", flush=True)
        _run([dvc, "repro", "warmstart"], work, log)
        (work / "bench-stages.jsonl").unlink(missing_ok=True)
        walls = {}
        for stage in STAGES:
            walls[stage] = _run([dvc, "repro", "-s", f"{stage}@0000"], work, log)
            print(f"  {stage}: {walls[stage]:.1f} s", flush=True)
    records = [json.loads(line) for line in (work / "bench-stages.jsonl").read_text().splitlines()]
    by_stage = {Path(r["script"]).stem: r for r in records}
    python_start = statistics.median(_run([sys.executable, "-c", "pass"], work) for _ in range(3))

    io = {stage: _parquet_io(work, stage) for stage in STAGES}
    rows = []
    for stage in STAGES:
        c = _cells({**by_stage[stage], "dvc": walls[stage]}, io[stage])
        rows.append({"stage": stage, "dvc": c["dvc"], "dvc_overhead": c["ovh"], "start_imports": c["imp"],
                     "parquet_io": io[stage], "own": c["own"]})
    print()
    print(f"one iteration: {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.threads} torch threads (python start-up alone: {python_start:.2f} s)")
    print(f"{'stage':<11}{'dvc repro':>10}{'dvc ovh':>9}{'start+imp':>10}{'parquet':>9}{'own work':>10}{'outside':>9}")
    for r in rows:
        print(f"{r['stage']:<11}{r['dvc']:>10.2f}{r['dvc_overhead']:>9.2f}{r['start_imports']:>10.2f}"
              f"{r['parquet_io']:>9.2f}{r['own']:>10.2f}{1 - r['own'] / r['dvc']:>9.1%}")
    tot = {k: sum(r[k] for r in rows) for k in ("dvc", "dvc_overhead", "start_imports", "parquet_io", "own")}
    print(f"{'total':<11}{tot['dvc']:>10.2f}{tot['dvc_overhead']:>9.2f}{tot['start_imports']:>10.2f}"
          f"{tot['parquet_io']:>9.2f}{tot['own']:>10.2f}{1 - tot['own'] / tot['dvc']:>9.1%}")
    fixed = tot["dvc_overhead"] + tot["start_imports"]
    out_bytes = sum(_bytes(work / rel) for s in STAGES for rel, _ in IO[s][1])
    out_bytes += _bytes(work / "models/policy-0001") + _bytes(work / "models/policy-0001-state")
    print(f"\nfixed overhead per iteration (DVC + process start-up/imports): {fixed:.1f} s "
          f"({fixed / tot['dvc']:.0%} of {tot['dvc']:.1f} s); outputs cached by DVC: {out_bytes / 1e6:.1f} MB")
    # GPU preset: 3.2B parameters; policy bf16 (2 B/param) + optimizer state (fp32 master + 2 moments:
    # 12 B/param); rollouts/scores/advantages/critiques/evaluations ~0.5 GB at 8,192 x ~1,700 tokens.
    gpu_gb = 3.2 * 2 + 3.2 * 12 + 0.5
    print(f"at the GPU preset's scale: the same start-up/imports (~{tot['start_imports']:.0f} s, more with vLLM's "
          f"engine start) plus DVC hashing+caching of ~{gpu_gb:.0f} GB of outputs per iteration at "
          f"~{DVC_S_PER_GB:.1f} s/GB = ~{gpu_gb * DVC_S_PER_GB:.0f} s (cache.type hardlink/reflink removes the "
          f"copy: ~{gpu_gb * 1.8:.0f} s)")
    host = None
    if args.host_repeats > 0:
        print(f"\nthe same stages again, each rerun from scratch: own processes vs a warm stage host "
              f"(tcrlsd/stagehost.py, what tcrlsd iterate uses), alternating, {args.host_repeats} repeat(s), medians",
              flush=True)
        with open(work / "bench.log", "a") as log:
            host = _host_arms(work, dvc, args.host_repeats, log)
        print(f"{'stage':<11}{'arm':<9}{'dvc repro':>10}{'dvc ovh':>9}{'start+imp':>10}{'own work':>10}")
        sums = {arm: {"dvc": 0.0, "ovh": 0.0, "imp": 0.0, "own": 0.0} for arm in ("process", "host")}
        for stage in STAGES:
            for arm in ("process", "host"):
                cells = _cells(host["stages"][arm][stage], io[stage])
                for k, v in cells.items():
                    sums[arm][k] += v
                print(f"{stage:<11}{arm:<9}{cells['dvc']:>10.2f}{cells['ovh']:>9.2f}{cells['imp']:>10.2f}"
                      f"{cells['own']:>10.2f}")
        for arm in ("process", "host"):
            t = sums[arm]
            print(f"{'total':<11}{arm:<9}{t['dvc']:>10.2f}{t['ovh']:>9.2f}{t['imp']:>10.2f}{t['own']:>10.2f}   "
                  f"fixed overhead {t['ovh'] + t['imp']:.1f} s (aim <= 10 s)")
        tp, th = sums["process"]["dvc"], sums["host"]["dvc"]
        print(f"one iteration through dvc repro: {tp:.1f} s in own processes, {th:.1f} s through the host: "
              f"{tp / th:.2f}x; same output bytes in both arms: {host['same_bytes']}; the host's imports before "
              f"its first stage: {host['preload']:.1f} s (once per tcrlsd iterate / experiment run)")
    if args.no_trl:
        return
    try:
        runs = _trl_cycles(work, args)
    except ImportError as exc:
        print(f"\nTRL not installed ({exc}); pip install -e '.[bench]'")
        return
    print(f"\nTRL GRPOTrainer, same workload (one generation cycle = {runs[0]['optimizer_steps']} optimizer steps over "
          f"{runs[0]['completions']} completions; bench/trl_step.py):")
    for r in runs:
        print(f"  {r['threads']} torch thread(s): {r['cycle_s']:.2f} s wall ({r['cpu_s']:.2f} CPU s; generate "
              f"{r['generate_s']:.2f} s, reward {r['reward_s']:.2f} s)")
    best = min(runs, key=lambda r: r["cycle_s"])
    trl_s = best["cycle_s"]
    same = sum(r["own"] for r in rows if r["stage"] in GRPO_EQUIVALENT)
    same_wall = sum(r["dvc"] for r in rows if r["stage"] in GRPO_EQUIVALENT)
    print(f"TRL at its best ({best['threads']} thread(s)): {trl_s:.2f} s")
    print(f"stages' own work ({', '.join(GRPO_EQUIVALENT)}): {same:.2f} s -> ratio {same / trl_s:.2f}x TRL")
    print(f"the same stages through dvc repro (with all overhead): {same_wall:.2f} s -> ratio {same_wall / trl_s:.2f}x TRL")
    if host:
        h = {s: _cells(host["stages"]["host"][s], io[s]) for s in GRPO_EQUIVALENT}
        own = sum(c["own"] for c in h.values())
        no_score = own - h["score"]["own"]
        wall = sum(c["dvc"] for c in h.values())
        print(f"through the warm stage host: stages' own work {own:.2f} s -> {own / trl_s:.2f}x TRL (aim <= 1.5x); "
              f"without the score stage (the teacher forward a GRPO step does not run; the student log-probs come "
              f"from the sampler): {no_score:.2f} s -> {no_score / trl_s:.2f}x; with all overhead {wall:.2f} s -> "
              f"{wall / trl_s:.2f}x")


if __name__ == "__main__":
    main()
