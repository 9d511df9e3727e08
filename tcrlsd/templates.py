"""Prompt templates (``configs/templates``) and the rendering of critic and teacher prompts."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from tcrlsd.errors import TcrlsdError

# --------------------------------------------------------------------------------------------------
# Templates


class TemplateError(TcrlsdError, ValueError):
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


# Chat templates that print "today" (Llama 3.x: ``date_string`` if given, else ``strftime_now``; Granite:
# ``strftime_now``) get this date, so a rendered prompt does not change from one day to the next (nor
# do its token ids, the teacher contexts, or the resume fingerprints built on them). 26 Jul 2024 is
# Llama 3.1's own default when neither is available.
FIXED_CHAT_DATE = datetime.datetime(2024, 7, 26)


def chat_template_kwargs(extra: dict | None = None) -> dict:
    """Keyword arguments for ``apply_chat_template``: the fixed ``date_string``, then ``extra`` (which wins)."""
    return {"date_string": FIXED_CHAT_DATE.strftime("%d %b %Y"), **(extra or {})}


@contextlib.contextmanager
def _fixed_template_clock():
    """While rendering, transformers' template global ``strftime_now`` (``datetime.now()`` of its
    chat-template module) reads :data:`FIXED_CHAT_DATE`.

    A replacement ``strftime_now`` cannot be passed as a template argument: transformers 5 reduces
    template arguments to plain data. So the module's ``datetime`` is swapped for the render and put
    back after it (rendering is single-threaded in every stage).
    """
    try:
        from transformers.utils import chat_template_utils as ctu
    except ImportError:  # transformers moved it: date_string still covers the Llama 3.x templates
        yield
        return
    real = getattr(ctu, "datetime", None)
    if not isinstance(real, type) or not issubclass(real, datetime.datetime):
        yield
        return

    class _Fixed(real):
        @classmethod
        def now(cls, tz=None):
            return FIXED_CHAT_DATE.replace(tzinfo=tz)

    ctu.datetime = _Fixed
    try:
        yield
    finally:
        ctu.datetime = real


def render_user_message(tokenizer, text: str, extra_kwargs: dict | None = None) -> str:
    """``text`` as one user message through the tokenizer's chat template, generation prompt appended,
    with the fixed date (:data:`FIXED_CHAT_DATE`). Every chat rendering of the project goes here."""
    with _fixed_template_clock():
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, **chat_template_kwargs(extra_kwargs))


def render_chat(tokenizer, text: str, chat_template_kwargs: dict | None = None) -> str:
    """``text`` as one user message through the tokenizer's chat template; unchanged without one.

    How a critic prompt reaches a model critic (and the policy in ``self`` mode, whose warm start is
    trained on critic prompts rendered the same way)."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    return render_user_message(tokenizer, text, chat_template_kwargs)  # fixed date unless the kwargs give one


_SENTINEL = "\u0000TCRLSD-USER-TEXT\u0000"


def chat_wrap(tokenizer) -> tuple[str, str]:
    """(head, tail) the chat template puts around one user message (with generation prompt)."""
    text = render_user_message(tokenizer, _SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise TemplateError("policy_chat_template_tokenizer: cannot locate the user message in its chat template")
    head, tail = text.split(_SENTINEL)
    return head, tail


def split_student_prompt(prompt: str, problem: str, wrap: tuple[str, str] | None = None) -> tuple[str, str, str]:
    """``(prefix, problem, instruction)`` with ``prefix + problem + instruction`` == the user text.

    The user text is ``prompt`` (unwrapped from the chat template when ``wrap`` is given). A problem
    that does not occur in it verbatim is an error: the teacher context could not place the feedback
    after the problem nor repeat the student's instruction (a silent fallback would give the teacher
    another instruction than the student).
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
        raise TemplateError("the problem text does not occur verbatim in the rendered prompt, so the teacher "
                            "context cannot put the feedback after it; was the prompt rendered from another "
                            "problem text (re-run prepare)?")
    return text[:i], problem, text[i + len(problem):]


def render_teacher_prompt(template: Template, prefix: str, problem: str, instruction: str, feedback: str,
                          wrap: tuple[str, str] | None = None) -> str:
    text = template.render(prefix=prefix, problem=problem, feedback=feedback, instruction=instruction)
    if wrap is not None:
        text = wrap[0] + text + wrap[1]
    return text
