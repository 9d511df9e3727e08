"""Headline metrics and the per-iteration table.

Every stage writes a detail JSON (dozens of keys: reasons, deciles, per-source tables). DVC
declares none of them as metrics -- `dvc metrics show` would print hundreds of columns -- and the
``summarize`` stage distils them instead into:

- ``iterations.csv``: one row per iteration with the curves worth plotting over training
  (COLUMNS below), the source of the DVC plots and of ``tcrlsd report``;
- ``headline.json``: a few numbers per stage of the latest iteration, plus the baseline (the
  evaluation of the starting policy) and the best validation accuracy so far: the DVC metrics that
  ``dvc metrics show`` and ``dvc exp show`` print;
- the same rows, stage by stage, as the per-iteration series of the live tracking folder
  (:func:`track_rows`, :mod:`tcrlsd.tracking`), rewritten whole on every run.

The metrics folder layout (paths from dvc.yaml): ``<metrics>/prepare.json``, ``warmstart.json``,
``evaluate-baseline.json`` and one folder per iteration ``<metrics>/iter-<id>/<stage>.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from tcrlsd.errors import InputError

__all__ = ["COLUMNS", "HEADLINE", "iteration_row", "collect_rows", "headline", "write_table", "read_table",
           "track_rows"]

# column -> (stage, key path in that stage's detail JSON). The stages' key names are theirs; this
# table is the one place that maps them to the names the plots use.
COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "val_greedy": ("evaluate", ("greedy_mean_at_1",)),
    "val_avg_at_k": ("evaluate", ("avg_at_k",)),
    "val_maj_at_k": ("evaluate", ("maj_at_k",)),
    "reward_mean": ("verify", ("reward_mean",)),
    "critique_coverage": ("critique", ("coverage",)),
    "delta_gap": ("score", ("delta_gap",)),
    "saturated_share": ("advantages", ("saturated_group_share",)),
    "saturated_nonzero_adv_share": ("advantages", ("saturated_adv_nonzero_token_share",)),
    "adv_abs_mean": ("advantages", ("adv_abs_mean",)),
    "response_length": ("generate", ("mean_response_tokens",)),
    "prompts_drawn": ("generate", ("prompts_drawn",)),  # > prompts_per_step with generate.dynamic_sampling
    "sampler_kl": ("score", ("sampler_mismatch", "kl_k3")),  # sampler vs scorer (tcrlsd/offpolicy.py)
    "entropy": ("update", ("entropy",)),
    "pg_clipfrac": ("update", ("pg_clipfrac",)),
    "pg_loss": ("update", ("pg_loss",)),
}

# The few numbers per stage declared as DVC metrics (stage -> detail keys).
HEADLINE: dict[str, tuple[str, ...]] = {
    "generate": ("mean_response_tokens", "share_finish_length"),
    "verify": ("reward_mean",),
    "critique": ("coverage",),
    "score": ("delta_gap",),
    "advantages": ("saturated_group_share", "adv_abs_mean"),
    "update": ("pg_loss", "pg_clipfrac", "entropy", "grad_norm"),
    "evaluate": ("greedy_mean_at_1", "avg_at_k", "maj_at_k"),
}


def _get(obj: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj if isinstance(obj, (int, float)) and not isinstance(obj, bool) else None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def iteration_row(folder: str | os.PathLike, iteration: str) -> dict:
    """The table row of one iteration from its metrics folder (missing stages leave empty cells)."""
    folder = Path(folder)
    stages = {s: _load(folder / f"{s}.json") for s in {s for s, _ in COLUMNS.values()}}
    row: dict = {"iteration": int(iteration) if iteration.isdigit() else iteration}
    for col, (stage, path) in COLUMNS.items():
        row[col] = _get(stages[stage], path)
    return row


def collect_rows(metrics_dir: str | os.PathLike) -> list[dict]:
    """Rows of every ``iter-<id>`` folder under ``metrics_dir``, in id order."""
    metrics_dir = Path(metrics_dir)
    folders = sorted(p for p in metrics_dir.glob("iter-*") if p.is_dir())
    return [iteration_row(p, p.name[len("iter-"):]) for p in folders]


def headline(metrics_dir: str | os.PathLike, rows: list[dict]) -> dict:
    """Latest iteration's headline numbers per stage, the baseline and the best val accuracy."""
    metrics_dir = Path(metrics_dir)
    out: dict = {"iterations": len(rows)}
    base = _load(metrics_dir / "evaluate-baseline.json")
    out["baseline"] = {k: _get(base, (k,)) for k in HEADLINE["evaluate"]}
    if rows:
        last = sorted(p for p in metrics_dir.glob("iter-*") if p.is_dir())[-1]
        for stage, keys in HEADLINE.items():
            detail = _load(last / f"{stage}.json")
            out[stage] = {k: _get(detail, (k,)) for k in keys}
        vals = [r["val_greedy"] for r in rows if r["val_greedy"] is not None]
        out["best_val_greedy"] = max(vals) if vals else None
    return out


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_table(rows: list[dict], path: str | os.PathLike) -> None:
    """Write the rows as CSV atomically (header: iteration + COLUMNS)."""
    from tcrlsd.artifacts import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["iteration", *COLUMNS]
    w.writerow(header)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in header])
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of an iterations CSV with numbers parsed (empty cells -> None)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        out.append({k: (float(v) if v not in ("", None) else None) if k != "iteration" else int(v)
                    for k, v in r.items()})
    return out


def track_rows(rows: list[dict], tracker) -> int:
    """Log every row through ``tracker.log_iteration`` (a :class:`tcrlsd.tracking.Tracker`), one
    call per stage with that stage's columns, x = the iteration; returns the calls made. Rows whose
    iteration id is not a number are left out (they have no place on the x axis)."""
    by_stage: dict[str, list[str]] = {}
    for col, (stage, _) in COLUMNS.items():
        by_stage.setdefault(stage, []).append(col)
    calls = 0
    for r in rows:
        if not isinstance(r["iteration"], int):
            continue
        for stage, cols in by_stage.items():
            tracker.log_iteration(stage, {c: r.get(c) for c in cols}, r["iteration"])
            calls += 1
    return calls
