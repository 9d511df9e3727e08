"""The ``tcrlsd`` command line: tools people run by hand around the DVC stages.

Each command lives in ``tcrlsd/commands/<module>.py`` and imports heavy libraries (torch,
transformers, math-verify) inside its body, so ``tcrlsd --help`` and the light commands start fast.
"""

from __future__ import annotations

import importlib

import typer

from tcrlsd.commands.defaults import InForceCommand

app = typer.Typer(
    name="tcrlsd",
    help=(
        "RLVR for math, densified by teacher critiques. The training iterations run with "
        "`dvc repro` (`tcrlsd iterate N` adds N and runs it); these commands grade answers, switch "
        "params.yaml to a preset run, recompute and compare advantages offline from what an "
        "iteration stored, inspect an iteration's samples token by token, and write offline reports."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module under tcrlsd.commands, function, command name)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("preset", "preset", "preset"),
    ("grade", "grade", "grade"),
    ("advantages", "recompute", "recompute"),
    ("advantages", "compare", "compare"),
    ("loop", "iterate", "iterate"),
    ("loop", "prune", "prune"),
    ("loop", "report", "report"),
    ("loop", "experiment", "experiment"),
    ("inspect", "inspect", "inspect"),
)

for _module, _func, _name in COMMANDS:
    app.command(_name, cls=InForceCommand)(getattr(importlib.import_module(f"tcrlsd.commands.{_module}"), _func))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
