"""The final table of an experiment on a held-out split read by nothing else (issue 20 item 5).

val is the dev set: every per-iteration curve, the lr and λ choices, the warm start's choice. The
``test`` split of the prompts file (prepare draws it like val, sharing no problem with train or val)
is evaluated once per run, on the run's LAST policy, after its ``dvc repro``: the evaluate stage
with ``evaluate.split: test`` into ``data/final-test/evaluations`` and
``data/metrics/final-test.json`` of the workspace (resumable like every evaluation). The report's
section gives per preset the mean ± std over seeds and each preset minus grpo paired by seed, with
the verdict from Student's t (never from the means alone).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tcrlsd.loop.controls import controls_lines
from tcrlsd.loop.results import T_CRIT_95, Run


def final_paths(split: str) -> tuple[str, str]:
    """(evaluations folder, metrics JSON) of the final evaluation, relative to a workspace."""
    return f"data/final-{split}/evaluations", f"data/metrics/final-{split}.json"


def thread_env(threads: int = 0) -> dict:
    """This process's environment, with torch's CPU threads capped at ``threads`` when it is > 0."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def evaluate_stage(ws: Path, policy: str, out: str, metrics: str, preset: str | None = None,
                   threads: int = 0, env: dict | None = None) -> int:
    """The evaluate stage on ``policy`` in the workspace ``ws`` (its params.yaml and prompts file, paths
    relative to it: the command dvc.yaml runs, outside DVC), output appended to ``ws/repro.log``; its exit
    status. ``preset``: a params-shaped YAML beside params.yaml merged over it (params.yaml, and DVC's view
    of it, stay as they are). ``threads`` > 0 caps torch's CPU threads; ``env``: the environment to run
    it in instead (a stage host's, :mod:`tcrlsd.stagehost`)."""
    cmd = [sys.executable, "stages/evaluate.py", "--params", "params.yaml"] + (["--preset", preset] if preset else [])
    with open(ws / "repro.log", "a") as fh:
        return subprocess.call(cmd + ["--prompts", "data/prompts.parquet", "--policy", str(policy), "--out", out,
                                      "--metrics", metrics, "--restart", "--no-progress"],
                               cwd=ws, stdout=fh, stderr=subprocess.STDOUT, env=env or thread_env(threads))


def final_evaluation(ws: Path, split: str, threads: int = 0, env: dict | None = None) -> int:
    """Evaluate the workspace's last policy on ``split``; the exit status of the evaluate stage.

    Output appended to ``ws/repro.log``. The split is set by a preset file beside params.yaml, so the
    run's params (and DVC's view of them) stay as they are.
    """
    from tcrlsd.loop.iterations import read_iterations

    last = read_iterations(ws / "iterations.yaml")[-1].next_policy
    preset = ws / f".final-{split}.yaml"
    preset.write_text(f"evaluate:\n  split: {split}\n")
    out, metrics = final_paths(split)
    return evaluate_stage(ws, last, out, metrics, preset.name, threads, env)


def final_scores(out: Path, runs: list[Run], split: str) -> dict[str, dict[int, dict]]:
    """preset -> seed -> the final evaluation's metrics (runs without one are absent)."""
    found: dict[str, dict[int, dict]] = {}
    for run in runs:
        path = out / "runs" / run.name / final_paths(split)[1]
        if path.exists():
            found.setdefault(run.preset, {})[run.seed] = json.loads(path.read_text())
    return found


def final_lines(out: Path, presets: list[str], runs: list[Run], split: str) -> list[str]:
    """The report's final-table section (empty when no run has a final evaluation on ``split``)."""
    scores = final_scores(out, runs, split)
    if not scores:
        return []
    lines = [f"## Final table: the {split} split", "",
             f"The last policy of each run, evaluated once on the {split} split (drawn like val, sharing no problem "
             "with train or val; nothing else reads it). Greedy mean@1 and avg@k in %, mean ± std over seeds; each "
             "run minus grpo paired by seed in points of greedy accuracy, verdict from Student's t at 95% two-sided.",
             "", "| run | seeds | greedy | avg@k | − grpo: mean diff (sd) | t | verdict |", "|---|---|---|---|---|---|---|"]

    def ms(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.1f}"
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}" if values else ""

    ref = scores.get("grpo", {})
    for preset in presets:
        got = scores.get(preset)
        if not got:
            continue
        greedy = [m.get("greedy_mean_at_1") for m in got.values() if m.get("greedy_mean_at_1") is not None]
        avg = [m.get("avg_at_k") for m in got.values() if m.get("avg_at_k") is not None]
        cells = ["", "", ""]
        if preset != "grpo" and ref:
            d = [100 * (got[s]["greedy_mean_at_1"] - ref[s]["greedy_mean_at_1"]) for s in sorted(set(got) & set(ref))]
            if len(d) >= 2:
                mean, sd = statistics.mean(d), statistics.stdev(d)
                t = mean / (sd / math.sqrt(len(d))) if sd > 0 else (math.inf if mean else 0.0)
                verdict = "differs" if abs(t) > T_CRIT_95.get(len(d) - 1, 2.0) else "within seed noise"
                cells = [f"{mean:+.1f} ({sd:.1f})", f"{t:+.2f}", verdict]
            elif d:
                cells = [f"{d[0]:+.1f}", "", "too few seeds"]
        lines.append(f"| {preset} | {len(got)} | {ms(greedy)} | {ms(avg)} | " + " | ".join(cells) + " |")
    # the controls (content share) on the same held-out scores: each final score as a one-iteration row
    rows = [{"preset": p, "seed": s, "iteration": 0, "val_greedy": m.get("greedy_mean_at_1")}
            for p, by_seed in scores.items() for s, m in by_seed.items()]
    return lines + [""] + controls_lines(rows, presets, where=f"{split} split")
