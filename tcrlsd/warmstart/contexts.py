"""The warm start's non-student examples: teacher contexts (critique, content-free, gold) and critic prompts.

The policy plays three roles in the pipeline besides the student: the teacher of the score stage
(the problem with feedback in its context), the critic of ``critique.mode: self`` and the teacher of
``gold``. Each is trained here on text rendered exactly as the critique stage renders it.

**The fairness rule** (issue 20). A teacher-context target is what the student-context demonstrator
would write (:func:`tcrlsd.warmstart.data.demonstrator_solution`: the same carry slip rate at every
carry) EXCEPT at what the feedback names: the step the critique corrects is written right, and the
steps after it continue from the corrected value, slipping again at their own carries. So the
teacher differs from the student only where the feedback's content says it should; a teacher that
wrote every carry right whenever a feedback block is present (the earlier warm start: gold targets
after every critique) would credit the critique with what the block's mere presence taught.

- critique contexts: a WRONG attempt drawn from the demonstrator itself (so critiques name carries,
  as in RL), plus a share ``other_error_share`` of attempts with another slip (``wrong_attempt``: the
  policy's rarer errors), and the reference critic's text for it; target: the rule above;
- content-free contexts (``blank_feedback_share`` of them): the same selection of problems, the
  feedback :data:`tcrlsd.reference_critic.CONTENT_FREE_FEEDBACK`, target the plain demonstrator
  (no correction), so that the presence of a block teaches nothing;
- gold contexts (``gold_context_fraction``, the ``teacher-gold`` template of ``gold`` mode): the
  gold solution names every step, so by the same rule the target is the gold solution;
- critic prompts (``critic_fraction``): the ``self-incorrect`` critic prompt with a wrong attempt of
  the demonstrator and the grader's finding, rendered as ``self`` mode renders it (chat template,
  when the tokenizer has one); target: the reference critic's text. Self-critiques then name steps
  the way the reference critic does (their agreement is in the critique metrics).

A problem whose demonstrator attempt comes out right in ``ATTEMPT_DRAWS`` draws (no carry, or every
carry written) has no wrong attempt to show; it becomes a student example.
"""

from __future__ import annotations

import random

from tcrlsd.answers import last_boxed
from tcrlsd.reference_critic import CONTENT_FREE_FEEDBACK, named_step, reference_critique
from tcrlsd.synthetic import Problem
from tcrlsd.warmstart.demonstrator import demonstrator_solution
from tcrlsd.templates import (
    Template,
    default_templates_dir,
    load_template,
    render_chat,
    render_critic_prompt,
    render_teacher_prompt,
    split_student_prompt,
)

CRITIC_PROMPT_CHARS = 6000  # critique.max_response_chars' role; synthetic attempts are far shorter

# template names, as the critique stage loads them for the modes that use them
TEMPLATE_NAMES = ("teacher-critique", "teacher-gold", "self-incorrect")


def load_templates(folder=None) -> dict[str, Template]:
    folder = folder or default_templates_dir()
    return {name: load_template(folder, name) for name in TEMPLATE_NAMES}


def critique_teacher_example(problem: Problem, attempt: str, prompt_template: str, rng: random.Random,
                             slip_rate: float, template: Template, blank: bool = False) -> tuple[str, str, str]:
    """``(teacher_prompt, feedback, target solution)`` for a wrong ``attempt`` at ``problem``.

    The feedback is the reference critic's (final answer not revealed: the default) or, ``blank``,
    the content-free sentence; the target follows the fairness rule (module docstring).
    """
    if blank:
        feedback, right = CONTENT_FREE_FEEDBACK, frozenset()
    else:
        reply = reference_critique(attempt, problem.solution)
        if reply.text is None:
            raise ValueError(f"reference critic gave no feedback for a synthetic attempt: {reply.error}")
        feedback = reply.text
        k = named_step(feedback)
        right = frozenset() if k is None else frozenset({k - 1})
    prompt = teacher_prompt(prompt_template, problem.problem, feedback, template)
    return prompt, feedback, demonstrator_solution(problem, rng, slip_rate, right)


def teacher_prompt(prompt_template: str, problem: str, feedback: str, template: Template) -> str:
    """The teacher context the critique stage writes for ``feedback`` (its own split and rendering)."""
    prefix, text, instruction = split_student_prompt(prompt_template.replace("{problem}", problem), problem)
    return render_teacher_prompt(template, prefix, text, instruction, feedback)


def gold_teacher_example(problem: Problem, prompt_template: str, template: Template) -> tuple[str, str]:
    """``(teacher_prompt, target)`` of ``gold`` mode: the gold solution in the context names every
    step, so by the fairness rule every step is written right."""
    return teacher_prompt(prompt_template, problem.problem, problem.solution, template), problem.solution


def critic_example(tokenizer, problem: Problem, attempt: str, template: Template) -> tuple[str, str]:
    """``(critic prompt text, reference critique)`` for ``self`` mode: the prompt as the critique stage
    renders it for a wrong rollout (``render_critic_prompt``, then the chat template if any)."""
    boxed = last_boxed(attempt)
    row = {"problem": problem.problem, "response_text": attempt, "is_correct": False,
           "reason": "incorrect" if boxed is not None else "no_answer", "extracted_answer": boxed,
           "solution": problem.solution, "answer": problem.answer}
    reply = reference_critique(attempt, problem.solution)
    if reply.text is None:
        raise ValueError(f"reference critic gave no feedback for a synthetic attempt: {reply.error}")
    return render_chat(tokenizer, render_critic_prompt(template, row, CRITIC_PROMPT_CHARS)), reply.text
