"""Where a stage's time goes: start-up + imports vs its own work.

Two modes.

``python bench/stage_timer.py LOG.jsonl stages/generate.py --params ...`` (used by bench/iteration.py)
runs one stage script in-process (pandas hidden, as in the stage's own process) and appends one JSON
line to LOG: seconds spent importing the heavy libraries that stage imports (``heavy_for``: pyarrow
and numpy; torch and transformers where a model is loaded; deepspeed for the update), seconds
in the stage's ``main()``, and this process's total wall time from interpreter start. Imports done
first are then free for the stage, so ``main`` is the stage's own work plus its Parquet I/O.

``python bench/stage_timer.py --tiny [--baseline REF] [--repeats N] [--stages a,b]`` (issue 23, item 1)
builds a tiny iteration in a temporary folder (tests/harness.py: the tiny random policy, 16 rollouts,
reference critic), then starts every per-iteration stage as DVC does -- ``python stages/<name>.py``,
a fresh interpreter -- and prints per stage: ``start+import`` (a process that only imports the stage
script: interpreter start-up + module-level imports), ``total`` (the whole process) and ``main``
(the difference: the stage's own work plus what it imports lazily), and the watched libraries the
stage's processes imported (tests/import_watch.py). With ``--baseline REF`` the same is measured, interleaved
stage by stage, on a ``git worktree`` of REF (say ``main``); the table adds baseline/candidate ratios
and whether the two trees wrote the same bytes (every Parquet and safetensors file of the stage).
Medians over ``--repeats`` runs. The machine's load average is printed with the table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] != "--tiny":
    # bench/iteration.py's stage-host arm: a warm stage host (tcrlsd/stagehost.py) runs this timer, and
    # the stage inside it, in a forked child; without TCRLSD_STAGE_HOST this does nothing
    from tcrlsd.stagehost import hand_off

    hand_off()
TINY_STAGES = ("generate", "verify", "critique", "score", "advantages", "update", "evaluate", "summarize")
# bench-only sizes over the harness's params: the update and evaluate sections the harness lacks
TINY_EXTRA = {"update": {"num_threads": 1, "mini_batch_prompts": 4, "device": "cpu", "zero_stage": 2},
              "evaluate": {"max_prompts": 4, "samples": 1, "num_parts": 1, "num_threads": 1,
                           "sampling": {"max_new_tokens": 12}},
              "tracking": {"dvclive": True}}


MODEL_STAGES = ("generate", "score", "update", "evaluate")


def heavy_for(script: str, args: list[str]) -> list[str]:
    """The heavy libraries the stage ``script`` itself imports when run with ``args``: pyarrow and numpy
    for all; torch and transformers for the stages that load a model (critique only with a model
    critic); deepspeed for the update. Pre-importing more would charge a model-free stage for imports
    it never does."""
    name = Path(script).stem
    libs = ["pyarrow.parquet", "numpy"]
    model = name in MODEL_STAGES
    if name == "critique" and "--params" in args:
        import yaml

        section = (yaml.safe_load(Path(args[args.index("--params") + 1]).read_text()) or {}).get("critique") or {}
        model = section.get("critic") in ("transformers", "vllm")
    if model:
        libs += ["torch", "transformers"]
    if name == "update":
        libs.append("deepspeed")
    return libs


def record(log: str, script: str, args: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    try:
        from tcrlsd.startup import hide_pandas
    except ImportError:  # a tree from before stage processes hid pandas (a --baseline of the benches)
        hide_pandas = None
    if hide_pandas is not None and os.environ.get("TCRLSD_STAGE_PANDAS", "") != "1":
        hide_pandas()  # as stagecli.process_main does in the stage's own process
    t0 = time.perf_counter()
    for name in heavy_for(script, args):
        importlib.import_module(name)
    t_import = time.perf_counter() - t0
    namespace = runpy.run_path(script, run_name="bench_stage")  # defines main() without running it
    t_module = time.perf_counter() - t0 - t_import
    t1 = time.perf_counter()
    code = namespace["main"](args)
    t_main = time.perf_counter() - t1
    try:
        import psutil  # noqa: F401 -- optional: process age = interpreter start-up included

        started = psutil.Process(os.getpid()).create_time()
        total = time.time() - started
    except ImportError:
        total = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(json.dumps({"script": script, "imports_s": t_import, "module_s": t_module, "main_s": t_main,
                             "process_s": total, "code": code}) + "\n")
    return int(code or 0)


# ----------------------------------------------------------------------------- --tiny: every stage as a process


def _build(d: Path) -> tuple[Path, Path, Path]:
    """The tiny iteration (prepare .. advantages, run in this process) and its params file."""
    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "bench"))
    from artifact_digests import merge_params as _merge

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import tiny_policy
    from harness import PARAMS, build_iteration

    torch.set_num_threads(1)
    params = _merge(_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), PARAMS), TINY_EXTRA)
    d.mkdir(parents=True)
    params["tracking"]["dir"] = str(d / "dvclive")
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    policy = tiny_policy(d / "policy")
    it = build_iteration(d / "it", policy, path)
    metrics = d / "metrics" / "iter-0000"  # summarize's layout
    metrics.mkdir(parents=True)
    for f in (it / "metrics").glob("*.json"):
        shutil.copy(f, metrics / f.name)
    return it, policy, path


def _argv(stage: str, it: Path, policy: Path, params: Path, out: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import stage_argv

    p = ["--params", str(params)]
    if stage == "update":
        return p + ["--rollouts", str(it / "rollouts"), "--scores", str(it / "scores"),
                    "--advantages", str(it / "advantages.parquet"), "--policy", str(policy),
                    "--state-in", str(out / "none-state"), "--policy-out", str(out / "next"),
                    "--state-out", str(out / "next-state"), "--metrics", str(out / "update.json")]
    if stage == "evaluate":
        return p + ["--prompts", str(it / "prompts.parquet"), "--policy", str(policy), "--out", str(out / "ev"),
                    "--metrics", str(out / "evaluate.json"), "--no-progress"]
    if stage == "summarize":
        return ["--metrics-dir", str(it.parent / "metrics"), "--table", str(out / "t.csv"),
                "--headline", str(out / "h.json"), "--params", str(params)]
    return stage_argv(stage, out, it, policy, params)  # output named as in the iteration folder


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} in {cwd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def _measure(tree: Path, stage: str, argv: list[str], scratch: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from import_watch import imported, watch_env

    base = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = f"stages/{stage}.py"
    only_import = (f"import runpy, sys; sys.path.insert(0, 'stages'); sys.argv = [{script!r}]; "
                   f"runpy.run_path({script!r}, run_name='stage_timer_import')")
    start = _timed([sys.executable, "-c", only_import], tree, base)
    log = scratch / "imports.log"
    log.unlink(missing_ok=True)
    total = _timed([sys.executable, script, *argv], tree, watch_env(scratch / "site", log, base))
    return {"start": start, "total": total, "libs": sorted(imported(log) & {"torch", "transformers", "deepspeed",
                                                                           "pandas", "polars"}),
            "digests": _digests(scratch)}


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every Parquet and safetensors file the run wrote (relative path -> digest)."""
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for pattern in ("*.parquet", "*.safetensors") for f in sorted(folder.rglob(pattern))}


def tiny(args) -> int:
    stages = args.stages.split(",") if args.stages else list(TINY_STAGES)
    with tempfile.TemporaryDirectory(prefix="stage-timer-") as tmp:
        tmp = Path(tmp)
        it, policy, params = _build(tmp / "build")
        trees = {"candidate": ROOT}
        if args.baseline:
            trees = {"baseline": tmp / "baseline", **trees}
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees["baseline"]), args.baseline],
                           cwd=ROOT, check=True)
        try:
            runs: dict[tuple[str, str], list[dict]] = {}
            load = os.getloadavg()
            for _ in range(args.repeats):
                for stage in stages:
                    for name, tree in trees.items():
                        scratch = tmp / "run" / name / stage
                        shutil.rmtree(scratch, ignore_errors=True)
                        scratch.mkdir(parents=True)
                        argv = _argv(stage, it, policy, params, scratch)
                        runs.setdefault((name, stage), []).append(_measure(tree, stage, argv, scratch))
            load_after = os.getloadavg()
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT, check=False)
    _table(stages, trees, runs, args)
    print(f"load average before {load[0]:.2f} / after {load_after[0]:.2f} (1 min); "
          f"{os.cpu_count()} CPUs; medians of {args.repeats}")
    return 0


def _table(stages, trees, runs, args) -> None:
    def med(name, stage, key):
        return statistics.median(r[key] for r in runs[(name, stage)])

    head = f"{'stage':<11}"
    for name in trees:
        head += f" | {name + ' start+import':>24} {'main':>6} {'total':>6}"
    if args.baseline:
        head += " | ratio start+import  total"
    print(head)
    sums = {(n, k): 0.0 for n in trees for k in ("start", "total")}
    for stage in stages:
        line = f"{stage:<11}"
        for name in trees:
            s, t = med(name, stage, "start"), med(name, stage, "total")
            sums[(name, "start")] += s
            sums[(name, "total")] += t
            line += f" | {s:24.2f} {t - s:6.2f} {t:6.2f}"
        if args.baseline:
            line += (f" | {med('baseline', stage, 'start') / med('candidate', stage, 'start'):18.2f}x"
                     f" {med('baseline', stage, 'total') / med('candidate', stage, 'total'):5.2f}x")
        print(line)
    line = f"{'all':<11}"
    for name in trees:
        line += f" | {sums[(name, 'start')]:24.2f} {sums[(name, 'total')] - sums[(name, 'start')]:6.2f} " \
                f"{sums[(name, 'total')]:6.2f}"
    if args.baseline:
        line += (f" | {sums[('baseline', 'start')] / sums[('candidate', 'start')]:18.2f}x"
                 f" {sums[('baseline', 'total')] / sums[('candidate', 'total')]:5.2f}x")
    print(line)
    print("libraries each stage's processes imported (of torch, transformers, deepspeed, pandas, polars)"
          + ("; output bytes (Parquet, safetensors) baseline vs candidate:" if args.baseline else ":"))
    for stage in stages:
        line = f"  {stage:<11} " + "; ".join(f"{name}: {','.join(runs[(name, stage)][0]['libs']) or '-'}"
                                            for name in trees)
        if args.baseline:
            base, cand = runs[("baseline", stage)][0]["digests"], runs[("candidate", stage)][0]["digests"]
            line += f"; {len(cand)} files " + ("identical" if base == cand else "DIFFER")
        print(line)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--tiny":
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--tiny", action="store_true")
        ap.add_argument("--baseline", default=None, help="git ref measured beside this tree (a temporary worktree)")
        ap.add_argument("--repeats", type=int, default=1)
        ap.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(TINY_STAGES))
        return tiny(ap.parse_args())
    log, script, *args = sys.argv[1:]
    return record(log, script, args)


if __name__ == "__main__":
    sys.exit(main())
