"""``tcrlsd experiment``: several presets x seeds from the same warm start, side by side.

Each run (preset, seed) is its own workspace ``DIR/runs/<preset>-s<seed>/``: a copy of the project's
pipeline files (dvc.yaml, iterations.yaml, stages/, configs/, the tcrlsd/ sources the stages list
as deps; data/raw hard-linked) with params.yaml = the base params, the preset applied and the seed
keys set, all sharing one DVC cache ``DIR/cache``. Why workspaces and not `dvc exp run`:

- the loop is encoded in iterations.yaml (DVC ``vars``), which `dvc exp run -S` cannot edit, and
  an experiment queue cannot chain iterations (FACTS.md);
- DVC experiments need a git repository and run one at a time in the workspace (or in temporary
  copies of it anyway); plain workspaces need neither and are left on disk, inspectable;
- through the shared cache, DVC's run-cache restores stages whose command, deps and params are
  identical in another workspace instead of running them: prepare and the warm start run once for
  all runs, so every run starts from the same warm start (checked in a scratch repository: DVC
  3.67 run-caches stages with deps and ordinary outputs; stages with `persist` outputs, such as
  the baseline evaluation, run again in each workspace -- deterministically, same seed and weights).

Resumable: a rerun re-enters each workspace, extends iterations.yaml to K items if needed and
calls `dvc repro`, which skips what is done (a killed stage resumes from its finished parts).
Results: ``DIR/results.csv`` (one row per preset, seed, iteration), ``DIR/results.md`` (peak and
final validation accuracy, mean +- std over seeds, like the method note's tables) and PNG curves.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SEED_KEYS", "RESULT_COLUMNS", "Run", "prepare_workspace", "run_experiment", "collect_results",
           "summary_table", "write_results"]

# params set to the run's seed: what samples and trains differs between seeds; the data, the warm
# start and the evaluation's sampling stay the same, so runs differ only by their training.
SEED_KEYS: tuple[tuple[str, str], ...] = (("generate", "seed"), ("update", "seed"), ("critique", "seed"))
RESULT_COLUMNS = ("preset", "seed", "iteration", "val_greedy", "val_avg_at_k", "reward_mean", "critique_coverage",
                  "delta_gap", "saturated_share", "entropy", "response_length", "pg_clipfrac")
PIPELINE_FILES = ("dvc.yaml", "iterations.yaml", "stages", "configs", "tcrlsd")


@dataclass(frozen=True)
class Run:
    preset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.preset}-s{self.seed}"


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a data folder (falls back to copying across file systems)."""
    def link(s, d):
        if os.path.exists(d):
            if os.path.samefile(s, d):
                return d  # linked by an earlier call (resume)
            os.unlink(d)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
        return d

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def prepare_workspace(project: Path, base_params: Path, run: Run, presets_dir: Path, ws: Path, cache: Path,
                      iterations: int) -> Path:
    """Create (or refresh) the run's workspace; returns it. Existing outputs are kept (resume)."""
    import yaml

    from tcrlsd.loop.iterations import append_iterations, read_iterations
    from tcrlsd.presets import apply_preset, preset_path

    ws.mkdir(parents=True, exist_ok=True)
    for rel in PIPELINE_FILES:
        if rel == "iterations.yaml" and (ws / rel).exists():
            continue  # keep the run's own (possibly longer) chain
        _copy(project / rel, ws / rel)
    if (project / "data" / "raw").is_dir():
        _link_tree(project / "data" / "raw", ws / "data" / "raw")
    _copy(base_params, ws / "params.yaml")
    apply_preset(ws / "params.yaml", preset_path(run.preset, presets_dir))
    seeds = {}
    for section, key in SEED_KEYS:
        seeds.setdefault(section, {})[key] = run.seed
    seed_file = ws / ".seed-preset.yaml"
    seed_file.write_text(yaml.safe_dump(seeds))
    apply_preset(ws / "params.yaml", seed_file)
    seed_file.unlink()
    if not (ws / ".dvc").is_dir():
        subprocess.run([_dvc(), "init", "--no-scm", "-q"], cwd=ws, check=True)
        subprocess.run([_dvc(), "config", "core.analytics", "false"], cwd=ws, check=True)
    subprocess.run([_dvc(), "config", "--local", "cache.dir", str(cache.resolve())], cwd=ws, check=True)
    have = len(read_iterations(ws / "iterations.yaml"))
    if have < iterations:
        append_iterations(ws / "iterations.yaml", iterations - have)
    elif have > iterations:
        raise ValueError(f"{ws}/iterations.yaml already has {have} iterations, more than --iterations {iterations}; "
                         "use another --out or a larger --iterations")
    return ws


def _num(v: str):
    return float(v) if v not in ("", None) else None


def collect_results(out: Path, runs: list[Run]) -> list[dict]:
    """One row per run and iteration (iteration -1 = the baseline evaluation of the warm start)."""
    import json

    rows: list[dict] = []
    for run in runs:
        ws = out / "runs" / run.name
        base = ws / "data" / "metrics" / "evaluate-baseline.json"
        if base.exists():
            b = json.loads(base.read_text())
            rows.append({"preset": run.preset, "seed": run.seed, "iteration": -1,
                         "val_greedy": b.get("greedy_mean_at_1"), "val_avg_at_k": b.get("avg_at_k")})
        table = ws / "data" / "summary" / "iterations.csv"
        if not table.exists():
            continue
        with open(table, newline="") as fh:
            for r in csv.DictReader(fh):
                row = {"preset": run.preset, "seed": run.seed, "iteration": int(r["iteration"])}
                row.update({c: _num(r.get(c, "")) for c in RESULT_COLUMNS[3:]})
                rows.append(row)
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summary_table(rows: list[dict], presets: list[str]) -> str:
    """Markdown: per preset, peak and final validation accuracy (%), mean ± std over seeds."""
    lines = ["| run | seeds | iterations | greedy peak | greedy final | avg@k peak | avg@k final |",
             "|---|---|---|---|---|---|---|"]
    for preset in presets:
        per_seed: dict[int, list[dict]] = {}
        for r in rows:
            if r["preset"] == preset and r["iteration"] >= 0:
                per_seed.setdefault(r["seed"], []).append(r)
        stats = {k: [] for k in ("gp", "gf", "ap", "af")}
        n_iter = 0
        for seq in per_seed.values():
            seq.sort(key=lambda r: r["iteration"])
            n_iter = max(n_iter, len(seq))
            g = [r["val_greedy"] for r in seq if r["val_greedy"] is not None]
            a = [r["val_avg_at_k"] for r in seq if r["val_avg_at_k"] is not None]
            if g:
                stats["gp"].append(max(g))
                stats["gf"].append(g[-1])
            if a:
                stats["ap"].append(max(a))
                stats["af"].append(a[-1])
        lines.append(f"| {preset} | {len(per_seed)} | {n_iter} | {_mean_std(stats['gp'])} | {_mean_std(stats['gf'])} "
                     f"| {_mean_std(stats['ap'])} | {_mean_std(stats['af'])} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], presets: list[str]) -> None:
    """results.csv, results.md and one PNG of mean validation curves per accuracy."""
    from tcrlsd.loop.report import plot_curves

    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in RESULT_COLUMNS})
    md = ["# Experiment", "", "Validation accuracy in % (mean ± std over seeds; peak over iterations, final = last).",
          "", summary_table(rows, presets)]
    for col, title in (("val_greedy", "Validation greedy mean@1"), ("val_avg_at_k", "Validation avg@k")):
        series = {}
        for preset in presets:
            by_iter: dict[int, list[float]] = {}
            for r in rows:
                if r["preset"] == preset and r.get(col) is not None:
                    by_iter.setdefault(r["iteration"] + 1, []).append(r[col])  # x = updates applied
            xs = sorted(by_iter)
            series[preset] = (xs, [statistics.mean(by_iter[x]) for x in xs])
        name = f"{col}.png"
        plot_curves(series, f"{title} (mean over seeds)", "policy updates applied", out / name)
        md += [f"![{title}]({name})", ""]
    (out / "results.md").write_text("\n".join(md))


def run_experiment(project: Path, base_params: Path, presets: list[str], seeds: list[int], iterations: int,
                   out: Path, presets_dir: Path, log=print) -> list[dict]:
    """Run (or resume) every preset x seed for ``iterations`` iterations; returns the result rows."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    runs = [Run(p, s) for p in presets for s in seeds]
    for i, run in enumerate(runs, 1):
        ws = prepare_workspace(project, base_params, run, presets_dir, out / "runs" / run.name, cache, iterations)
        log(f"[{i}/{len(runs)}] {run.name}: dvc repro in {ws} (log: {ws / 'repro.log'})")
        with open(ws / "repro.log", "a") as fh:
            code = subprocess.call([_dvc(), "repro"], cwd=ws, stdout=fh, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"{run.name}: dvc repro failed (exit {code}); see {ws / 'repro.log'}. "
                               "Rerun the same command to resume.")
    rows = collect_results(out, runs)
    write_results(out, rows, presets)
    return rows
