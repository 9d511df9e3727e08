"""``tcrlsd report``: PNG curves and a Markdown summary of a run, viewable without a network.

(`dvc plots show` writes HTML that loads its chart library from a CDN.) Inputs are the summarize
stage's table (one row per iteration) and the baseline evaluation JSON; the validation curve puts
the baseline at x = 0 updates and iteration k's evaluation (of the policy its update wrote) at
x = k + 1. With the live tracking folder (params tracking.dir), one more figure shows the update's
per-step series from the same DVCLive files `dvc plots` reads (:func:`tcrlsd.tracking.read_series`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tcrlsd.summarize import COLUMNS, read_table
from tcrlsd.tracking import STEP_SERIES, read_series

__all__ = ["FIGURES", "STEP_PANELS", "write_report", "plot_curves", "plot_panels"]

# figure file stem -> (title, [(column, label)])
FIGURES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "validation": ("Validation accuracy", [("val_greedy", "greedy mean@1"), ("val_avg_at_k", "sampled avg@k"),
                                           ("val_maj_at_k", "sampled maj@k")]),
    "reward": ("Training reward and feedback", [("reward_mean", "reward mean"),
                                                ("critique_coverage", "critique coverage"),
                                                ("saturated_share", "saturated-group share")]),
    "delta_gap": ("Teacher gap", [("delta_gap", "delta-gap (nats/token, feedback rows)")]),
    "update": ("Update", [("entropy", "entropy"), ("pg_clipfrac", "pg_clipfrac")]),
    "response_length": ("Response length", [("response_length", "mean response tokens")]),
}

# The per-step figure: one panel per update series (tcrlsd.update.trainer.step_metrics keys).
STEP_PANELS: tuple[tuple[str, str], ...] = (
    ("pg_loss", "policy loss"), ("pg_clipfrac", "clip fraction"), ("ppo_kl", "KL to old policy"),
    ("entropy", "entropy"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"),
    ("kl_to_reference", "KL to reference"),
)


def plot_curves(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
                path: str | os.PathLike) -> Path:
    """One PNG with a line per named (x, y) series (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        plotted = 0
        for label, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                plotted += 1
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def plot_panels(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
                path: str | os.PathLike, columns: int = 4) -> Path:
    """One PNG with one small panel per named (x, y) series (their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(series) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), dpi=100, squeeze=False)
    try:
        for ax, (label, (xs, ys)) in zip(axes.flat, series.items()):
            ax.plot(xs, ys, linewidth=1)
            ax.set_title(label, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.supxlabel(xlabel, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_report(table: str | os.PathLike, out_dir: str | os.PathLike, baseline: str | os.PathLike | None = None,
                 title: str = "tcrlsd run", live: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/report.md`` and one PNG per figure; returns the Markdown path. ``live``: the
    DVCLive folder (params tracking.dir), for the per-step figure (skipped when it has no steps)."""
    rows = read_table(table)
    base = json.loads(Path(baseline).read_text()) if baseline and Path(baseline).exists() else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    iters = [r["iteration"] for r in rows]
    images = []
    for stem, (fig_title, cols) in FIGURES.items():
        series = {}
        for col, label in cols:
            if stem == "validation":
                key = COLUMNS[col][1][-1]  # the evaluate JSON's key of that column
                xs = [0] + [i + 1 for i in iters]
                series[label] = (xs, [base.get(key)] + [r[col] for r in rows])
            else:
                series[label] = (iters, [r[col] for r in rows])
        xlabel = "policy updates applied" if stem == "validation" else "iteration"
        images.append((fig_title, plot_curves(series, fig_title, xlabel, out_dir / f"{stem}.png").name))
    steps = {label: read_series(live, f"{STEP_SERIES}/{key}") for key, label in STEP_PANELS} if live else {}
    steps = {label: s for label, s in steps.items() if s[0]}
    if steps:
        fig_title = "Update, per optimizer step (live tracking)"
        images.append((fig_title, plot_panels(steps, fig_title, "optimizer step (whole run)",
                                              out_dir / "steps.png").name))
    lines = [f"# {title}", ""]
    if base:
        lines += [f"Baseline (starting policy): greedy mean@1 {_fmt(base.get('greedy_mean_at_1'))}, "
                  f"avg@{base.get('samples')} {_fmt(base.get('avg_at_k'))}, maj@{base.get('samples')} "
                  f"{_fmt(base.get('maj_at_k'))} on {base.get('prompts')} val prompts.", ""]
    if rows:
        vals = [(r["val_greedy"], r["iteration"]) for r in rows if r["val_greedy"] is not None]
        if vals:
            best = max(vals)
            lines += [f"After {len(rows)} iteration(s): greedy mean@1 {_fmt(rows[-1]['val_greedy'])} "
                      f"(peak {_fmt(best[0])} after iteration {best[1]}).", ""]
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
        lines.append("")
    for fig_title, name in images:
        lines += [f"## {fig_title}", "", f"![{fig_title}]({name})", ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines))
    return md
