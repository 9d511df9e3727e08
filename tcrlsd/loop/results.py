"""An experiment's results: rows per run and iteration, the comparison table, curves, the report.

Input: the runs' workspaces ``DIR/runs/<preset>-s<seed>/`` (their ``data/summary/iterations.csv``,
the baseline evaluation JSON and ``wall.json``). Output: ``results.csv`` (one row per preset, seed,
iteration), a Markdown report (the method note's tables 5.2/5.3 layout: peak and final validation
accuracy, mean ± std over seeds, and the training signals), a paired comparison by seed against a
reference preset, and PNG curves (mean over seeds).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tcrlsd.loop.compute import compute_lines
from tcrlsd.loop.controls import controls_lines, critique_lines

__all__ = ["RESULT_COLUMNS", "Aim", "Run", "collect_results", "load_aims", "summary_table", "paired_table",
           "write_results", "T_CRIT_95"]

RESULT_COLUMNS = ("preset", "seed", "iteration", "val_greedy", "val_avg_at_k", "reward_mean", "critique_coverage",
                  "delta_gap", "saturated_share", "saturated_nonzero_adv_share", "entropy", "response_length",
                  "pg_clipfrac", "prompts_drawn")
# two-sided 95% critical values of Student's t by degrees of freedom (n seeds - 1)
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# training signals averaged over every iteration and seed of a preset: column -> (header, percent?)
SIGNALS = (("critique_coverage", "coverage", True), ("delta_gap", "Δ-gap", False),
           ("saturated_share", "saturated groups", True),
           ("saturated_nonzero_adv_share", "non-zero Â in saturated groups", True),
           ("reward_mean", "train reward", True),
           # with generate.dynamic_sampling presets draw different numbers of prompts: said per preset
           ("prompts_drawn", "prompts drawn per iteration", False))


@dataclass(frozen=True)
class Run:
    preset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.preset}-s{self.seed}"


def _num(v):
    if v in ("", None):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def collect_results(out: Path, runs: list[Run]) -> list[dict]:
    """One row per run and iteration (iteration -1 = the baseline evaluation of the warm start)."""
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


def wall_seconds(out: Path, run: Run) -> float | None:
    path = out / "runs" / run.name / "wall.json"
    return json.loads(path.read_text()).get("seconds") if path.exists() else None


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _curves(rows: list[dict], preset: str, col: str) -> dict[int, list[tuple[int, float]]]:
    """seed -> [(iteration, value)] of the training iterations (baseline excluded), in order."""
    per_seed: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        if r["preset"] == preset and r["iteration"] >= 0 and r.get(col) is not None:
            per_seed.setdefault(r["seed"], []).append((r["iteration"], r[col]))
    return {s: sorted(v) for s, v in per_seed.items()}


def summary_table(rows: list[dict], presets: list[str], walls: dict[str, list[float]] | None = None) -> str:
    """Markdown: per preset, peak and final validation accuracy (%), mean ± std over seeds."""
    lines = ["| run | seeds | iterations | greedy peak | greedy final | avg@k peak | avg@k final |",
             "|---|---|---|---|---|---|---|"]
    for preset in presets:
        g, a = _curves(rows, preset, "val_greedy"), _curves(rows, preset, "val_avg_at_k")
        n_iter = max((len(v) for v in g.values()), default=0)
        seeds = {r["seed"] for r in rows if r["preset"] == preset and r["iteration"] >= 0}
        lines.append(
            f"| {preset} | {len(seeds)} | {n_iter} | {_mean_std([max(v for _, v in c) for c in g.values()])} "
            f"| {_mean_std([c[-1][1] for c in g.values()])} | {_mean_std([max(v for _, v in c) for c in a.values()])} "
            f"| {_mean_std([c[-1][1] for c in a.values()])} |")
    return "\n".join(lines) + "\n"


def signals_table(rows: list[dict], presets: list[str], walls: dict[str, list[float]]) -> str:
    """Markdown: per preset, the training signals (mean over iterations, then mean ± std over seeds)."""
    head = "| run | " + " | ".join(h for _, h, _ in SIGNALS) + " | wall time per run (min, median) |"
    lines = [head, "|" + "---|" * (len(SIGNALS) + 2)]
    for preset in presets:
        cells = []
        for col, _, pct in SIGNALS:
            per_seed = [statistics.mean(v for _, v in c) for c in _curves(rows, preset, col).values() if c]
            cells.append(_mean_std(per_seed, 100.0 if pct else 1.0, 1 if pct else 3))
        w = [x / 60 for x in walls.get(preset, []) if x is not None]
        cells.append(f"{statistics.median(w):.1f}" if w else "")
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], presets: list[str], reference: str) -> str:
    """Markdown: each preset minus ``reference``, paired by seed (points of greedy accuracy).

    For peak and final greedy accuracy: the mean difference over the seeds both ran, the standard
    deviation of those differences, Student's t (mean / (sd / sqrt(n))) and a verdict at 95% two-sided.
    """
    lines = [f"| run − {reference} | seeds | greedy peak: mean diff (sd) | t | greedy final: mean diff (sd) | t | verdict |",
             "|---|---|---|---|---|---|---|"]
    from tcrlsd.loop.controls import paired_t

    ref = _curves(rows, reference, "val_greedy")
    for preset in presets:
        if preset == reference:
            continue
        cur = _curves(rows, preset, "val_greedy")
        seeds = sorted(set(ref) & set(cur))
        cells, verdicts = [], []
        for pick in (lambda c: max(v for _, v in c), lambda c: c[-1][1]):
            d = [100 * (pick(cur[s]) - pick(ref[s])) for s in seeds]
            if len(d) < 2:
                cells += [f"{d[0]:+.1f}" if d else "", ""]
                verdicts.append(None)
                continue
            mean, sd, t = paired_t(d)
            crit = T_CRIT_95.get(len(d) - 1, 2.0)
            cells += [f"{mean:+.1f} ({sd:.1f})", f"{t:+.2f}"]
            verdicts.append(abs(t) > crit)
        verdict = ("differs (peak and final)" if all(verdicts) else "differs (peak)" if verdicts[0]
                   else "differs (final)" if verdicts[1] else "within seed noise") if None not in verdicts else "too few seeds"
        lines.append(f"| {preset} | {len(seeds)} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Aim:
    """A research aim (configs/aims.yaml): ``run``'s final greedy accuracy >= ``reference``'s + margin."""

    name: str
    run: str
    reference: str
    margin_points: float


def load_aims(path: Path | None) -> list[Aim]:
    """The aims listed in ``path`` (a YAML list of mappings with Aim's keys); none when it does not exist."""
    import yaml

    from tcrlsd.params import ParamsError, from_mapping

    if path is None or not Path(path).exists():
        return []
    data = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(data, list):
        raise ParamsError(f"{path}: expected a list of aims (name, run, reference, margin_points)")
    return [from_mapping(Aim, item, f"{path}[{i}]") for i, item in enumerate(data)]


def hypothesis_lines(rows: list[dict], presets: list[str], aims: Sequence[Aim] = ()) -> list[str]:
    """Each aim whose two runs are in the experiment, decided by the paired test, never by the means:
    the 95% two-sided confidence interval of run − reference (final greedy accuracy, paired by seed,
    Student's t) lies above the margin: met; below it: not met; across it (or one seed): undecided."""
    from tcrlsd.loop.controls import paired_difference

    out = []
    for aim in aims:
        if not {aim.run, aim.reference} <= set(presets):
            continue
        p = paired_difference(rows, aim.run, aim.reference)
        if p is None:
            continue
        mean, sd, _, n = p
        head = (f"{aim.name}, {aim.run} ≥ {aim.reference} + {aim.margin_points:g} points of final greedy accuracy, "
                f"paired by seed ({n} seed{'s' if n > 1 else ''}): ")
        if sd is None:
            out += [head + f"**undecided** (difference {mean:+.1f} points from one seed: no paired test).", ""]
            continue
        half = T_CRIT_95.get(n - 1, 2.0) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        verdict = "met" if low >= aim.margin_points else "not met" if high < aim.margin_points else "undecided"
        out += [head + f"**{verdict}** (difference {mean:+.1f} points, 95% interval [{low:+.1f}, {high:+.1f}]; met "
                "when the whole interval is at or above the margin, not met when it is below).", ""]
    return out


def no_feedback_lines(rows: list[dict], presets: list[str]) -> list[str]:
    """A note for each non-grpo preset whose rollouts never got feedback: its teacher was the student."""
    out = []
    for preset in presets:
        cov = [r["critique_coverage"] for r in rows if r["preset"] == preset and r["iteration"] >= 0
               and r.get("critique_coverage") is not None]
        if preset != "grpo" and cov and max(cov) == 0:
            out += [f"{preset}: no rollout got feedback in any iteration (critique coverage 0; the critique stage's "
                    "metrics give each row's reason), so its teacher scored exactly like the student (Δ = 0) and it "
                    "trained as GRPO.", ""]
    return out


FIGURES = (("val_greedy", "Validation greedy mean@1"), ("val_avg_at_k", "Validation avg@k"),
           ("reward_mean", "Training reward"), ("saturated_share", "Saturated-group share"),
           ("delta_gap", "Teacher Δ-gap (feedback rows)"))


def write_results(out: Path, rows: list[dict], presets: list[str], runs: list[Run], command: str = "",
                  doc: Path | None = None, title: str = "Experiment", intro: str = "",
                  aims: Sequence[Aim] = (), extra: list[str] | None = None) -> Path:
    """``out/results.csv``, ``out/results.md`` and PNG curves; with ``doc``, the same report written
    to that path (its figures in ``<doc stem>-figures/`` beside it); ``extra`` Markdown lines go after
    the paired comparison. Returns the report path."""
    import shutil

    from tcrlsd.loop.report import plot_curves

    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in RESULT_COLUMNS})
    walls: dict[str, list[float]] = {}
    for run in runs:
        walls.setdefault(run.preset, []).append(wall_seconds(out, run))
    base = [r["val_greedy"] for r in rows if r["iteration"] == -1 and r["val_greedy"] is not None]
    base_k = [r["val_avg_at_k"] for r in rows if r["iteration"] == -1 and r["val_avg_at_k"] is not None]
    md = [f"# {title}", ""]
    if intro:
        md += [intro.strip(), ""]
    if command:
        md += ["Generated by (from the repository root; resumable: the same command continues a stopped run):", "",
               "```", command, "```", ""]
    if base:
        md += [f"Starting policy (the warm start, iteration -1): greedy {100 * statistics.mean(base):.1f}%, "
               f"avg@k {100 * statistics.mean(base_k):.1f}% on the validation prompts." if base_k else "", ""]
    total = out / "experiment-wall.json"
    if total.exists():
        md += [f"Wall time of the whole experiment on this machine: {json.loads(total.read_text())['seconds'] / 60:.0f} min "
               "(every invocation added up).", ""]
    md += ["## Validation accuracy", "",
           "In %, mean ± std over seeds; peak = best iteration of a run, final = its last iteration.", "",
           summary_table(rows, presets), "## Training signals", "",
           "Mean over a run's iterations, then mean ± std over seeds. Coverage = share of rollouts with feedback; "
           "Δ-gap = mean of teacher − student log-prob on feedback rollouts (nats/token); saturated groups = share of "
           "prompt groups with one reward for every sample (A = 0); non-zero Â = share of response tokens in those "
           "groups whose advantage is not 0. Wall time: a run's `dvc repro` calls added up, median over seeds (the first "
           "run of an experiment also carries the shared prepare and warm start; with --jobs > 1 runs share the CPU).", "",
           signals_table(rows, presets, walls)]
    reference = "grpo" if "grpo" in presets else presets[0]
    if len(presets) > 1:
        md += ["## Paired by seed", "",
               f"Each run minus {reference} with the same seed (same sampled prompts order, same evaluation), in points "
               f"of greedy accuracy. Verdict: |t| above the 95% two-sided critical value for n − 1 degrees of freedom "
               f"({', '.join(f'n={k + 1}: {v}' for k, v in list(T_CRIT_95.items())[:3])}).", "",
               paired_table(rows, presets, reference)]
        md += hypothesis_lines(rows, presets, aims)
    md += extra or []  # e.g. the final table on the test split (tcrlsd/loop/final.py)
    md += controls_lines(rows, presets)  # issue 20: content and noise, paired by seed (tcrlsd/loop/controls.py)
    md += critique_lines(out, presets, {p: [r.name for r in runs if r.preset == p] for p in presets})
    md += no_feedback_lines(rows, presets)
    md += compute_lines(out, rows, presets, {p: [r.name for r in runs if r.preset == p] for p in presets})
    for col, fig_title in FIGURES:
        series = {}
        for preset in presets:
            by_iter: dict[int, list[float]] = {}
            for r in rows:
                if r["preset"] == preset and r.get(col) is not None:
                    x = r["iteration"] + 1 if col.startswith("val_") else r["iteration"]  # val: updates applied
                    by_iter.setdefault(x, []).append(r[col])
            xs = sorted(by_iter)
            series[preset] = (xs, [statistics.mean(by_iter[x]) for x in xs])
        xlabel = "policy updates applied" if col.startswith("val_") else "iteration"
        plot_curves(series, f"{fig_title} (mean over seeds)", xlabel, out / f"{col}.png")
        md += [f"![{fig_title}]({{figdir}}{col}.png)", ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text.replace("{figdir}", ""))
    if doc is None:
        return out / "results.md"
    doc = Path(doc)
    figdir = doc.parent / f"{doc.stem}-figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for col, _ in FIGURES:
        shutil.copy2(out / f"{col}.png", figdir / f"{col}.png")
    doc.write_text(text.replace("{figdir}", f"{figdir.name}/"))
    return doc
