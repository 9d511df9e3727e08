"""The warm start's text: prompts, tokenizer corpus, SFT examples (student and teacher contexts)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from tcrlsd.reference_critic import reference_critique
from tcrlsd.synthetic import Problem, apply_op, make_problems
from tcrlsd.templates import default_templates_dir, load_template, render_teacher_prompt, split_student_prompt
from tcrlsd.warmstart.params import IGNORE, PROBLEM_FIELD, WarmstartParams

# --------------------------------------------------------------------------------------------------
# Text


def render_prompt(template: str, problem: str) -> str:
    """The policy input for ``problem``: ``template`` with ``{problem}`` replaced.

    Plain replacement, not ``str.format``: the template holds ``\\boxed{}``, whose braces are text.
    """
    return template.replace(PROBLEM_FIELD, problem)


def check_prompt_template(template: str, problems: Sequence[str], prompts: Sequence[str], source: str) -> None:
    """Fail if the prompts artifact was rendered with another template than the SFT corpus uses.

    The warm-started model only learns to answer after prompts of the exact form it was trained on.
    """
    for row, (problem, prompt) in enumerate(zip(problems, prompts)):
        want = render_prompt(template, problem)
        if prompt != want:
            raise ValueError(
                f"{source}: row {row}: column 'prompt' is {prompt!r}, but warmstart.prompt_template renders "
                f"{want!r}; set warmstart.prompt_template to the template the prepare stage used"
            )


_CRITIQUE_PHRASES = (
    "Here is feedback on your earlier attempt:",
    "The following is feedback from your unsuccessful earlier attempt:",
    "Here is a reference solution:",
    "Correct solution:",
    "Solve the original question.",
    "Correctly solve the original question.",
    "Now solve the problem again in your own way.",
    "Your final answer is correct.",
    "Your final answer is wrong.",
    "The final answer is missing: write it inside \\boxed{}.",
    "The response stops before giving a final answer.",
    "You used the wrong number from the question.",
    "You skipped a step of the question.",
    "Check each step before you write the final answer.",
    "The problem asks for the result after every operation, in order.",
    "Feedback: the answer is not in the expected format.",
    "Each step must continue from the result of the step before it.",
    "Carry the corrected result into the steps after it.",
    "All steps are right and the boxed answer is the result of the last step; I find no error in this attempt.",
    "You are reviewing a student's attempt at a math problem.",
    "Point to the first step where the attempt goes wrong, say what is wrong with it and how to fix that step.",
)
_OP_WORDS = {"+": "adding", "-": "subtracting", "*": "multiplying by"}


def critique_like_sentences(problems: Iterable[Problem], seed: int) -> list[str]:
    """Plain-English feedback of the kind a critic writes about a wrong step, for the tokenizer.

    e.g. "Step 2 is wrong: 19 * 3 is 57, not 54." -- not training data for the model, only text the
    tokenizer should encode into words.
    """
    rng = random.Random(seed)
    out = list(_CRITIQUE_PHRASES)
    for p in problems:
        k = rng.randrange(len(p.steps))
        a, op, b, r = p.steps[k]
        wrong = r + rng.choice([-10, -2, -1, 1, 2, 10]) if r > 10 else r + 1
        out.append(f"Step {k + 1} is wrong: {a} {op} {b} is {r}, not {wrong}.")
        out.append(f"In step {k + 1} you made a mistake when {_OP_WORDS[op]} {b}; the correct value is {r}.")
        out.append(f"The final answer should be {p.answer}, not {wrong}. The first {k} steps are correct.")
    return out


def tokenizer_corpus(params: WarmstartParams) -> list[str]:
    """Task text the tokenizer is trained on: problems, solutions, the template, critiques."""
    problems = make_problems(params.tokenizer_problems, seed=params.seed + 1, levels=params.levels,
                             max_operand=params.max_operand)
    texts = [render_prompt(params.prompt_template, p.problem) + params.response_prefix + p.solution for p in problems]
    texts += critique_like_sentences(problems[: max(1, len(problems) // 4)], seed=params.seed + 2)
    return texts


def build_tokenizer(params: WarmstartParams):
    from tcrlsd.policy import train_tokenizer

    return train_tokenizer(tokenizer_corpus(params), vocab_size=params.vocab_size)


# --------------------------------------------------------------------------------------------------
# SFT data


@dataclass(frozen=True)
class SftExample:
    input_ids: tuple[int, ...]  # prompt ids + response ids
    labels: tuple[int, ...]  # IGNORE on the prompt, the response ids (EOS included) after it
    prompt_len: int
    teacher_context: bool = False  # the prompt is a teacher context (problem + feedback), not the student's


def _norm(text: str) -> str:
    return " ".join(text.split())


def sft_problems(params: WarmstartParams, exclude: Iterable[str] = ()) -> list[Problem]:
    """The SFT corpus: ``sft_problems`` problems from this section's seed, minus ``exclude`` texts."""
    banned = {_norm(t) for t in exclude}
    problems = make_problems(params.sft_problems, seed=params.seed, levels=params.levels, max_operand=params.max_operand)
    kept = [p for p in problems if _norm(p.problem) not in banned]
    if not kept:
        raise ValueError("every SFT problem also appears in the prompts file; raise warmstart.sft_problems")
    return kept


def sft_example(tokenizer, prompt_text: str, response_text: str) -> SftExample:
    """One training sequence: prompt ids as the generate stage builds them, then the response + EOS.

    Prompt and response are tokenised separately, exactly as generation sees them (prompt ids, then
    the sampled ids appended), so no merge across the boundary can differ between train and sample.
    """
    from tcrlsd.policy import encode_prompt

    prompt = encode_prompt(tokenizer, prompt_text)
    response = list(tokenizer(response_text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return SftExample(tuple(prompt + response), tuple([IGNORE] * len(prompt) + response), len(prompt))


def wrong_attempt(problem: Problem, rng: random.Random) -> str:
    """A plausible WRONG solution of ``problem``, the way the tiny policy errs.

    One step gets a wrong result -- a carry error (off by 10) or an arithmetic slip of 1..10 either
    way -- and the wrong value is carried through the remaining steps, which are computed right from
    it; the last result is boxed. Values stay >= 0 (the draw is retried; the last try is clamped).
    """
    from tcrlsd.synthetic import solution_steps

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


def needs_carry(a: int, op: str, b: int) -> bool:
    """Whether ``a op b`` carries (``+``: the units overflow) or borrows (``-``: the units underflow)."""
    if op == "+":
        return a % 10 + b % 10 >= 10
    if op == "-":
        return a >= 0 and a % 10 < b % 10
    return False


def demonstrator_solution(problem: Problem, rng: random.Random, slip_rate: float) -> str:
    """The worked solution as an imperfect demonstrator writes it: each step that carries or borrows
    is written without the carry (a sum 10 too small, a difference 10 too large) with probability
    ``slip_rate``, and the wrong value is carried through the steps after it (computed right from it,
    slipping again at their own carries). ``slip_rate`` 0 gives the gold solution (no draw is made).

    A policy imitating it to convergence keeps the slip rate at every carry: above 0.5 its greedy
    answer drops every carry (so its greedy accuracy is the share of problems with no carry, a
    property of the task mix), while sampling still finds the right value with 1 - slip_rate.
    """
    from tcrlsd.synthetic import solution_steps

    if slip_rate <= 0:
        return problem.solution
    out, value = [], None
    for a, op, b, _ in problem.steps:
        a = a if value is None else value
        result = apply_op(a, op, b)
        if needs_carry(a, op, b) and rng.random() < slip_rate:
            result += -10 if op == "+" else 10
        out.append((a, op, b, result))
        value = result
    return solution_steps(out, value)


def teacher_context(prompt_template: str, problem: Problem, attempt: str, template=None) -> tuple[str, str]:
    """``(teacher_prompt, feedback)`` for a wrong ``attempt`` at ``problem``, as the critique stage makes them.

    The feedback is the reference critic's (:func:`tcrlsd.reference_critic.reference_critique`, final answer not
    revealed: the default), and the context is rendered by the critique stage's own
    :func:`tcrlsd.templates.render_teacher_prompt` with its ``teacher-critique`` template (default
    templates folder unless ``template`` is given), from the student prompt split as it splits it.
    """
    reply = reference_critique(attempt, problem.solution)
    if reply.text is None:
        raise ValueError(f"reference critic gave no feedback for a synthetic attempt: {reply.error}")
    if template is None:
        template = load_template(default_templates_dir(), "teacher-critique")
    prefix, text, instruction = split_student_prompt(render_prompt(prompt_template, problem.problem), problem.problem)
    return render_teacher_prompt(template, prefix, text, instruction, reply.text), reply.text


def sft_examples(tokenizer, params: WarmstartParams, problems: Sequence[Problem]) -> list[SftExample]:
    """The SFT sequences: the correct solution after the student prompt or, for a seeded
    ``teacher_context_fraction`` of the problems, after a teacher context (problem + reference critique
    of a synthetic wrong attempt), so the policy can play the teacher of the critique/score stages.
    Either way the loss is on the solution tokens only. The student-context solutions come from the
    imperfect demonstrator (:func:`demonstrator_solution`, ``carry_slip_rate``); the teacher-context
    ones are always the gold solution: the feedback names the slip, and the teacher writes it right.
    """
    rng = random.Random(params.seed + 3)
    slips = random.Random(params.seed + 4)  # its own stream: slip_rate 0 leaves the other draws as they were
    template = None
    out = []
    for p in problems:
        if params.teacher_context_fraction > 0 and rng.random() < params.teacher_context_fraction:
            if template is None:
                template = load_template(default_templates_dir(), "teacher-critique")
            prompt, _ = teacher_context(params.prompt_template, p, wrong_attempt(p, rng), template)
            response = params.response_prefix + p.solution
            out.append(dataclasses.replace(sft_example(tokenizer, prompt, response), teacher_context=True))
        else:
            response = params.response_prefix + demonstrator_solution(p, slips, params.carry_slip_rate)
            out.append(sft_example(tokenizer, render_prompt(params.prompt_template, p.problem), response))
    return out
