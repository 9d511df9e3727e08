"""Prompt templates (``configs/templates``) and the rendering of critic and teacher prompts."""

from __future__ import annotations

import hashlib
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Templates


class TemplateError(ValueError):
    """A template file is missing or malformed, or a prompt does not fit its template."""


@dataclass(frozen=True)
class Template:
    id: str  # e.g. "critic-incorrect@v1"
    body: str
    path: str

    def render(self, **slots: str) -> str:
        try:
            return string.Template(self.body).substitute(slots)  # one pass: values are never re-parsed
        except KeyError as exc:
            raise TemplateError(f"{self.path}: template uses slot ${{{exc.args[0]}}}, which is not one of "
                                f"{', '.join(sorted(slots))}") from None
        except ValueError as exc:
            raise TemplateError(f"{self.path}: not a valid template ({exc}); write a literal $ as $$") from None

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()[:16]


_ID_LINE = re.compile(r"^#\s*id:\s*(\S+@v\d+)\s*$")


def default_templates_dir() -> Path:
    """``configs/templates`` of the checkout this package is installed from (editable install)."""
    return Path(__file__).resolve().parents[1] / "configs" / "templates"


def load_template(folder: str | os.PathLike, name: str) -> Template:
    path = Path(folder) / f"{name}.txt"
    if not path.exists():
        raise TemplateError(f"{path}: template file not found (critique.templates_dir = {folder})")
    lines = path.read_text().splitlines()
    m = _ID_LINE.match(lines[0]) if lines else None
    if not m:
        raise TemplateError(f"{path}: the first line must be '# id: {name}@vN' (the template's version id)")
    if not m.group(1).startswith(f"{name}@"):
        raise TemplateError(f"{path}: id {m.group(1)!r} does not match the file name {name!r}")
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return Template(m.group(1), "\n".join(lines[i:]), str(path))


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the head and the tail (the final answer lives at the end) of an over-long text."""
    if len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters omitted ...]\n{text[len(text) - tail:]}"


def grader_finding(is_correct: bool, reason: str, extracted: str | None) -> str:
    """The verdict, stated as a fact, in the words of the critic prompt."""
    if is_correct:
        return "It accepted the final answer as correct."
    if reason == "no_answer" or extracted is None:
        return "It found no final answer in \\boxed{}, so it marked the attempt wrong."
    if reason == "timeout":
        return "It could not finish checking the final answer in time, so it marked the attempt wrong."
    if reason == "unparsable":
        return f"It could not parse the final answer ({extracted}), so it marked the attempt wrong."
    return f"It extracted the final answer {extracted} and marked it wrong."


def render_critic_prompt(template: Template, row: dict, max_response_chars: int) -> str:
    return template.render(
        problem=row["problem"],
        response=truncate_middle(row["response_text"], max_response_chars),
        grader_finding=grader_finding(row["is_correct"], row["reason"], row["extracted_answer"]),
        gold_solution=row["solution"] or row["answer"],
    )


_SENTINEL = "\u0000TCRLSD-USER-TEXT\u0000"


def chat_wrap(tokenizer) -> tuple[str, str]:
    """(head, tail) the chat template puts around one user message (with generation prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise TemplateError("policy_chat_template_tokenizer: cannot locate the user message in its chat template")
    head, tail = text.split(_SENTINEL)
    return head, tail


def split_student_prompt(prompt: str, problem: str, wrap: tuple[str, str] | None = None) -> tuple[str, str, str]:
    """``(prefix, problem, instruction)`` with ``prefix + problem + instruction`` == the user text.

    The user text is ``prompt`` (unwrapped from the chat template when ``wrap`` is given). When the
    problem does not occur in it verbatim, the whole user text plays the problem (no instruction).
    """
    text = prompt
    if wrap is not None:
        head, tail = wrap
        if not (text.startswith(head) and text.endswith(tail)):
            raise TemplateError("a prompts row's `prompt` was not rendered with policy_chat_template_tokenizer's "
                                "chat template (its head/tail differ); set it to the tokenizer prepare used")
        text = text[len(head):len(text) - len(tail)]
    i = text.find(problem) if problem else -1
    if i < 0:
        return "", text, ""
    return text[:i], problem, text[i + len(problem):]


def render_teacher_prompt(template: Template, prefix: str, problem: str, instruction: str, feedback: str,
                          wrap: tuple[str, str] | None = None) -> str:
    text = template.render(prefix=prefix, problem=problem, feedback=feedback, instruction=instruction)
    if wrap is not None:
        text = wrap[0] + text + wrap[1]
    return text
