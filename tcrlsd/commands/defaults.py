"""Help texts that print the value in force, not a number written into the code.

A flag whose default comes from params.yaml says so in its help with a placeholder
``{default:SECTION.KEY}``; :class:`InForceCommand` (the class of every ``tcrlsd`` command) replaces
it when the help is shown, with "default: 12 from ./params.yaml" read from the project the command
would use (:func:`tcrlsd.params.value_in_force`), so the help and the run agree.
"""

from __future__ import annotations

import re

from typer.core import TyperCommand

__all__ = ["InForceCommand", "fill_defaults"]

_PLACEHOLDER = re.compile(r"\{default:(\w+)\.(\w+)\}")


def _value(match: re.Match) -> str:
    from tcrlsd.params import value_in_force

    return value_in_force(match.group(1), match.group(2))


def fill_defaults(text: str) -> str:
    """``text`` with each ``{default:SECTION.KEY}`` replaced by the value in force and its file."""
    return _PLACEHOLDER.sub(_value, text)


class InForceCommand(TyperCommand):
    """A typer command whose options' help placeholders are filled when the help is shown."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.params:
            template = getattr(param, "_help_template", None) or getattr(param, "help", None)
            if template and _PLACEHOLDER.search(template):
                param._help_template = template
                param.help = fill_defaults(template)
        return super().format_help(ctx, formatter)
