"""The synthetic task behind the embedded default: multi-step arithmetic with worked solutions.

A problem is a chain of operations on a starting number ("Start with 12. Add 7, then multiply by
3, then subtract 5. What is the result?"); its gold solution writes one step per line
("12 + 7 = 19") and ends with the final answer in ``\\boxed{}``. The level is the number of
operations, so difficulty is a dial: a tiny model learns level 1 quickly and level 4 slowly, which
gives the mixed GRPO groups that RL needs. Everything is a pure function of the seed.

Every value stays in 0..VALUE_CAP (two digits) and multipliers are 2 or 3, so that the embedded
0.9M-parameter policy learns the task in a few CPU minutes: carries in two-digit sums and
differences are then what it still gets wrong, at every level. (With three-digit values and
multipliers up to 5, the same 2000-step warm-start reached 9% greedy accuracy instead of 26%.)
"""

from __future__ import annotations

import operator

import random
from dataclasses import dataclass
from typing import Callable

from tcrlsd.errors import InputError

__all__ = ["Problem", "make_problem", "make_problems", "solution_steps", "ANSWER_LINE"]

ANSWER_LINE = "The answer is \\boxed{{{}}}."
_OPS = {"add": "+", "subtract": "-", "multiply by": "*"}


@dataclass(frozen=True)
class Problem:
    problem: str
    solution: str
    answer: str
    level: int
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op symbol, right, result)


# THE arithmetic of a step's operator symbol (the task, its reference critic and the warm start's
# demonstrator all compute a step with it)
OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for an operator symbol of :data:`OPS`."""
    return OPS[op](a, b)


VALUE_CAP = 99  # every start, operand and intermediate result stays in 0..VALUE_CAP
MAX_MULTIPLIER = 3


def make_problem(rng: random.Random, level: int, max_operand: int = 20) -> Problem:
    """One problem with ``level`` operations; every value stays in 0..VALUE_CAP.

    ``max_operand`` bounds the start number and the added / subtracted operands.
    """
    if not 2 <= max_operand <= VALUE_CAP - 1:
        raise InputError(f"max_operand must be in 2..{VALUE_CAP - 1}; got {max_operand}")
    value = rng.randint(2, max_operand)
    start = value
    words, steps = [], []
    for _ in range(level):
        # value >= 1 always (subtraction leaves at least 1), so "add" is always possible
        choices = (["add"] if value < VALUE_CAP else []) + (["subtract"] if value >= 2 else [])
        choices += ["multiply by"] if 2 * value <= VALUE_CAP else []
        verb = rng.choice(choices)
        op = _OPS[verb]
        if op == "*":
            b = rng.randint(2, min(MAX_MULTIPLIER, VALUE_CAP // value))
        elif op == "-":
            b = rng.randint(1, min(value - 1, max_operand))
        else:
            b = rng.randint(1, min(max_operand, VALUE_CAP - value))
        result = apply_op(value, op, b)
        steps.append((value, op, b, result))
        words.append(f"{verb} {b}")
        value = result
    chain = ", then ".join(words)
    problem = f"Start with {start}. {chain[0].upper() + chain[1:]}. What is the result?"
    solution = solution_steps(steps, value)
    return Problem(problem, solution, str(value), level, tuple(steps))


def solution_steps(steps, final: int) -> str:
    lines = [f"{a} {op} {b} = {r}" for a, op, b, r in steps]
    lines.append(ANSWER_LINE.format(final))
    return "\n".join(lines)


def make_problems(n: int, seed: int, levels: tuple[int, ...] = (1, 2, 3, 4), max_operand: int = 20) -> list[Problem]:
    """``n`` problems, levels cycling through ``levels``, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [make_problem(rng, levels[i % len(levels)], max_operand) for i in range(n)]
