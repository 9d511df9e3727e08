"""math-verify, imported with one compatibility fix for the antlr4 4.9.3 runtime.

Why this module exists: tcrlsd installs ``math-verify[antlr4_9_3]`` (0.9.0, with
latex2sympy2_extended 1.11.0) because dvc pins antlr4 4.9.3 through hydra. latex2sympy2_extended
1.11 converts an ``atom`` by asking the parse-tree node, among other things,
``atom.FUNC_GAMMA()`` -- a method that only its antlr 4.11/4.13 generated parsers have on
``AtomContext`` (in the 4.13 grammar, ``\\Gamma`` can be an atom). The 4.9.3 generated parser's
``AtomContext`` has no such method, so every atom that reaches that check -- a percentage such as
``28\\%`` is the common one -- raises ``AttributeError``; math-verify swallows it and falls back to
string comparison, so ``\\boxed{28\\%}`` never matches a gold ``0.28``.

The fix: give the 4.9.3 ``AtomContext`` a ``FUNC_GAMMA`` that returns ``None``. That is exactly
what the generated accessor would return there, because the 4.9 grammar never puts a FUNC_GAMMA
token inside an atom. With it, math-verify's own test suite goes from 282 passed / 1 failed to
283 passed (measured, see /work/shared/FACTS.md). The patch is applied at import of this module,
is idempotent, and touches nothing when the parser already has the method (antlr 4.11/4.13).

Import math-verify through this module (``from tcrlsd.verify.mathverify_compat import parse, verify``)
so the fix is always in place. This module imports sympy and antlr (~0.4 s): import it inside
functions in anything the CLI loads at startup.
"""

from __future__ import annotations

from latex2sympy2_extended.antlr_parser import PSParser
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

__all__ = [
    "PERCENT_FIX_NEEDED",
    "ExprExtractionConfig",
    "LatexExtractionConfig",
    "TimeoutException",
    "apply_percent_fix",
    "parse",
    "verify",
]


def _no_func_gamma(self):
    """The 4.9.3 grammar has no FUNC_GAMMA alternative in ``atom``: there is never such a child."""
    return


# True when this antlr runtime's generated parser lacks the accessor (4.9.3), before patching.
PERCENT_FIX_NEEDED: bool = not hasattr(PSParser.AtomContext, "FUNC_GAMMA")


def apply_percent_fix() -> bool:
    """Add ``AtomContext.FUNC_GAMMA`` when missing; returns whether it was added now (idempotent)."""
    if hasattr(PSParser.AtomContext, "FUNC_GAMMA"):
        return False
    PSParser.AtomContext.FUNC_GAMMA = _no_func_gamma
    return True


apply_percent_fix()
