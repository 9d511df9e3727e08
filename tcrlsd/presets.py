"""Presets: params.yaml-shaped files in ``configs/presets/`` merged INTO params.yaml.

A preset is not a second config system: applying one rewrites the listed keys of params.yaml
(comments and order kept), so DVC sees ordinary param changes and re-runs exactly the stages
that read them. The six runs of the method note are one preset each.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tcrlsd.params import ParamsError, load_yaml

__all__ = ["list_presets", "apply_preset", "preset_path"]


def list_presets(presets_dir: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def preset_path(name_or_path: str, presets_dir: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = Path(presets_dir) / f"{name_or_path}.yaml"
    if not q.exists():
        known = ", ".join(list_presets(presets_dir)) or "(none)"
        raise ParamsError(f"no preset {name_or_path!r} in {presets_dir}; known presets: {known}")
    return q


def _set_keys(target, override: dict, where: str, changes: list[tuple[str, object, object]]) -> None:
    for key, value in override.items():
        if key not in target:
            raise ParamsError(f"preset sets {where}{key}, which params.yaml does not have")
        if isinstance(value, dict):
            _set_keys(target[key], value, f"{where}{key}.", changes)
        elif target[key] != value:
            changes.append((f"{where}{key}", target[key], value))
            target[key] = value


def apply_preset(params_path: str | os.PathLike, preset: str | os.PathLike) -> list[tuple[str, object, object]]:
    """Write the preset's keys into ``params_path``; returns (key, old, new) for each change.

    Only keys that already exist in params.yaml may be set (a typo in a preset is an error, not a
    silently added key). The file is rewritten atomically with comments preserved.
    """
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    override = load_yaml(preset)
    yaml = YAML()
    yaml.preserve_quotes = True
    data = yaml.load(params_path.read_text())
    changes: list[tuple[str, object, object]] = []
    _set_keys(data, override, "", changes)
    fd, tmp = tempfile.mkstemp(prefix=".params.", suffix=".tmp", dir=params_path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.dump(data, fh)
        os.replace(tmp, params_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return changes
