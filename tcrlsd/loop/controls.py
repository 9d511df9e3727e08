"""The experiment report's controls section: what the critique's content explains, what noise costs,
and what the critiques revealed (issue 20).

A control preset is named after the run it controls: ``<run>_blank`` (every critique replaced by
the content-free sentence), ``<run>_shuffled`` (another prompt's critique), ``<run>_noisy`` (the
reference critic wrong on purpose for a share of rows). For each run with a control in the
experiment: its gain over grpo, and the run minus each control, all paired by seed on the final
greedy accuracy; content share = (run − blank) / (run − grpo). The critique table reads each run's
critique-stage metrics (``data/metrics/iter-*/critique.json``): the leak rates (the final answer
revealed; an intermediate value revealed) and the agreement with the reference critic's first
wrong step, mean over iterations, then over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# control suffix -> what "run minus control" measures
CONTROL_SUFFIXES = (("_blank", "content (run − blank)"), ("_shuffled", "content (run − shuffled)"),
                    ("_noisy", "noise degradation (run − noisy)"))
# critique metrics shown per preset: key -> header
CRITIQUE_COLUMNS = (("leakage_share", "final answer revealed"),
                    ("intermediate_leakage_share", "intermediate value revealed"),
                    ("reference_step_agreement", "names the reference critic's step"))


def _final(rows: list[dict], preset: str) -> dict[int, float]:
    """seed -> final greedy accuracy (last training iteration) of ``preset``."""
    last: dict[int, tuple[int, float]] = {}
    for r in rows:
        if r["preset"] == preset and r["iteration"] >= 0 and r.get("val_greedy") is not None:
            if r["seed"] not in last or r["iteration"] > last[r["seed"]][0]:
                last[r["seed"]] = (r["iteration"], r["val_greedy"])
    return {s: v for s, (_, v) in last.items()}


def paired_t(d: list[float]) -> tuple[float, float, float]:
    """``(mean, sd, t)`` of paired differences ``d`` (>= 2 of them): Student's t = mean / (sd / sqrt(n)).
    Differences are rounded to 1e-9 first, so seeds that differ by the same amount (sd 0 up to float
    rounding) give t = ±inf (0 when the mean is 0 too), not a huge finite number."""
    d = [round(x, 9) for x in d]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    if sd == 0:
        return mean, 0.0, (math.copysign(math.inf, mean) if mean else 0.0)
    return mean, sd, mean / (sd / math.sqrt(len(d)))


def paired_difference(rows: list[dict], a: str, b: str) -> tuple[float, float | None, float | None, int] | None:
    """``(mean, sd, t, n)`` of ``a − b`` in points of final greedy accuracy over the seeds both ran
    (sd and t None for one seed); None when no seed is shared."""
    fa, fb = _final(rows, a), _final(rows, b)
    d = [100 * (fa[s] - fb[s]) for s in sorted(set(fa) & set(fb))]
    if not d:
        return None
    if len(d) == 1:
        return d[0], None, None, 1
    return (*paired_t(d), len(d))


def _cell(p) -> str:
    if p is None:
        return "| | "
    mean, sd, t, n = p
    return f"{mean:+.1f}" + ("" if sd is None else f" ({sd:.1f})") + f" | {'' if t is None else f'{t:+.2f}'} "


def controls_lines(rows: list[dict], presets: list[str], where: str = "") -> list[str]:
    """The Markdown section (a list of lines; empty when no preset has a control in the experiment).
    ``where``: what the rows' accuracy is, for the heading (default: the validation curves' last point;
    the final table passes its split's scores as one-iteration rows)."""
    bases = [p for p in presets if any(p + s in presets for s, _ in CONTROL_SUFFIXES)]
    if not bases:
        return []
    lines = [f"## Controls{' on the ' + where if where else ''}", "",
             f"Final greedy accuracy{' on the ' + where if where else ''}, points, paired by seed: mean difference "
             "(sd over seeds) and Student's t. "
             "Content share = (run − blank) / (run − grpo): the part of the gain over grpo that the critique's "
             "content explains (the rest came from a feedback block being there at all).", "",
             "| run | vs | mean diff (sd) | t | seeds |", "|---|---|---|---|---|"]
    for base in bases:
        gain = paired_difference(rows, base, "grpo") if "grpo" in presets else None
        if gain is not None:
            lines.append(f"| {base} | gain over grpo | {_cell(gain)}| {gain[3]} |")
        for suffix, what in CONTROL_SUFFIXES:
            if base + suffix in presets:
                p = paired_difference(rows, base, base + suffix)
                lines.append(f"| {base} | {what} | {_cell(p)}| {p[3] if p else 0} |")
        blank = paired_difference(rows, base, base + "_blank") if base + "_blank" in presets else None
        if gain is not None and blank is not None and gain[0] != 0:
            lines.append(f"| {base} | content share of the gain | {blank[0] / gain[0]:.0%} | | |")
    return lines + [""]


def critique_metric_means(out: Path, run_names: list[str]) -> dict[str, float | None]:
    """Each :data:`CRITIQUE_COLUMNS` key: mean over the runs (seeds) of the mean over their iterations."""
    per_run: dict[str, list[float]] = {k: [] for k, _ in CRITIQUE_COLUMNS}
    for name in run_names:
        values: dict[str, list[float]] = {k: [] for k, _ in CRITIQUE_COLUMNS}
        for path in sorted((out / "runs" / name / "data" / "metrics").glob("iter-*/critique.json")):
            m = json.loads(path.read_text())
            if not m.get("rollouts_with_feedback"):
                continue
            for k in values:
                if m.get(k) is not None:
                    values[k].append(m[k])
        for k, v in values.items():
            if v:
                per_run[k].append(statistics.mean(v))
    return {k: statistics.mean(v) if v else None for k, v in per_run.items()}


def critique_lines(out: Path, presets: list[str], runs_by_preset: dict[str, list[str]]) -> list[str]:
    """Markdown: per preset with feedback, what its critiques revealed and where they pointed (%)."""
    table = []
    for preset in presets:
        means = critique_metric_means(out, runs_by_preset.get(preset, []))
        if all(v is None for v in means.values()):
            continue
        table.append(f"| {preset} | " + " | ".join("" if means[k] is None else f"{100 * means[k]:.1f}"
                                                   for k, _ in CRITIQUE_COLUMNS) + " |")
    if not table:
        return []
    return ["## What the feedback says", "",
            "Share of feedback rows (%), mean over iterations then seeds: the gold final answer in the text; a right "
            "intermediate value the attempt and the problem do not contain; on wrong rollouts, the feedback names "
            "first the step the reference critic names first (synthetic task only).", "",
            "| run | " + " | ".join(h for _, h in CRITIQUE_COLUMNS) + " |",
            "|---|" + "---|" * len(CRITIQUE_COLUMNS), *table, ""]
