"""`tcrlsd recompute` and `tcrlsd compare`: advantages of a stored iteration, offline.

Both read only an iteration folder's rollouts, verdicts, scores (and critiques, when present) and
need numpy + pyarrow, nothing heavier; the library is imported inside the commands so that the rest
of the CLI does not pay for it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tcrlsd.advantages.estimators import ESTIMATORS  # numpy only: the registry gives --estimator's choices

# Setting flags shared by both commands; None = the value of the params file in force: --params, else
# the project's params.yaml (found from the working directory), else the built-in defaults (equal to
# params.yaml's). The help shows the value in force ({default:...}: tcrlsd.commands.defaults).
IterDir = Annotated[Path, typer.Argument(help="Iteration folder holding rollouts, verdicts, scores (and critiques).")]
ParamsOpt = Annotated[
    Optional[Path], typer.Option("--params", help="params.yaml whose 'advantages' section gives the defaults "
                                 "(default: the project's params.yaml, found from the working directory).")
]
Alpha = Annotated[Optional[float], typer.Option("--alpha", help="rlsd_hybrid weight of A·m_t "
                                                "({default:advantages.alpha}).")]
Beta = Annotated[Optional[float], typer.Option("--beta", help="rlsd_hybrid weight of Δ_t "
                                              "({default:advantages.beta}).")]
Lam = Annotated[Optional[float], typer.Option("--lam", help="Set λ directly (else the schedule at the iteration).")]
Lam0 = Annotated[Optional[float], typer.Option("--lam0", help="λ_0 of the schedule ({default:advantages.lam0}).")]
LamDecay = Annotated[
    Optional[int], typer.Option("--lam-decay-steps",
                                help="Iterations for λ to decay to 0 ({default:advantages.lam_decay_steps}).")
]
EpsW = Annotated[Optional[float], typer.Option("--eps-w", help="Clip of w_t to [1−ε_w, 1+ε_w] "
                                               "({default:advantages.eps_w}).")]
NormByStd = Annotated[
    Optional[bool],
    typer.Option("--norm-by-std/--no-norm-by-std", help="Divide A by the group std "
                 "({default:advantages.norm_by_std})."),
]
DeltaClip = Annotated[
    Optional[float], typer.Option("--delta-clip", help="Clip Δ_t to [−C, C] in the additive term; 0 = off "
                                  "({default:advantages.delta_clip}).")
]
Iteration = Annotated[
    Optional[int], typer.Option("--iteration", help="Iteration k for the λ schedule (default: the rollouts').")
]

_SHARED_ROWS = (
    "rollouts", "groups", "tokens", "iteration", "lam", "reward_mean", "saturated_group_share",
    "saturated_all_correct_share", "saturated_all_wrong_share", "singleton_group_share",
    "critique_coverage", "teacher_differs_share", "delta_gap", "delta_abs_mean",
)
_ESTIMATOR_ROWS = ("adv_abs_mean", "adv_mean", "adv_nonzero_token_share", "saturated_adv_nonzero_token_share")


def _params(params_path, command: str, **overrides):
    from tcrlsd.advantages import AdvantagesParams
    from tcrlsd.params import section_in_force

    base = section_in_force("advantages", AdvantagesParams, params_path, announce=command)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("delta_clip") == 0:
        given["delta_clip"] = None
    return dataclasses.replace(base, **given)  # a new frozen instance, checked again


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _console(width: int = 120):
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)


def recompute(
    iter_dir: IterDir,
    estimator: Annotated[
        Optional[str], typer.Option("--estimator", "-e", help=" | ".join(ESTIMATORS) + " (default: params).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Write the advantages Parquet here (default: metrics only).")
    ] = None,
    alpha: Alpha = None,
    beta: Beta = None,
    lam: Lam = None,
    lam0: Lam0 = None,
    lam_decay_steps: LamDecay = None,
    eps_w: EpsW = None,
    norm_by_std: NormByStd = None,
    delta_clip: DeltaClip = None,
    iteration: Iteration = None,
    params: ParamsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Recompute an iteration's advantages from its stored scores, verdicts and rollouts.

    Writes only --out; prints the metrics (reward mean, saturated groups, coverage, Δ-gap, |Â|, ...).
    """
    from tcrlsd.advantages import IterationInputs, compute_advantages
    from tcrlsd.params import ParamsError
    from tcrlsd.schemas import SchemaError

    try:
        p = _params(params, "recompute", estimator=estimator, alpha=alpha, beta=beta, lam0=lam0,
                    lam_decay_steps=lam_decay_steps, eps_w=eps_w, norm_by_std=norm_by_std, delta_clip=delta_clip)
        metrics = compute_advantages(IterationInputs.find(iter_dir), p, out, iteration=iteration, lam=lam)
    except (ParamsError, SchemaError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title=f"{iter_dir}: {metrics['estimator']}" + (f" -> {out}" if out else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("estimator", *_SHARED_ROWS, "lam_source", *_ESTIMATOR_ROWS):
        table.add_row(key, _fmt(metrics[key]))
    for key, value in metrics["settings"].items():
        table.add_row(f"settings.{key}", _fmt(value))
    _console().print(table)


def compare(
    iter_dir: IterDir,
    alpha: Alpha = None,
    beta: Beta = None,
    lam: Lam = None,
    lam0: Lam0 = None,
    lam_decay_steps: LamDecay = None,
    eps_w: EpsW = None,
    norm_by_std: NormByStd = None,
    delta_clip: DeltaClip = None,
    iteration: Iteration = None,
    params: ParamsOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON instead.")] = False,
) -> None:
    """Every estimator of the registry on one stored iteration, side by side (rows = metrics).

    The saturated_* rows show which forms keep a signal where a group's rewards are all equal (A = 0).
    """
    from tcrlsd.advantages import IterationInputs, compare_estimators
    from tcrlsd.params import ParamsError
    from tcrlsd.schemas import SchemaError

    if fmt not in ("table", "markdown", "csv"):
        raise _fail(ValueError(f"--format must be table, markdown or csv, got {fmt!r}"))
    try:
        p = _params(params, "compare", alpha=alpha, beta=beta, lam0=lam0, lam_decay_steps=lam_decay_steps,
                    eps_w=eps_w, norm_by_std=norm_by_std, delta_clip=delta_clip)
        shared, per = compare_estimators(IterationInputs.find(iter_dir), p, iteration=iteration, lam=lam)
    except (ParamsError, SchemaError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"shared": shared, "estimators": per}, indent=2, sort_keys=True))
        return
    names = list(per)
    rows = [[key] + [_fmt(shared[key])] * len(names) for key in _SHARED_ROWS]
    rows += [[key] + [_fmt(per[n][key]) for n in names] for key in _ESTIMATOR_ROWS]
    s = shared["settings"]
    caption = (f"λ={shared['lam']:.4g} ({shared['lam_source']}), α={s['alpha']}, β={s['beta']}, ε_w={s['eps_w']}, "
               f"norm_by_std={_fmt(s['norm_by_std'])}, delta_clip={_fmt(s['delta_clip'])}")
    if fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["metric", *names])
        w.writerows(rows)
    elif fmt == "markdown":
        typer.echo("| metric | " + " | ".join(names) + " |")
        typer.echo("|---|" + "---:|" * len(names))
        for r in rows:
            typer.echo("| " + " | ".join(r) + " |")
        typer.echo(f"\n{caption}")
    else:
        from rich.table import Table

        table = Table(title=f"{iter_dir}: estimators compared", caption=caption)
        table.add_column("metric")
        for n in names:
            table.add_column(n, justify="right")
        for r in rows:
            table.add_row(*r)
        _console(width=max(120, 36 + 14 * len(names))).print(table)
