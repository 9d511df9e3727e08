"""The synthetic task's reference critic: names the first wrong step of an attempt."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tcrlsd.answers import last_boxed
from tcrlsd.synthetic import apply_op

# The reference critic's phrasing has a version id like a template file (recorded in `template`).
REFERENCE_CRITIC_ID = "reference-critic@v1"

# The content-free feedback: says only that the attempt is wrong, which the verdict already says. The
# warm start trains on it with the plain demonstrator as target, and `critique.control: blank` gives
# it to every rollout, so a feedback block's presence alone can neither teach nor explain anything.
CONTENT_FREE_FEEDBACK = "There is an error in this attempt."

# What `critique.reference_noise` does to a noisy critique (one kind per critique, drawn uniformly).
NOISE_KINDS = ("wrong_step", "wrong_value", "no_value")


@dataclass(frozen=True)
class CriticReply:
    text: str | None  # cleaned feedback; None when the critic failed
    error: str | None = None  # why there is no text (None when text is set)
    # A transient failure (timeouts, 5xx, dropped connections, after every attempt): the row is not
    # final -- its part stays unfinished and a rerun asks it again. Permanent failures are recorded.
    retryable: bool = False
    # What was done to the critique besides the critic's own text (``noise:<kind>``), for the row's record.
    control: str | None = None


# --------------------------------------------------------------------------------------------------
# reference


@dataclass(frozen=True)
class Step:
    left: int
    op: str  # "+", "-" or "*"
    right: int
    result: int


_STEP = re.compile(r"(-?\d+)[ \t]*([-+*×xX])[ \t]*(-?\d+)[ \t]*=[ \t]*(-?\d+)")
_OP_ALIASES = {"×": "*", "x": "*", "X": "*"}
_VERB = {"+": "add", "-": "subtract", "*": "multiply by"}
_PAST = {"+": "added", "-": "subtracted", "*": "multiplied by"}
_NOUN = {"+": "addition", "-": "subtraction", "*": "multiplication"}


def parse_steps(text: str, limit: int | None = None) -> list[Step]:
    """Every ``a op b = r`` in ``text``, one per line at most (the first on each line), in order.

    ``limit``: stop after that many steps (a 10 MB response costs no more than a short one).
    """
    steps = []
    for line in text.splitlines():
        m = _STEP.search(line)
        if m:
            op = _OP_ALIASES.get(m.group(2), m.group(2))
            steps.append(Step(int(m.group(1)), op, int(m.group(3)), int(m.group(4))))
            if limit is not None and len(steps) >= limit:
                break
    return steps


def _all_right(n: int) -> str:
    return "The one step is right" if n == 1 else f"All {n} steps are right"


def _same_number(text: str, value: int) -> bool:
    """``\\boxed{52}``, ``\\boxed{ 52. }`` and ``\\boxed{52.0}`` all box 52."""
    s = re.sub(r"[\s$]", "", text).rstrip(".")
    try:
        return float(s) == value
    except ValueError:
        return False


def _arithmetic(k: int, m: Step, value: int | None, last: bool) -> str:
    """The critique of an arithmetic error at step ``k`` (1-based): the right ``value``, unless ``last``
    (the right result of the last step IS the final answer) or ``value`` is None (the step only)."""
    sym = "*" if m.op == "*" else m.op
    if last or value is None:
        return (f"Step {k} has an arithmetic error: {m.left} {sym} {m.right} is not {m.result}. "
                f"Redo this {_NOUN[m.op]} carefully.")
    return (f"Step {k} has an arithmetic error: {m.left} {sym} {m.right} is {value}, not {m.result}. "
            "Carry the corrected result into the steps after it.")


def _off(value: int, rng: random.Random) -> int:
    """A plausible wrong value near ``value``: off by a carry (10) or a slip (1..3), never negative."""
    delta = rng.choice((-10, 10, -3, -2, -1, 1, 2, 3))
    return value + delta if value + delta >= 0 else value + abs(delta)


def _noisy(kind: str, mine: list[Step], i: int, true: int, n: int, reveal: bool, rng: random.Random) -> CriticReply:
    """The critique of the first wrong step ``i`` (0-based) made wrong the way ``kind`` says.

    wrong_step: another step of the attempt is named, with a wrong "right" value (a 1-step attempt
    has no other step: wrong_value then); wrong_value: the right step, a wrong value; no_value: the
    right step, no value (which says where, not what).
    """
    last = i == n - 1 and not reveal
    if kind == "wrong_step" and len(mine[:n]) > 1:
        j = rng.choice([x for x in range(len(mine[:n])) if x != i])
        return CriticReply(_arithmetic(j + 1, mine[j], _off(mine[j].result, rng), j == n - 1 and not reveal),
                           control="noise:wrong_step")
    if kind in ("wrong_step", "wrong_value"):
        wrong = _off(true, rng)
        while wrong == mine[i].result:  # "is 12, not 12" would say nothing (one delta of eight can hit it)
            wrong = _off(true, rng)
        return CriticReply(_arithmetic(i + 1, mine[i], wrong, last), control="noise:wrong_value")
    if kind == "no_value":
        return CriticReply(_arithmetic(i + 1, mine[i], None, last), control="noise:no_value")
    raise ValueError(f"unknown reference noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")


def noise_draw(rate: float, seed: int, rollout_id: str) -> tuple[str | None, random.Random]:
    """Whether (and how) the reference critique of ``rollout_id`` is made noisy: ``(kind or None, rng)``.

    Deterministic per (seed, rollout id): a string seed is hashed by ``random.Random`` the same way
    in every process and on every machine.
    """
    rng = random.Random(f"reference-noise/{seed}/{rollout_id}")
    if rate <= 0 or rng.random() >= rate:
        return None, rng
    return rng.choice(NOISE_KINDS), rng


_NAMED_STEP = re.compile(r"\bstep (\d+)\b", re.IGNORECASE)


def named_step(feedback: str | None) -> int | None:
    """The step number (1-based) a critique names first ("Step 2 has ...", "in step 3 ..."); None if none."""
    m = _NAMED_STEP.search(feedback or "")
    return int(m.group(1)) if m else None


def reference_critique(response: str, solution: str | None, reveal_final_answer: bool = False,
                       noise: str | None = None, noise_rng: random.Random | None = None) -> CriticReply:
    """A plain-language critique of the first wrong step of ``response`` against ``solution``.

    ``noise`` (one of :data:`NOISE_KINDS`, with ``noise_rng``; see :func:`noise_draw`) makes the
    critique of an arithmetic error wrong on purpose (``critique.reference_noise``); critiques of
    other errors (missing steps, wrong operands, format) are left as they are.
    """
    noise_rng = noise_rng or random.Random(0)
    gold = parse_steps(solution or "")
    if not gold:
        return CriticReply(None, "no step-by-step gold solution (the reference critic needs the synthetic format)")
    mine = parse_steps(response, limit=len(gold) + 1)  # one step past the gold ones is all it reads
    boxed = last_boxed(response)
    n = len(gold)
    ops = "operation" if n == 1 else f"{n} operations"
    if not mine:
        first = gold[0]
        if boxed is None:
            text = (f"The response has no calculation steps and no final answer in \\boxed{{}}. Work through the "
                    f"{ops} of the problem one at a time, one line each, like 'a + b = c', starting from "
                    f"{first.left}, and put the last result in \\boxed{{}}.")
        else:
            text = (f"The response gives the answer {boxed} without any calculation steps. Work through the "
                    f"{ops} one at a time, one line each, like 'a + b = c'; the first one is to "
                    f"{_VERB[first.op]} {first.right}, starting from {first.left}.")
        return CriticReply(text)
    for i, (g, m) in enumerate(zip(gold, mine)):
        k = i + 1
        if m.left != g.left:
            if i == 0:
                return CriticReply(f"Step 1 starts from {m.left}, but the problem starts with {g.left}. "
                                   "Copy the starting number from the problem.")
            return CriticReply(f"Step {k} starts from {m.left}, but the result of step {i} is {g.left}. "
                               "Each step must continue from the result of the step before it.")
        if m.op != g.op:
            return CriticReply(f"Step {k} should {_VERB[g.op]} {g.right}, as the problem says, but it "
                               f"{_PAST[m.op]} {m.right} instead.")
        if m.right != g.right:
            return CriticReply(f"In step {k} the problem says to {_VERB[g.op]} {g.right}, but the step uses "
                               f"{m.right}. Copy the number from the problem.")
        true = apply_op(m.left, m.op, m.right)
        if m.result != true:
            if noise is not None:
                return _noisy(noise, mine, i, true, n, reveal_final_answer, noise_rng)
            return CriticReply(_arithmetic(k, m, true, last=i == n - 1 and not reveal_final_answer))
    if len(mine) < n:
        nxt = gold[len(mine)]
        done = len(mine)
        return CriticReply(f"The first {done} step{'s are' if done > 1 else ' is'} right, but the work stops "
                           f"there: the problem has {n} operations. The next one is to "
                           f"{_VERB[nxt.op]} {nxt.right}.")
    if len(mine) > n:
        return CriticReply(f"{_all_right(n)} and the problem is finished after step {n}, but "
                           f"step {n + 1} is an operation the problem does not ask for. "
                           f"The answer is the result of step {n}.")
    last = mine[-1].result
    if boxed is None:
        return CriticReply(f"{_all_right(n)}, but the final answer is not "
                           "written in \\boxed{}. Put the result of the last step in \\boxed{}.")
    if not _same_number(boxed, last):
        tail = f" Box {last}." if reveal_final_answer else f" Box the result of step {n}."
        return CriticReply(f"{_all_right(n)}, but the boxed answer ({boxed}) "
                           f"is not the result of the last step.{tail}")
    return CriticReply(f"{_all_right(n)} and the boxed answer is the result "
                       "of the last step; I find no error in this attempt.")
