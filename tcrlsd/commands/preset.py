"""`tcrlsd preset`: apply one of the method note's runs (configs/presets/) to params.yaml."""

from __future__ import annotations

from pathlib import Path

import typer


def preset(
    name: str = typer.Argument(None, help="Preset name (a file stem in --presets-dir; --list lists them) or a YAML path."),
    params: Path = typer.Option(None, help="The params file to update (default: the project's params.yaml, "
                                           "found from the working directory)."),
    presets_dir: Path = typer.Option(None, help="Where named presets live (default: the project's configs/presets)."),
    list_: bool = typer.Option(False, "--list", help="List the known presets and exit."),
) -> None:
    """Merge a preset's keys into params.yaml (comments kept); `dvc repro` then re-runs what changed."""
    from tcrlsd.params import ParamsError, find_project, params_in_force
    from tcrlsd.presets import apply_preset, list_presets, preset_path

    root = find_project() or Path.cwd()
    presets_dir = presets_dir or root / "configs" / "presets"
    if list_ or name is None:
        for n in list_presets(presets_dir):
            typer.echo(n)
        return
    params = params_in_force(params, announce="preset")
    if params is None:
        typer.echo("error: no params.yaml + dvc.yaml here or above; run inside the project or give --params", err=True)
        raise typer.Exit(2)
    try:
        changes = apply_preset(params, preset_path(name, presets_dir))
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if not changes:
        typer.echo(f"{params}: already matches preset {name}")
    for key, old, new in changes:
        typer.echo(f"{params}: {key}: {old} -> {new}")
