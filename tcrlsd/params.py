"""Typed, frozen params: one ``params.yaml`` section per stage, one dataclass per section.

Each library module that a stage drives defines its own frozen dataclass (``GenerateParams`` in
``tcrlsd.generate``, ...); this module turns a YAML mapping into one, rejecting unknown keys with an
error that names the valid ones, and checking each value's type. Presets in ``configs/`` are
mappings of the same shape, deep-merged over ``params.yaml`` -- not a second config system.

params.yaml is the only place a default lives. A command run by hand inside a project (a folder
holding ``params.yaml`` and ``dvc.yaml``, found by walking up from the working directory) reads
that project's params.yaml (:func:`params_in_force`) and says so on stderr; the dataclasses'
own defaults serve only outside any project, and a test keeps them equal to params.yaml's.

A field whose value names a registry entry (an estimator, a critic backend, a data format, ...) is
declared with :func:`choice`: its valid values are the registry's keys, read when checked, so the
registry is the only list of them (validation errors and ``--help`` texts come from it too).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from tcrlsd.errors import TcrlsdError

__all__ = ["Choice", "ParamsError", "PROJECT_FILES", "SECTIONS", "check_choices", "choice", "choices", "find_project",
           "section_class", "from_mapping", "load_section", "load_yaml", "merge", "params_in_force",
           "section_in_force", "value_in_force"]

# What makes a folder a project: its params and its pipeline.
PROJECT_FILES = ("params.yaml", "dvc.yaml")

# params.yaml section -> the frozen dataclass it loads into ("module:name", imported on demand).
SECTIONS = {
    "prepare": "tcrlsd.prepare.params:PrepareParams",
    "warmstart": "tcrlsd.warmstart.params:WarmstartParams",
    "generate": "tcrlsd.generate.stage:GenerateParams",
    "verify": "tcrlsd.verify.params:VerifyParams",
    "critique": "tcrlsd.critique.params:CritiqueParams",
    "score": "tcrlsd.score.params:ScoreParams",
    "advantages": "tcrlsd.advantages.params:AdvantagesParams",
    "update": "tcrlsd.update.params:UpdateParams",
    "evaluate": "tcrlsd.evaluate.core:EvaluateParams",
    "tracking": "tcrlsd.tracking:TrackingParams",
    "checkpoints": "tcrlsd.loop.retention:CheckpointParams",
}

T = TypeVar("T")


class ParamsError(TcrlsdError, ValueError):
    """A params file or section is wrong (unknown key, wrong type, missing section)."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """Field metadata: the value must be a key of a registry.

    ``registry`` returns the mapping (or tuple) when called, so that a dataclass can name a registry
    defined further down its module, and ``where`` names it in messages ("CRITICS in
    tcrlsd/critique/backends.py").
    """

    registry: Callable[[], Mapping[str, Any] | tuple]
    where: str

    def keys(self) -> tuple[str, ...]:
        return tuple(self.registry())

    def check(self, value: Any, what: str) -> None:
        """Raise ParamsError naming ``what`` and the registry's keys when ``value`` is not one of them."""
        values = value if isinstance(value, (tuple, list)) else (value,)
        keys = self.keys()
        for v in values:
            if v not in keys:
                raise ParamsError(f"{what}: {v!r} is not one of {', '.join(keys)} (the keys of {self.where})")


def choice(default: Any, registry: Callable[[], Mapping[str, Any] | tuple], where: str) -> Any:
    """A dataclass field whose value is a key of ``registry()`` (see :class:`Choice`); ``default``
    ``dataclasses.MISSING`` makes it a required key."""
    return dataclasses.field(default=default, metadata={"choice": Choice(registry, where)})


def _choice_of(f: dataclasses.Field) -> Choice | None:
    return f.metadata.get("choice")


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The values field ``name`` of dataclass ``cls`` accepts: its registry's keys (for --help, docs)."""
    c = _choice_of({f.name: f for f in dataclasses.fields(cls)}[name])
    if c is None:
        raise ValueError(f"{cls.__name__}.{name} is not a registry choice")
    return c.keys()


def check_choices(obj: Any) -> None:
    """Check every :func:`choice` field of dataclass instance ``obj`` (call it from ``__post_init__``)."""
    for f in dataclasses.fields(obj):
        c = _choice_of(f)
        if c is not None:
            c.check(getattr(obj, f.name), f.name)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ParamsError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return from_mapping(tp, value, where.removeprefix("params "))
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_mapping(cls: type[T], data: dict | None, section: str) -> T:
    """Build frozen dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"params section {section!r}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        default = _default(fields[k])
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and isinstance(default, hints[k]):
            # a nested params mapping (generate.sampling, ...) keeps the section's defaults for the
            # keys it omits: a field default such as SamplingParams(temperature=0.6) is this section's
            data[k] = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} | v
    kwargs = {k: _check_type(v, hints[k], f"params {section}.{k}") for k, v in data.items()}
    for k, v in kwargs.items():
        c = _choice_of(fields[k])
        if c is not None:
            c.check(v, f"params {section}.{k}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParamsError(f"params section {section!r}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params section {section!r}: {exc}") from None


def load_section(path: str | os.PathLike, section: str, cls: type[T], preset: str | os.PathLike | None = None) -> T:
    """Load ``section`` of the params file at ``path`` (a preset merged over it) into ``cls``."""
    data = load_yaml(path)
    if preset:
        data = merge(data, load_yaml(preset))
    if section not in data:
        raise ParamsError(f"{path}: no section {section!r}; sections found: {', '.join(data) or '(none)'}")
    return from_mapping(cls, data[section], section)


# --------------------------------------------------------------------------------------------------
# Which params file is in force


def find_project(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) holding
    ``params.yaml`` and ``dvc.yaml``; None outside any project."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / name).is_file() for name in PROJECT_FILES):
            return folder
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (``./params.yaml``)."""
    try:
        return "./" + path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def params_in_force(explicit: str | os.PathLike | None = None, *, announce: str | None = None) -> Path | None:
    """The params file a command reads: ``explicit`` when given, else the project's params.yaml,
    else None (no project: the code defaults, which equal params.yaml's).

    ``announce``: a command name; one line on stderr then says which file it read (or that it read
    none), so a reader of the output knows which defaults were used.
    """
    if explicit is not None:
        path = Path(explicit)
    else:
        root = find_project()
        path = root / "params.yaml" if root is not None else None
    if announce:
        where = _shown(path) if path is not None else "none (no params.yaml + dvc.yaml here or above: code defaults)"
        print(f"{announce}: params: {where}", file=sys.stderr)
    return path


def section_in_force(section: str, cls: type[T], explicit: str | os.PathLike | None = None, *,
                     announce: str | None = None) -> T:
    """Section ``section`` of the params file in force (:func:`params_in_force`) as ``cls``."""
    path = params_in_force(explicit, announce=announce)
    return load_section(path, section, cls) if path is not None else cls()


def section_class(section: str) -> type:
    """The dataclass of params.yaml section ``section`` (:data:`SECTIONS`)."""
    import importlib

    try:
        module, name = SECTIONS[section].split(":")
    except KeyError:
        raise ParamsError(f"no params section {section!r}; sections: {', '.join(SECTIONS)}") from None
    return getattr(importlib.import_module(module), name)


def _show_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def value_in_force(section: str, key: str) -> str:
    """``"default: VALUE from FILE"`` for help texts: what a user gets by omitting the flag.

    Reads the project's params.yaml (announcing nothing); outside a project, the code default of
    the section's dataclass, which equals params.yaml's.
    """
    cls = section_class(section)
    root = find_project()
    if root is None:
        return f"default: {_show_value(getattr(cls(), key))}, built in (no project here)"
    path = root / "params.yaml"
    try:
        return f"default: {_show_value(getattr(load_section(path, section, cls), key))} from {_shown(path)}"
    except ParamsError as exc:
        return f"default: unreadable ({exc})"
