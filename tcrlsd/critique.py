"""The critique stage: the teacher's feedback for each rollout, and the teacher context it goes into.

Modes (``critique.mode``), i.e. where the feedback ``f`` of the teacher ``pi(y | x, f)`` comes from:

- ``critique``       an external critic reads problem + rollout + verdict (TC-RLSD);
- ``critique_gold``  the critic also sees the gold solution;
- ``gold``           f = the gold solution itself (RLSD-gold);
- ``self``           the policy critiques its own rollout through the generation backend (RLSD-self);
- ``none``           no feedback anywhere (GRPO): teacher = student.

Which rollouts get feedback (``critique.which``): ``incorrect`` or ``all``; the default ``auto`` means
``all`` in ``gold`` mode and ``incorrect`` otherwise. Gold is a property of the problem, not of the
attempt: RLSD shows the reference solution to the teacher for every rollout, so coverage is 1.0 there;
a critique of a correct rollout has little to say, so critique modes cover the incorrect ones and
coverage equals the incorrect share.

Each row's ``teacher_prompt`` is the full teacher context the score stage tokenises and puts before
the same response ids: the student's own prompt text with the feedback inserted after the problem
and the original question asked again (``configs/templates/teacher-*.txt``). The student prompt is
``prefix + problem + instruction`` (prepare's template, e.g. problem + " Let's think step by step
..."); prefix and instruction are recovered from the prompts row, so the teacher sees the same
instruction. With ``policy_chat_template_tokenizer`` the student prompt was a chat-template
rendering; it is unwrapped with that tokenizer and the teacher context is wrapped the same way.

Templates are files ``configs/templates/NAME.txt`` whose first line is ``# id: NAME@vN``; leading
``#`` lines are comments. Slots are ``${name}`` (``string.Template``): model text fills slots in one
pass and is never itself parsed as a template, so a rollout that writes ``${gold_solution}`` or
``{0}`` stays literal text.

Per-row flags and the metrics JSON: ``leaks_answer`` (the feedback contains the gold final answer as a
token, before any masking), ``suspected_false_negative`` (for a rollout the strict grader rejected:
the critic says it is right, or a relaxed grader -- formatting stripped, numeric equality -- accepts
it). Resumable and sharded through :class:`tcrlsd.artifacts.ShardedOutput`; model critics also keep a
per-part journal of answered rows (``journal-NNNNN.jsonl``, fsync'd per line) so a critic that dies
mid-part loses nothing already answered; the journal is removed once its part is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import pyarrow as pa

from tcrlsd.artifacts import ShardedOutput, ShardSpec, fingerprint_files, read_artifact, split_evenly
from tcrlsd.critics import (
    CriticReply,
    CritiqueRequest,
    GenerationCritic,
    make_critic,
)
from tcrlsd.generation import SamplingConfig
from tcrlsd.prepare import extract_boxed
from tcrlsd.schemas import schema_for

__all__ = [
    "MODES",
    "CritiqueError",
    "CritiqueParams",
    "Template",
    "load_template",
    "default_templates_dir",
    "needs_feedback",
    "render_critic_prompt",
    "grader_finding",
    "split_student_prompt",
    "render_teacher_prompt",
    "contains_answer",
    "mask_answer",
    "relaxed_equal",
    "claims_correct",
    "join_inputs",
    "critique_rows",
    "run_critique",
    "critique_metrics",
]

MODES = ("critique", "critique_gold", "gold", "self", "none")


class CritiqueError(ValueError):
    """Bad input to the critique stage (missing join rows, bad template, ...)."""


@dataclass(frozen=True)
class CritiqueParams:
    mode: Literal["critique", "critique_gold", "gold", "self", "none"] = "critique"
    which: Literal["auto", "incorrect", "all"] = "auto"
    critic: Literal["reference", "transformers", "vllm", "openai"] = "reference"
    critic_model: str = ""
    templates_dir: str | None = None
    max_response_chars: int = 6000
    max_feedback_chars: int = 4000
    reference_reveal_final_answer: bool = False
    mask_leaked_answer: bool = False
    mask_text: str = "[answer withheld]"
    policy_chat_template_tokenizer: str | None = None
    rows_per_part: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    self_backend: Literal["transformers", "vllm"] = "transformers"
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    backend_options: dict = field(default_factory=dict)
    chunk_rows: int = 64
    chat_template_kwargs: dict = field(default_factory=dict)
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    request_timeout_s: float = 120.0
    max_attempts: int = 4
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    abort_after_failures: int = 32

    def __post_init__(self):
        for name in ("max_response_chars", "max_feedback_chars", "rows_per_part", "max_new_tokens",
                     "chunk_rows", "max_concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("request_timeout_s must be > 0 and the backoff times >= 0")
        if self.abort_after_failures < 0:
            raise ValueError(f"abort_after_failures must be >= 0 (0 = never), got {self.abort_after_failures}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens, self.seed)

    def effective_which(self) -> str:
        if self.which != "auto":
            return self.which
        return "all" if self.mode == "gold" else "incorrect"


# --------------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Template:
    id: str  # e.g. "critic-incorrect@v1"
    body: str
    path: str

    def render(self, **slots: str) -> str:
        try:
            return string.Template(self.body).substitute(slots)  # one pass: values are never re-parsed
        except KeyError as exc:
            raise CritiqueError(f"{self.path}: template uses slot ${{{exc.args[0]}}}, which is not one of "
                                f"{', '.join(sorted(slots))}") from None
        except ValueError as exc:
            raise CritiqueError(f"{self.path}: not a valid template ({exc}); write a literal $ as $$") from None

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
        raise CritiqueError(f"{path}: template file not found (critique.templates_dir = {folder})")
    lines = path.read_text().splitlines()
    m = _ID_LINE.match(lines[0]) if lines else None
    if not m:
        raise CritiqueError(f"{path}: the first line must be '# id: {name}@vN' (the template's version id)")
    if not m.group(1).startswith(f"{name}@"):
        raise CritiqueError(f"{path}: id {m.group(1)!r} does not match the file name {name!r}")
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return Template(m.group(1), "\n".join(lines[i:]), str(path))


def _critic_template_name(mode: str, is_correct: bool) -> str:
    kind = "correct" if is_correct else "incorrect"
    return {"critique": f"critic-{kind}", "critique_gold": f"critic-gold-{kind}", "self": f"self-{kind}"}[mode]


def _teacher_template_name(mode: str) -> str:
    return "teacher-gold" if mode == "gold" else "teacher-critique"


def _templates_for(params: CritiqueParams) -> dict[str, Template]:
    folder = params.templates_dir or default_templates_dir()
    if params.mode == "none":
        return {}
    names = [_teacher_template_name(params.mode)]
    if params.mode in ("critique", "critique_gold", "self"):
        names += [_critic_template_name(params.mode, c) for c in (False, True)]
    return {n: load_template(folder, n) for n in names}


# --------------------------------------------------------------------------------------------------
# Rendering


def needs_feedback(mode: str, which: str, is_correct: bool) -> bool:
    return mode != "none" and (which == "all" or not is_correct)


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


def _chat_wrap(tokenizer) -> tuple[str, str]:
    """(head, tail) the chat template puts around one user message (with generation prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise CritiqueError("policy_chat_template_tokenizer: cannot locate the user message in its chat template")
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
            raise CritiqueError("a prompts row's `prompt` was not rendered with policy_chat_template_tokenizer's "
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


# --------------------------------------------------------------------------------------------------
# Leakage and verdict checks


def _answer_pattern(answer: str) -> re.Pattern | None:
    answer = answer.strip()
    if not answer:
        return None
    # A token match: "12" must not match inside "112", "12.5", "x12", nor "-12" (another number).
    before = r"(?<![0-9A-Za-z_.\-])" if answer[0].isdigit() else r"(?<![0-9A-Za-z_])"
    after = r"(?![0-9A-Za-z_])(?!\.[0-9])" if answer[-1].isalnum() else ""
    return re.compile(before + re.escape(answer) + after)


def contains_answer(text: str | None, answer: str) -> bool:
    """Whether ``text`` contains the gold final answer verbatim, as a token."""
    pat = _answer_pattern(answer)
    return bool(text) and pat is not None and pat.search(text) is not None


def mask_answer(text: str, answer: str, mask: str) -> str:
    pat = _answer_pattern(answer)
    return text if pat is None else pat.sub(lambda _: mask, text)


def _normalise(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("\\!", ""),
                 ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                 ("%", ""), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[A-Za-z]\s*=", "", s.strip())  # "x = 5"
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    return s


def _number(s: str) -> float | None:
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def relaxed_equal(predicted: str | None, gold: str) -> bool:
    """A lenient second opinion: equal after stripping formatting, or numerically equal."""
    if predicted is None:
        return False
    p, g = _normalise(predicted), _normalise(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    a, b = _number(p), _number(g)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


_CLAIMS_CORRECT = re.compile(
    r"(?<!not )(?<!n't )\b(?:"
    r"(?:the |your |this |its )?(?:final )?answer (?:is|was) (?:actually |in fact |indeed )?(?:correct|right)"
    r"|(?:the |this |your )(?:attempt|solution|response|reasoning|work) is (?:actually |in fact |entirely |fully )?"
    r"(?:correct|right)"
    r"|(?:i |we )?(?:find|found|see|saw) no (?:errors?|mistakes?)"
    r"|there (?:is|are) no (?:errors?|mistakes?)"
    r"|no (?:errors?|mistakes?) (?:in|were)"
    r"|(?:grader|verdict|grading) (?:is|was|seems|appears) (?:wrong|mistaken|incorrect)"
    r"|should (?:have been|be) (?:marked|graded|accepted) (?:as )?correct"
    r"|false negative"
    r")",
    re.IGNORECASE,
)


def claims_correct(feedback: str | None) -> bool:
    """Whether a critique says the attempt is right after all (phrase match)."""
    return bool(feedback) and _CLAIMS_CORRECT.search(feedback) is not None


# --------------------------------------------------------------------------------------------------
# Joining the inputs


def join_inputs(rollouts: pa.Table, verdicts: pa.Table, prompts: pa.Table) -> list[dict]:
    """One dict per rollout, in rollouts order, with its verdict and prompt fields."""
    v_rows = {r["rollout_id"]: r for r in verdicts.select(
        ["rollout_id", "is_correct", "reason", "extracted_answer"]).to_pylist()}
    p_rows = {r["prompt_id"]: r for r in prompts.select(
        ["prompt_id", "problem", "prompt", "answer", "solution"]).to_pylist()}
    out = []
    for r in rollouts.select(["rollout_id", "prompt_id", "response_text"]).to_pylist():
        v = v_rows.get(r["rollout_id"])
        if v is None:
            raise CritiqueError(f"verdicts: no row for rollout_id {r['rollout_id']!r}; every rollout needs a verdict")
        p = p_rows.get(r["prompt_id"])
        if p is None:
            raise CritiqueError(f"prompts: no row for prompt_id {r['prompt_id']!r} (rollout {r['rollout_id']!r})")
        out.append({**r, **{k: v[k] for k in ("is_correct", "reason", "extracted_answer")},
                    **{k: p[k] for k in ("problem", "prompt", "answer", "solution")}})
    return out


# --------------------------------------------------------------------------------------------------
# One part


class _Journal:
    """Append-only JSONL of answered rows of one part; every line fsync'd before it counts."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, dict] = {}
        if path.exists():
            raw = path.read_bytes()
            for line in raw.split(b"\n"):
                try:
                    rec = json.loads(line)
                except ValueError:  # a torn last line from a kill mid-write
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("rollout_id"), str):
                    self.answers[rec["rollout_id"]] = rec
            if raw and not raw.endswith(b"\n"):
                with open(path, "ab") as f:
                    f.write(b"\n")
        self._file = None

    def get(self, rollout_id: str, prompt_sha: str) -> str | None:
        rec = self.answers.get(rollout_id)
        if rec and rec.get("prompt_sha") == prompt_sha and isinstance(rec.get("feedback_text"), str):
            return rec["feedback_text"]
        return None

    def add(self, rollout_id: str, prompt_sha: str, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        line = json.dumps({"rollout_id": rollout_id, "prompt_sha": prompt_sha, "feedback_text": text},
                          ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def critique_rows(rows: Sequence[dict], params: CritiqueParams, critic, templates: dict[str, Template],
                  wrap: tuple[str, str] | None = None, journal: _Journal | None = None,
                  progress=None) -> pa.Table:
    """The ``critiques`` table for ``rows`` (joined dicts, see :func:`join_inputs`), in order."""
    mode, which = params.mode, params.effective_which()
    n = len(rows)
    feedback: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    template_ids: list[str] = [""] * n
    critic_labels = ["none"] * n
    todo: list[int] = []
    requests: list[CritiqueRequest] = []
    for i, row in enumerate(rows):
        if not needs_feedback(mode, which, row["is_correct"]):
            if progress is not None:
                progress.update(1)
            continue
        teacher_id = templates[_teacher_template_name(mode)].id
        if mode == "gold":
            critic_labels[i] = "gold"
            template_ids[i] = teacher_id
            if row["solution"]:
                feedback[i] = row["solution"]
            else:
                errors[i] = "no gold solution in the prompts row"
            if progress is not None:
                progress.update(1)
            continue
        critic_labels[i] = critic.label
        if critic.template_id is not None:  # the critic reads the row itself, not a rendered prompt
            prompt = ""
            template_ids[i] = f"{critic.template_id}+{teacher_id}"
        else:
            tpl = templates[_critic_template_name(mode, row["is_correct"])]
            prompt = render_critic_prompt(tpl, row, params.max_response_chars)
            template_ids[i] = f"{tpl.id}+{teacher_id}"
        sha = _sha(prompt)
        if journal is not None and (done := journal.get(row["rollout_id"], sha)) is not None:
            feedback[i] = done
            if progress is not None:
                progress.update(1)
            continue
        todo.append(i)
        requests.append(CritiqueRequest(row["rollout_id"], prompt, row["problem"], row["response_text"],
                                        row["solution"], row["answer"], row["is_correct"],
                                        row["extracted_answer"]))

    def on_reply(j: int, reply: CriticReply) -> None:
        i = todo[j]
        feedback[i], errors[i] = reply.text, (reply.error if reply.text is None else None)
        if journal is not None and reply.text is not None:
            journal.add(requests[j].rollout_id, _sha(requests[j].prompt), reply.text)
        if progress is not None:
            progress.update(1)

    if requests:
        critic.critique(requests, on_reply)

    leaks, suspects, teacher_prompts = [], [], []
    for i, row in enumerate(rows):
        text = feedback[i]
        leak = contains_answer(text, row["answer"])
        if text is not None and leak and params.mask_leaked_answer:
            text = feedback[i] = mask_answer(text, row["answer"], params.mask_text)
        leaks.append(leak)
        predicted = row["extracted_answer"] if row["extracted_answer"] is not None else extract_boxed(
            row["response_text"])
        suspects.append(not row["is_correct"] and (relaxed_equal(predicted, row["answer"]) or claims_correct(text)))
        if text is None:
            teacher_prompts.append(None)
            continue
        prefix, problem, instruction = split_student_prompt(row["prompt"], row["problem"], wrap)
        teacher_prompts.append(render_teacher_prompt(templates[_teacher_template_name(mode)], prefix, problem,
                                                     instruction, text, wrap))
    return pa.table({
        "rollout_id": pa.array([r["rollout_id"] for r in rows], pa.string()),
        "mode": pa.array([mode] * n, pa.string()),
        "critic": pa.array(critic_labels, pa.string()),
        "feedback_text": pa.array(feedback, pa.string()),
        "template": pa.array(template_ids, pa.string()),
        "teacher_prompt": pa.array(teacher_prompts, pa.string()),
        "error": pa.array(errors, pa.string()),
        "leaks_answer": pa.array(leaks, pa.bool_()),
        "suspected_false_negative": pa.array(suspects, pa.bool_()),
    }, schema=schema_for("critiques"))


# --------------------------------------------------------------------------------------------------
# The stage's one function


def _make_stage_critic(params: CritiqueParams, policy_path: str | None):
    if params.mode in ("none", "gold"):
        return None
    if params.mode == "self":
        if not policy_path:
            raise CritiqueError("mode 'self' needs the policy checkpoint (--policy)")
        options = {"device": params.device, "dtype": params.dtype, "trust_remote_code": params.trust_remote_code,
                   **dict(params.backend_options)}
        return GenerationCritic(params.self_backend, str(policy_path), options, params.sampling(),
                                params.max_feedback_chars, params.chunk_rows, params.chat_template_kwargs,
                                label=f"self:{params.self_backend}:{policy_path}")
    return make_critic(params.critic, params, params.critic_model)


def _chat_wrap_from(params: CritiqueParams) -> tuple[str, str] | None:
    if not params.policy_chat_template_tokenizer:
        return None
    from tcrlsd.policy import load_tokenizer

    tok = load_tokenizer(params.policy_chat_template_tokenizer, params.trust_remote_code)
    if not getattr(tok, "chat_template", None):
        raise CritiqueError(f"policy_chat_template_tokenizer {params.policy_chat_template_tokenizer!r} "
                            "has no chat template")
    return _chat_wrap(tok)


def run_critique(rollouts: pa.Table, verdicts: pa.Table, prompts: pa.Table, params: CritiqueParams,
                 out_dir: str | os.PathLike, shard: ShardSpec = ShardSpec(), policy_path: str | None = None,
                 input_paths: Sequence[str | os.PathLike] = ()) -> bool:
    """Write the ``critiques`` artifact under ``out_dir`` part by part; True once it is complete.

    Resumes: finished parts are skipped, and answered rows of an unfinished part are read back from
    its journal (model critics). ``input_paths`` (the input files) go into the manifest fingerprint.
    """
    rows = join_inputs(rollouts, verdicts, prompts)
    templates = _templates_for(params)
    num_parts = max(1, math.ceil(len(rows) / params.rows_per_part))
    fingerprint = {
        "params": dataclasses.asdict(params),
        "inputs": fingerprint_files(input_paths),
        "templates": {t.id: t.sha for t in templates.values()},
        "rows": len(rows),
    }
    if params.mode == "self" and policy_path:
        fingerprint["policy"] = fingerprint_files([policy_path])
    out = ShardedOutput(out_dir, "critiques", num_parts, fingerprint)
    pending = out.pending(shard)
    if not pending:
        return out.complete()
    ranges = split_evenly(len(rows), num_parts)
    critic = _make_stage_critic(params, policy_path)
    wrap = _chat_wrap_from(params)
    from tqdm import tqdm

    total = sum(len(ranges[p]) for p in pending)
    with tqdm(total=total, desc=f"critique ({params.mode})", unit="row", file=sys.stderr,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for part in pending:
            part_rows = [rows[i] for i in ranges[part]]
            journal_path = out.folder / f"journal-{part:05d}.jsonl"
            journal = _Journal(journal_path) if critic is not None and critic.journaled else None
            try:
                table = critique_rows(part_rows, params, critic, templates, wrap, journal, bar)
            finally:
                if journal is not None:
                    journal.close()
            out.write(part, table)
            journal_path.unlink(missing_ok=True)
    return out.complete()


def critique_metrics(critiques: pa.Table, verdicts: pa.Table, params: CritiqueParams,
                     rollouts: pa.Table | None = None, prompts: pa.Table | None = None) -> dict:
    """Coverage, critique length, failures by reason, leakage and suspected false negatives.

    ``leaks`` / ``leakage_share`` count feedback that contained the gold answer before masking (the
    ``leaks_answer`` column); with rollouts and prompts given, ``leakage_share_after_masking`` checks
    the stored text again (equal to ``leakage_share`` unless ``mask_leaked_answer`` is on).
    """
    gold_answers = None
    if rollouts is not None and prompts is not None:
        ans = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("answer").to_pylist()))
        gold_answers = [{"rollout_id": rid, "answer": ans.get(pid, "")} for rid, pid in
                        zip(rollouts.column("rollout_id").to_pylist(), rollouts.column("prompt_id").to_pylist())]
    rows = critiques.to_pylist()
    correct = {r["rollout_id"]: r["is_correct"] for r in verdicts.select(["rollout_id", "is_correct"]).to_pylist()}
    n = len(rows)
    texts = [r["feedback_text"] for r in rows if r["feedback_text"] is not None]
    n_fb = len(texts)
    failures = Counter(r["error"] for r in rows if r["error"] is not None)
    n_incorrect = sum(1 for r in rows if not correct.get(r["rollout_id"], False))
    which = params.effective_which()
    eligible = sum(1 for r in rows if needs_feedback(params.mode, which, correct.get(r["rollout_id"], False)))
    leaks = sum(1 for r in rows if r["leaks_answer"] and r["feedback_text"] is not None)
    answers = {r["rollout_id"]: r["answer"] for r in gold_answers} if gold_answers is not None else None
    leaks_after = (sum(1 for r in rows if contains_answer(r["feedback_text"], answers.get(r["rollout_id"], "")))
                   if answers is not None else None)
    suspects = [r for r in rows if r["suspected_false_negative"]]

    def share(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "mode": params.mode,
        "critic": params.critic if params.mode in ("critique", "critique_gold") else params.mode,
        "which": which,
        "rollouts": n,
        "incorrect_rollouts": n_incorrect,
        "incorrect_share": share(n_incorrect, n),
        "eligible_rollouts": eligible,
        "rollouts_with_feedback": n_fb,
        "coverage": share(n_fb, n),
        "coverage_of_eligible": share(n_fb, eligible),
        "mean_feedback_chars": share(sum(len(t) for t in texts), n_fb),
        "mean_feedback_words": share(sum(len(t.split()) for t in texts), n_fb),
        "failures": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "leaks": leaks,
        "leakage_share": share(leaks, n_fb),
        "leakage_share_after_masking": None if leaks_after is None else share(leaks_after, n_fb),
        "mask_leaked_answer": params.mask_leaked_answer,
        "suspected_false_negatives": len(suspects),
        "suspected_false_negative_share_of_incorrect": share(len(suspects), n_incorrect),
        "templates": sorted({r["template"] for r in rows if r["template"]}),
    }


def read_inputs(prompts_path, rollouts_path, verdicts_path) -> tuple[pa.Table, pa.Table, pa.Table]:
    """``(rollouts, verdicts, prompts)``, read and validated (errors name the file)."""
    return (read_artifact(rollouts_path, "rollouts"), read_artifact(verdicts_path, "verdicts"),
            read_artifact(prompts_path, "prompts"))
