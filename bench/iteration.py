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


def _unwrap(work: Path) -> None:
    """dvc.yaml's commands as the project has them (no stage_timer wrapper): the stage-host arms."""
    shutil.copy2(ROOT / "dvc.yaml", work / "dvc.yaml")


def _outputs_digest(work: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for top in ("data/iter-0000", "models/policy-0001"):
        for path in sorted((work / top).rglob("*")):
            if path.is_file() and "/metrics/" not in path.as_posix() and not path.name.startswith("."):
                h.update(path.relative_to(work).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def _host_arms(work: Path, dvc: str, repeats: int, log) -> dict:
    """Iteration 0000's stages, each forced (`dvc repro -s -f`), once with every stage its own process and
    once through a warm stage host (as `tcrlsd iterate` runs them), alternating ``repeats`` times;
    per stage and arm the median wall seconds, and whether both arms wrote the same bytes."""
    from tcrlsd.stagehost import stage_host

    walls = {arm: {s: [] for s in STAGES} for arm in ("process", "host")}
    digests = {"process": set(), "host": set()}
    for rep in range(repeats):
        for arm in (("process", "host") if rep % 2 == 0 else ("host", "process")):
            with stage_host(dict(os.environ), cwd=work, enabled=arm == "host") as env:
                for stage in STAGES:
                    t0 = time.perf_counter()
                    proc = subprocess.run([dvc, "repro", "-s", "-f", f"{stage}@0000"], cwd=work, env=env,
                                          capture_output=True, text=True)
                    walls[arm][stage].append(time.perf_counter() - t0)
                    log.write(proc.stdout + proc.stderr)
                    if proc.returncode != 0:
                        raise SystemExit(f"{arm}: dvc repro -s -f {stage}@0000 failed:\n{proc.stderr[-3000:]}")
            digests[arm].add(_outputs_digest(work))
            print(f"  stage-host bench, repeat {rep + 1}/{repeats}, {arm}: "
                  f"{sum(w[-1] for w in walls[arm].values()):.1f} s", flush=True)
    return {"walls": {arm: {s: statistics.median(v) for s, v in by.items()} for arm, by in walls.items()},
            "same_bytes": len(digests["process"] | digests["host"]) == 1}


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

    rows = []
    for stage in STAGES:
        r = by_stage[stage]
        io = _parquet_io(work, stage)
        own = max(r["main_s"] - io, 0.0)
        rows.append({"stage": stage, "dvc": walls[stage], "dvc_overhead": walls[stage] - r["process_s"],
                     "start_imports": r["process_s"] - r["main_s"], "parquet_io": io, "own": own})
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
        print(f"\nthe same stages again, each forced: own processes vs a warm stage host (tcrlsd/stagehost.py, "
              f"what tcrlsd iterate uses), alternating, {args.host_repeats} repeat(s)", flush=True)
        _unwrap(work)
        with open(work / "bench.log", "a") as log:
            host = _host_arms(work, dvc, args.host_repeats, log)
        w = host["walls"]
        print(f"{'stage':<11}{'processes':>10}{'host':>8}{'ratio':>8}")
        for stage in STAGES:
            print(f"{stage:<11}{w['process'][stage]:>10.2f}{w['host'][stage]:>8.2f}"
                  f"{w['process'][stage] / w['host'][stage]:>7.2f}x")
        tp, th = sum(w["process"].values()), sum(w["host"].values())
        print(f"{'total':<11}{tp:>10.2f}{th:>8.2f}{tp / th:>7.2f}x   same output bytes in both arms: "
              f"{host['same_bytes']}")
        own_all = tot["own"] + tot["parquet_io"]
        print(f"fixed overhead per iteration through the host (its wall - the stages' main() above): "
              f"{th - own_all:.1f} s (processes: {tp - own_all:.1f} s; aim <= 10 s)")
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
        hw = sum(host["walls"]["host"][s] for s in GRPO_EQUIVALENT)
        without = hw - host["walls"]["host"]["score"]
        print(f"the same stages through dvc repro and the warm stage host (all overhead): {hw:.2f} s -> ratio "
              f"{hw / trl_s:.2f}x TRL; without the score stage (its teacher forward, which a GRPO step does not "
              f"run; the student log-probs come from the sampler): {without:.2f} s -> {without / trl_s:.2f}x")

if __name__ == "__main__":
    main()
