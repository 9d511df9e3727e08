"""`tcrlsd iterate`, `tcrlsd prune`, `tcrlsd report`: grow the run by N iterations; bound its storage; plot it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from tcrlsd.loop.peers import PEERS  # light: the registry gives --presets' help its peers


def _dvc_repro() -> list[str]:
    dvc = Path(sys.executable).parent / "dvc"
    return [str(dvc) if dvc.exists() else "dvc", "repro"]


def _retention(params: Path):
    from tcrlsd.loop.retention import CheckpointParams
    from tcrlsd.params import ParamsError, load_section

    try:
        return load_section(params, "checkpoints", CheckpointParams)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def iterate(
    n: int = typer.Argument(1, help="How many iterations to append to iterations.yaml."),
    iterations: Path = typer.Option(Path("iterations.yaml"), help="The iterations file dvc.yaml reads."),
    repro: bool = typer.Option(True, "--repro/--no-repro", help="Run `dvc repro` after appending."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file (its checkpoints section: retention)."),
    stage_host: bool = typer.Option(True, "--stage-host/--no-stage-host",
                                    help="Run the stages through a warm stage host (tcrlsd/stagehost.py): one process "
                                         "imports torch/transformers once and forks each stage, same outputs; "
                                         "--no-stage-host: every stage a new interpreter, as plain `dvc repro`."),
) -> None:
    """Append N iterations (each generating with the policy the one before it wrote) and run them.

    One iteration at a time: append it, `dvc repro`, then delete what params checkpoints does not
    keep (tcrlsd/loop/retention.py). Only the new iterations' stages (and the summary) run; earlier
    ones stay as they are.
    """
    from tcrlsd.code import ensure_ignored
    from tcrlsd.stagehost import host_blockers, stage_host as host

    keep = _retention(params)
    root = iterations.parent
    for line in ensure_ignored(root):
        typer.echo(f"added to .dvcignore: {line}")
    logs = root / ".dvc" / "tmp"
    blockers = host_blockers(params) if stage_host and repro else []
    if blockers:
        typer.echo(f"stage host off: {', '.join(blockers)} (vLLM's engine is not run from the host's forked "
                   "processes); every stage runs as its own process")
    with host(log_path=logs / "stage-host.log" if logs.is_dir() else None,
              enabled=stage_host and repro and not blockers) as env:
        _iterate(n, iterations, repro, keep, root, env)


def _iterate(n: int, iterations: Path, repro: bool, keep, root: Path, env: dict) -> None:
    """The loop of `iterate`: append, `dvc repro` in ``env``, prune; one iteration at a time."""
    from tcrlsd.loop.iterations import IterationsError, append_iterations
    from tcrlsd.loop.retention import plan_ignores, prune

    for _ in range(n if repro else 1):
        try:
            new = append_iterations(iterations, 1 if repro else n)
        except IterationsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        plan_ignores(root, iterations, keep)
        for it in new:
            typer.echo(f"{iterations}: added iteration {it.key} (k={it.k}): {it.policy} -> {it.next_policy}")
        if not repro:
            return
        cmd = _dvc_repro()
        typer.echo(f"running: {' '.join(cmd)}")
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise typer.Exit(code)
        for line in prune(root, iterations, keep).lines():
            typer.echo(line)


def prune(
    iterations: Path = typer.Option(Path("iterations.yaml"), help="The iterations file dvc.yaml reads."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file (its checkpoints section)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
) -> None:
    """Delete the checkpoint weights and optimizer states params checkpoints does not keep.

    Also lists in .dvcignore the weights of the checkpoints not written yet that the rule will delete
    (so DVC never tracks them). `tcrlsd iterate` does both around each iteration; with a `dvc repro`
    of your own, run it before and after (never while one runs). Only weights that are out of DVC
    are deleted, so `dvc status` stays clean.
    """
    from tcrlsd.loop.iterations import IterationsError
    from tcrlsd.loop.retention import plan_ignores, prune as prune_run

    keep = _retention(params)
    try:
        if not dry_run:
            for line in plan_ignores(iterations.parent, iterations, keep):
                typer.echo(f"listed in .dvcignore: {line}")
        report = prune_run(iterations.parent, iterations, keep, dry_run=dry_run)
    except IterationsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for line in report.lines() or ["nothing to delete"]:
        typer.echo(("(dry run) " if dry_run else "") + line)


def report(
    table: Path = typer.Option(Path("data/summary/iterations.csv"), help="The summarize stage's table."),
    baseline: Path = typer.Option(Path("data/metrics/evaluate-baseline.json"),
                                  help="The baseline evaluation (starting policy)."),
    out: Path = typer.Option(Path("reports"), help="Folder for report.md and the PNG plots."),
    title: str = typer.Option("tcrlsd run", help="Title of the Markdown report."),
    live: Path = typer.Option(None, help="The live tracking folder (DVCLive) for the per-step figure; "
                                         "default: params.yaml's tracking.dir when the project has one."),
) -> None:
    """Write PNG plots over iterations and a Markdown summary (no network needed to view them)."""
    from tcrlsd.loop.report import write_report
    from tcrlsd.tracking import load_tracking

    if live is None and Path("params.yaml").exists():
        try:
            tracking = load_tracking("params.yaml")
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        live = Path(tracking.dir) if tracking and tracking.dvclive else None

    if not table.exists():
        typer.echo(f"error: {table} not found; run `dvc repro` first (the summarize stage writes it)", err=True)
        raise typer.Exit(2)
    md = write_report(table, out, baseline=baseline, title=title, live=live)
    typer.echo(f"wrote {md} and {len(list(out.glob('*.png')))} PNG plot(s) in {out}")


def experiment(
    presets: str = typer.Option(..., help="Comma-separated preset names (configs/presets) or YAML paths; a peer "
                                          "name is another trainer from the same warm start, not a preset file: "
                                          + "; ".join(f"{n} ({p.about})" for n, p in PEERS.items()) + "."),
    iterations: int = typer.Option(..., help="Training iterations per run."),
    seeds: int = typer.Option(1, help="Seeds per preset (0..S-1; sets generate/update/critique seeds)."),
    out: Path = typer.Option(..., help="Folder for the runs' workspaces, the shared DVC cache and the results."),
    params: Path = typer.Option(None, help="Base params every run starts from (default: the project's "
                                           "params.yaml, found from the working directory)."),
    setting: Path = typer.Option(None, help="A params-shaped YAML applied to every run before its preset "
                                            "(e.g. configs/experiments/saturated.yaml: another task mix)."),
    presets_dir: Path = typer.Option(None, help="Where named presets live (default: the project's configs/presets)."),
    cache: Path = typer.Option(None, help="DVC cache folder (default: OUT/cache). Another experiment's cache "
                                          "lets DVC restore its identical prepare and warm start instead of rerunning them."),
    jobs: int = typer.Option(1, help="Runs at a time (after the shared warm start); each stage then gets "
                                     "cpu_count // jobs torch threads."),
    doc: Path = typer.Option(None, help="Also write the report here (e.g. docs/RESULTS.md), figures beside it."),
    title: str = typer.Option("Experiment", help="Title of the report."),
    intro: Path = typer.Option(None, help="A Markdown file whose text opens the report (the setting, the question)."),
    aims: Path = typer.Option(None, help="The research aims the report checks (a YAML list: name, run, reference, "
                                         "margin_points; default: the project's configs/aims.yaml; none if absent)."),
    final_split: str = typer.Option(None, help="Evaluate each run's last policy on this held-out split of the "
                                               "prompts file (test: prepare's test split, read by nothing else) "
                                               "and add the final table, paired by seed, to the report."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: rewrite the results and the report "
                                     "from the workspaces as they are (the recorded command omits this flag)."),
    stage_host: bool = typer.Option(True, "--stage-host/--no-stage-host",
                                    help="Each run's stages through a warm stage host (tcrlsd/stagehost.py; same "
                                         "outputs, no per-stage torch/transformers import); --no-stage-host: a new "
                                         "interpreter per stage."),
) -> None:
    """Run each preset x seed from the same warm start (resumable); write results.csv, results.md, PNGs.

    Each run is a workspace DIR/runs/PRESET-sSEED sharing one DVC cache; rerunning the same command
    continues where it stopped. The report has the validation table (peak/final, mean ± std over
    seeds), the training signals, a comparison paired by seed against grpo, and the curves.
    """
    import shlex
    import sys
    from tcrlsd.loop.experiment import run_experiment
    from tcrlsd.loop.results import load_aims
    from tcrlsd.params import ParamsError, find_project, params_in_force

    names = [p.strip() for p in presets.split(",") if p.strip()]
    if not names or iterations < 1 or seeds < 1:
        typer.echo("error: give at least one preset, --iterations >= 1 and --seeds >= 1", err=True)
        raise typer.Exit(2)
    root = find_project()
    if root is None:
        typer.echo("error: no params.yaml + dvc.yaml here or above; run `tcrlsd experiment` inside the project",
                   err=True)
        raise typer.Exit(2)
    params = params_in_force(params, announce="experiment")
    presets_dir = presets_dir or root / "configs" / "presets"
    aims = aims or root / "configs" / "aims.yaml"
    try:
        argv = [a for a in sys.argv[2:] if a != "--report-only"]
        command = "tcrlsd experiment " + shlex.join(argv) if len(sys.argv) > 1 else ""
        text = intro.read_text() if intro else ""
        run_experiment(root, params, names, list(range(seeds)), iterations, out, presets_dir, log=typer.echo,
                       jobs=max(1, jobs), command=command, doc=doc, title=title, intro=text,
                       setting=setting, report_only=report_only,
                       cache=cache, aims=load_aims(aims), final_split=final_split, host=stage_host)
    except (ParamsError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {out / 'results.csv'}, {out / 'results.md'} and PNG curves")
