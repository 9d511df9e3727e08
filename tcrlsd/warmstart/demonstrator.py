"""The demonstrator the warm start imitates, and the wrong attempts its teacher contexts show.

The embedded task's difficulty dial is ``warmstart.carry_slip_rate``: the demonstrator writes each
step that needs a carry (sum) or borrow (difference) without it with that probability and carries
the wrong value through. Every warm-start target (student and teacher contexts alike) is one of its
solutions; the teacher's differ only at the steps a feedback names (:mod:`tcrlsd.warmstart.contexts`).
"""

from __future__ import annotations

import random

from tcrlsd.answers import last_boxed
from tcrlsd.synthetic import Problem, apply_op, solution_steps

ATTEMPT_DRAWS = 4  # demonstrator draws tried for a wrong attempt (a carry slips with 0.7: 1 - 0.3^4 = 99%)


def needs_carry(a: int, op: str, b: int) -> bool:
    """Whether ``a op b`` carries (``+``: the units overflow) or borrows (``-``: the units underflow)."""
    if op == "+":
        return a % 10 + b % 10 >= 10
    if op == "-":
        return a >= 0 and a % 10 < b % 10
    return False


def demonstrator_solution(problem: Problem, rng: random.Random, slip_rate: float,
                          right_steps: frozenset[int] = frozenset()) -> str:
    """The worked solution as an imperfect demonstrator writes it: each step that carries or borrows
    is written without the carry (a sum 10 too small, a difference 10 too large) with probability
    ``slip_rate``, and the wrong value is carried through the steps after it (computed right from it,
    slipping again at their own carries). Steps in ``right_steps`` (0-based) are written right from
    the value before them: the steps a feedback names. ``slip_rate`` 0 gives the gold solution.

    A policy imitating it to convergence keeps the slip rate at every carry: above 0.5 its greedy
    answer drops every carry (so its greedy accuracy is the share of problems with no carry, a
    property of the task mix), while sampling still finds the right value with 1 - slip_rate.
    """
    from tcrlsd.synthetic import solution_steps
    if slip_rate <= 0:
        return problem.solution
    out, value = [], None
    for i, (a, op, b, _) in enumerate(problem.steps):
        a = a if value is None else value
        result = apply_op(a, op, b)
        if i not in right_steps and needs_carry(a, op, b) and rng.random() < slip_rate:
            result += -10 if op == "+" else 10
        out.append((a, op, b, result))
        value = result
    return solution_steps(out, value)


def wrong_demonstrator_attempt(problem: Problem, rng: random.Random, slip_rate: float,
                               other_error_share: float) -> str | None:
    """A wrong attempt with the demonstrator's own error distribution, or None (it writes this one right).

    With probability ``other_error_share`` the attempt is ``wrong_attempt``'s instead (one step off by
    a slip of 1..10 or a carry error, on any problem): the errors a sampled policy makes besides its
    systematic one.
    """
    if rng.random() < other_error_share:
        return wrong_attempt(problem, rng)
    for _ in range(ATTEMPT_DRAWS):
        text = demonstrator_solution(problem, rng, slip_rate)
        if last_boxed(text) != problem.answer:
            return text
    return None


def wrong_attempt(problem: Problem, rng: random.Random) -> str:
    """A plausible WRONG solution of ``problem``, the way the tiny policy errs.

    One step gets a wrong result -- a carry error (off by 10) or an arithmetic slip of 1..10 either
    way -- and the wrong value is carried through the remaining steps, which are computed right from
    it; the last result is boxed. Values stay >= 0 (the draw is retried; the last try is clamped).
    """
    steps = problem.steps
    for attempt in range(20):
        k = rng.randrange(len(steps))
        a, op, b, r = steps[k]
        delta = rng.choice((-10, 10)) if rng.random() < 0.4 else rng.choice((-1, 1)) * rng.randint(1, 10)
        wrong = r + delta
        if wrong < 0:
            if attempt < 19:
                continue
            wrong = r + abs(delta)
        out = list(steps[:k]) + [(a, op, b, wrong)]
        value = wrong
        for _, op2, b2, _ in steps[k + 1:]:
            nxt = apply_op(value, op2, b2)
            out.append((value, op2, b2, nxt))
            value = nxt
        if value >= 0 or attempt == 19:
            return solution_steps(out, value)
    raise AssertionError("unreachable")
