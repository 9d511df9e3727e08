"""How long a run takes to stop improving, and what each point of accuracy cost (issue 20, item 5).

A fixed budget of iterations can stop a run while it still rises; then a method that learns faster
looks better than one that learns as far, only later. The experiment report therefore says, per
preset, at which iteration the mean validation curve reaches its plateau (or that it had not by the
last iteration), and puts each preset's gain over the warm start beside what it spent: response
tokens generated (the generate stage's ``response_tokens``, summed over the run's iterations) and
wall time of the training iterations (the run's ``dvc repro`` time without the shared prepare and
warm start). A teacher preset pays one more forward per rollout than grpo: the wall-time column
shows it, the token column does not (the teacher scores, it does not generate).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["PLATEAU_POINTS", "plateau_iteration", "run_cost", "compute_lines"]

# A curve has plateaued at the first iteration whose value is within this many points of the best
# value it ever reaches, and if its last step rose by no more than this (otherwise: still rising).
PLATEAU_POINTS = 1.0


def plateau_iteration(curve: list[tuple[int, float]], points: float = PLATEAU_POINTS) -> tuple[int | None, bool]:
    """(iteration at which ``curve`` (iteration, accuracy in [0, 1]) first comes within ``points`` of
    its best value, whether it stopped rising). A curve whose last step rose by more than ``points``
    has not plateaued: (None, False). An empty curve: (None, False)."""
    if not curve:
        return None, False
    curve = sorted(curve)
    if len(curve) >= 2 and 100 * (curve[-1][1] - curve[-2][1]) > points + 1e-9:
        return None, False
    best = max(v for _, v in curve)
    return next(i for i, v in curve if 100 * (best - v) <= points + 1e-9), True


def _ran_warm_start(ws: Path) -> bool:
    log = ws / "repro.log"
    return log.exists() and "Running stage 'warmstart'" in log.read_text(errors="replace")


def run_cost(ws: Path) -> dict:
    """``tokens``: response tokens generated over the run's iterations (None if no iteration wrote its
    generate metrics); ``seconds``: the run's wall time without the prepare and warm start it may have
    run for every run of the experiment (None without ``wall.json``)."""
    tokens = None
    for path in sorted((ws / "data" / "metrics").glob("iter-*/generate.json")):
        tokens = (tokens or 0) + int(json.loads(path.read_text()).get("response_tokens") or 0)
    seconds = None
    if (ws / "wall.json").exists():
        seconds = float(json.loads((ws / "wall.json").read_text()).get("seconds") or 0.0)
        warm = ws / "data" / "metrics" / "warmstart.json"
        if _ran_warm_start(ws) and warm.exists():
            w = json.loads(warm.read_text())
            seconds = max(0.0, seconds - float(w.get("train_seconds") or 0) - float(w.get("eval_seconds") or 0))
    return {"tokens": tokens, "seconds": seconds}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def compute_lines(out: Path, rows: list[dict], presets: list[str], run_names: dict[str, list[str]]) -> list[str]:
    """Markdown section: plateau and compute-matched columns per preset (``run_names``: preset -> its
    runs' folder names under ``out/runs``)."""
    lines = ["| run | iteration of the plateau (mean curve) | final − warm start (points) | response tokens per run (k) "
             "| wall min per run | k tokens per point | wall min per point |", "|---|---|---|---|---|---|---|"]
    any_row = False
    for preset in presets:
        by_iter: dict[int, list[float]] = {}
        gains = []
        for seed in sorted({r["seed"] for r in rows if r["preset"] == preset}):
            mine = sorted((r["iteration"], r["val_greedy"]) for r in rows
                          if r["preset"] == preset and r["seed"] == seed and r.get("val_greedy") is not None)
            trained = [(i, v) for i, v in mine if i >= 0]
            for i, v in trained:
                by_iter.setdefault(i, []).append(v)
            if mine and mine[0][0] == -1 and trained:
                gains.append(100 * (trained[-1][1] - mine[0][1]))
        if not by_iter:
            continue
        any_row = True
        mean_curve = [(i, statistics.mean(v)) for i, v in sorted(by_iter.items())]
        at, done = plateau_iteration(mean_curve)
        plateau = f"{at}" if done else f"not reached (still rising at {mean_curve[-1][0]})"
        costs = [run_cost(out / "runs" / name) for name in run_names.get(preset, [])]
        tok = [c["tokens"] / 1000 for c in costs if c["tokens"] is not None]
        sec = [c["seconds"] / 60 for c in costs if c["seconds"] is not None]
        gain = statistics.mean(gains) if gains else None
        k_tok = statistics.mean(tok) if tok else None
        minutes = statistics.median(sec) if sec else None
        per_point = gain is not None and gain > 0
        lines.append(f"| {preset} | {plateau} | {_fmt(gain)} | {_fmt(k_tok, 0)} | {_fmt(minutes)} "
                     f"| {_fmt(k_tok / gain if per_point and k_tok is not None else None, 0)} "
                     f"| {_fmt(minutes / gain if per_point and minutes is not None else None, 2)} |")
    if not any_row:
        return []
    return ["## Plateau and cost", "",
            f"Plateau: the first iteration (0 = after the first update) at which the mean-over-seeds greedy validation "
            f"curve is within {PLATEAU_POINTS:g} point of its best; \"not reached\" when its last iteration still rose by "
            "more. Gain = final minus warm-start greedy accuracy, mean over seeds; tokens = response tokens generated, "
            "mean per run; wall = the run's training iterations (prepare and warm start left out), median over seeds. "
            "Per point: cost divided by the gain (empty when the gain is not positive).", "",
            "\n".join(lines), ""]
