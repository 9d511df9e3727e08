"""The warm start's text: prompts, tokenizer corpus, SFT examples (student and teacher contexts)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from tcrlsd.errors import InputError
from tcrlsd.reference_critic import CONTENT_FREE_FEEDBACK, reference_critique
from tcrlsd.synthetic import Problem, make_problems
from tcrlsd.templates import default_templates_dir, load_template, render_critic_prompt
from tcrlsd.warmstart.contexts import (
    critic_example,
    critique_teacher_example,
    gold_teacher_example,
    load_templates,
    teacher_prompt,
)
from tcrlsd.warmstart.demonstrator import (  # noqa: F401  (re-exported: bench/diagnose_errors.py, tests)
    demonstrator_solution,
    needs_carry,
    wrong_attempt,
    wrong_demonstrator_attempt,
)
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
            raise InputError(
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
        out.append(reference_critique(wrong_attempt(p, rng), p.solution).text or "")  # the real phrasing
    out.append(CONTENT_FREE_FEEDBACK)
    return out


def template_sentences(params: WarmstartParams, problems: Sequence[Problem]) -> list[str]:
    """The fixed text of the contexts the warm start trains on (teacher and critic templates), for the tokenizer."""
    templates = load_templates()
    out = []
    for p in problems:
        attempt = p.solution
        out.append(teacher_prompt(params.prompt_template, p.problem, CONTENT_FREE_FEEDBACK, templates["teacher-critique"]))
        out.append(teacher_prompt(params.prompt_template, p.problem, p.solution, templates["teacher-gold"]))
        row = {"problem": p.problem, "response_text": attempt, "is_correct": False, "reason": "incorrect",
               "extracted_answer": p.answer, "solution": p.solution, "answer": p.answer}
        out.append(render_critic_prompt(templates["self-incorrect"], row, 6000))
    return out


def tokenizer_corpus(params: WarmstartParams) -> list[str]:
    """Task text the tokenizer is trained on: problems, solutions, the template, critiques."""
    problems = make_problems(params.tokenizer_problems, seed=params.seed + 1, levels=params.levels,
                             max_operand=params.max_operand)
    texts = [render_prompt(params.prompt_template, p.problem) + params.response_prefix + p.solution for p in problems]
    texts += critique_like_sentences(problems[: max(1, len(problems) // 4)], seed=params.seed + 2)
    texts += template_sentences(params, problems[: max(1, len(problems) // 40)])
    return texts


def build_tokenizer(params: WarmstartParams):
    from tcrlsd.policy import train_tokenizer

    return train_tokenizer(tokenizer_corpus(params), vocab_size=params.vocab_size)


# --------------------------------------------------------------------------------------------------
# SFT data


# What an example trains the policy to be: the student (student prompt -> demonstrator), the teacher
# (critique / content-free / gold context -> the fairness rule's target) or the critic of self mode.
ROLES = ("student", "critique", "blank", "gold", "critic")


@dataclass(frozen=True)
class SftExample:
    input_ids: tuple[int, ...]  # prompt ids + response ids
    labels: tuple[int, ...]  # IGNORE on the prompt, the response ids (EOS included) after it
    prompt_len: int
    role: str = "student"  # one of ROLES

    @property
    def teacher_context(self) -> bool:
        """The prompt is a teacher context (problem + feedback), not the student's nor a critic prompt."""
        return self.role in ("critique", "blank", "gold")


def _norm(text: str) -> str:
    return " ".join(text.split())


def sft_problems(params: WarmstartParams, exclude: Iterable[str] = ()) -> list[Problem]:
    """The SFT corpus: ``sft_problems`` problems from this section's seed, minus ``exclude`` texts."""
    banned = {_norm(t) for t in exclude}
    problems = make_problems(params.sft_problems, seed=params.seed, levels=params.levels, max_operand=params.max_operand)
    kept = [p for p in problems if _norm(p.problem) not in banned]
    if not kept:
        raise InputError("every SFT problem also appears in the prompts file; raise warmstart.sft_problems")
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
    return teacher_prompt(prompt_template, problem.problem, reply.text, template), reply.text


def draw_role(rng: random.Random, params: WarmstartParams) -> str:
    """The role a problem is trained in: a seeded categorical draw over the params' shares."""
    u = rng.random()
    for role, share in (("feedback", params.teacher_context_fraction), ("gold", params.gold_context_fraction),
                        ("critic", params.critic_fraction)):
        if u < share:
            return role
        u -= share
    return "student"


def sft_examples(tokenizer, params: WarmstartParams, problems: Sequence[Problem]) -> list[SftExample]:
    """The SFT sequences, one per problem, in a seeded role (:data:`ROLES`, :func:`draw_role`).

    Student: the student prompt -> the demonstrator's solution (``carry_slip_rate``). The other roles
    (teacher contexts and critic prompts) follow :mod:`tcrlsd.warmstart.contexts` and its fairness
    rule: a teacher-context target is the demonstrator's solution except at the step the feedback
    names. A ``feedback`` problem becomes a ``blank`` (content-free) example with probability
    ``blank_feedback_share``; a ``feedback`` or ``critic`` problem without a wrong attempt (the
    demonstrator writes it right) becomes a student example. The loss is on the response only.
    """
    rng = random.Random(params.seed + 3)  # roles and attempts
    slips = random.Random(params.seed + 4)  # targets: its own stream
    templates = None
    out = []
    for p in problems:
        role = draw_role(rng, params)
        attempt = None
        if role in ("feedback", "critic"):
            attempt = wrong_demonstrator_attempt(p, rng, params.carry_slip_rate, params.other_error_share)
            if attempt is None:
                role = "student"
        if role == "feedback":
            role = "blank" if rng.random() < params.blank_feedback_share else "critique"
        if role != "student" and templates is None:
            templates = load_templates()
        if role in ("critique", "blank"):
            prompt, _, target = critique_teacher_example(p, attempt, params.prompt_template, slips,
                                                         params.carry_slip_rate, templates["teacher-critique"],
                                                         blank=role == "blank")
        elif role == "gold":
            prompt, target = gold_teacher_example(p, params.prompt_template, templates["teacher-gold"])
        elif role == "critic":
            prompt, target = critic_example(tokenizer, p, attempt, templates["self-incorrect"])
        else:
            prompt = render_prompt(params.prompt_template, p.problem)
            target = demonstrator_solution(p, slips, params.carry_slip_rate)
        out.append(dataclasses.replace(sft_example(tokenizer, prompt, params.response_prefix + target), role=role))
    return out
