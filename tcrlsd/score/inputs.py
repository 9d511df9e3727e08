"""Rows -> scoring sequences (student and teacher contexts) and the scoring of one part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.schemas import check_token_lengths, schema_for
from tcrlsd.score.logprobs import response_logprobs
from tcrlsd.score.params import ScoreError, ScoreParams

# ----------------------------------------------------------------------------- rows -> sequences


@dataclass(frozen=True)
class PartInputs:
    """One part's rows as Python lists: what the forward passes take."""

    rollout_ids: list[str]
    prompts: list[list[int]]  # student context = prompt_token_ids
    responses: list[list[int]]  # the sampled ids (a "stop" row ends with its stop id)
    teacher_prompts: list[str | None]  # rendered teacher context text; None = no feedback
    # K - 1 extra teacher contexts per row (critique.wrong_hints; empty lists at K = 1): text or None
    # (no text: scored as the student), and each context's kind
    extra_teacher_prompts: Sequence[Sequence[str | None]] = ()
    extra_teacher_kinds: Sequence[Sequence[str]] = ()
    # the rollouts' sampler_logprobs, given only where they stand in for the student forward
    # (tcrlsd.score.reuse); None = the student is scored by a forward pass
    sampler_logprobs: Sequence[Sequence[float]] | None = None

    def __len__(self) -> int:
        return len(self.rollout_ids)


@dataclass(frozen=True)
class ScoringInputs:
    """Per-rollout inputs of the score stage in rollouts order (critiques joined by rollout_id),
    kept as Arrow columns: :meth:`part` converts only one part's rows to Python lists, so the
    stage holds the iteration in Arrow (4 bytes a token) and one part in Python, never a Python
    list of every token of the iteration."""

    table: pa.Table  # rollout_id, prompt_token_ids, response_token_ids, teacher_prompt (null = no feedback),
    # sampler_logprobs where the rollouts have it, [extra_teacher_prompts, extra_teacher_kinds] where the
    # critiques have extra contexts

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def extra_contexts(self) -> int:
        """K - 1: extra teacher contexts per row (0 when the critiques have none)."""
        if "extra_teacher_prompts" not in self.table.column_names or not len(self):
            return 0
        return int(pc.list_value_length(self.table.column("extra_teacher_prompts"))[0].as_py())

    def part(self, rows: range, sampler_logprobs: bool = False) -> PartInputs:
        """The contiguous rows ``rows`` (a part of the stage's plan) as Python lists; with
        ``sampler_logprobs`` also the rollouts' sampler log-probs (the student's, reused)."""
        if rows.step != 1 or rows.start < 0 or rows.stop > len(self):
            raise ValueError(f"a part is a contiguous range of rows within 0..{len(self)}; got {rows}")
        t = self.table.slice(rows.start, len(rows))
        extra = {}
        if "extra_teacher_prompts" in t.column_names:
            extra = {"extra_teacher_prompts": t.column("extra_teacher_prompts").to_pylist(),
                     "extra_teacher_kinds": t.column("extra_teacher_kinds").to_pylist()}
        if sampler_logprobs:
            if "sampler_logprobs" not in t.column_names:
                raise ValueError("the rollouts have no sampler_logprobs column to reuse")
            extra["sampler_logprobs"] = t.column("sampler_logprobs").to_pylist()
        return PartInputs(t.column("rollout_id").to_pylist(), t.column("prompt_token_ids").to_pylist(),
                          t.column("response_token_ids").to_pylist(), t.column("teacher_prompt").to_pylist(), **extra)

    def has_feedback(self) -> np.ndarray:
        """(rows,) bool: the row has a teacher context."""
        return pc.is_valid(self.table.column("teacher_prompt")).to_numpy(zero_copy_only=False)

    def lengths(self, column: str) -> np.ndarray:
        """(rows,) int64 list lengths of ``prompt_token_ids`` or ``response_token_ids``."""
        return pc.list_value_length(self.table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)


def build_inputs(rollouts: pa.Table, critiques: pa.Table, *, critiques_source: str | None = None) -> ScoringInputs:
    """Join critiques onto rollouts by rollout_id and check what the forward passes rely on.

    Errors name the rollout_id: a rollout without a critique row (or the reverse), feedback_text
    and teacher_prompt disagreeing about whether there is feedback, an empty prompt.
    """
    crit = check_token_lengths(rollouts, critiques, "critiques", source=critiques_source)
    where = f"{critiques_source}: " if critiques_source else ""
    ids = rollouts.column("rollout_id")
    fb_null = pc.is_null(crit.column("feedback_text"))
    tp_null = pc.is_null(crit.column("teacher_prompt"))
    disagree = pc.not_equal(fb_null, tp_null)
    if pc.any(disagree).as_py():
        k = pc.indices_nonzero(disagree)[0].as_py()
        f_null = fb_null[k].as_py()
        raise ScoreError(
            f"{where}rollout_id {ids[k].as_py()!r}: feedback_text is {'null' if f_null else 'set'} but teacher_prompt "
            f"is {'set' if f_null else 'null'}; both must be null (no feedback) or both set"
        )
    empty = pc.equal(pc.list_value_length(rollouts.column("prompt_token_ids")), 0)
    if pc.any(empty).as_py():
        rid = ids[pc.indices_nonzero(empty)[0].as_py()].as_py()
        raise ScoreError(f"rollouts: rollout_id {rid!r}: prompt_token_ids is empty; expected the policy's input ids")
    columns = {
        "rollout_id": ids,
        "prompt_token_ids": rollouts.column("prompt_token_ids"),
        "response_token_ids": rollouts.column("response_token_ids"),
        "teacher_prompt": crit.column("teacher_prompt"),
    }
    if "sampler_logprobs" in rollouts.column_names:  # the mismatch metrics (tcrlsd.offpolicy); reuse (.reuse)
        columns["sampler_logprobs"] = rollouts.column("sampler_logprobs")
    if "extra_teacher_prompts" in crit.column_names:  # K > 1: the same number of extra contexts on every row
        counts = pc.list_value_length(crit.column("extra_teacher_prompts"))
        odd = pc.not_equal(counts, counts[0])
        if pc.any(odd).as_py():
            k = pc.indices_nonzero(odd)[0].as_py()
            raise ScoreError(f"{where}rollout_id {ids[k].as_py()!r}: {counts[k].as_py()} extra teacher contexts, but "
                             f"rollout_id {ids[0].as_py()!r} has {counts[0].as_py()}; every row must have the same number")
        columns["extra_teacher_prompts"] = crit.column("extra_teacher_prompts")
        columns["extra_teacher_kinds"] = crit.column("extra_teacher_kinds")
    return ScoringInputs(pa.table(columns))


def encode_teacher_context(tokenizer, teacher_prompt: str) -> list[int]:
    """Token ids of a rendered teacher context: ``encode_prompt``, the generate stage's own rule
    (BOS added unless the text -- a chat template rendering, say -- already starts with it)."""
    from tcrlsd.policy import encode_prompt

    return encode_prompt(tokenizer, teacher_prompt)


def check_vocab(rollouts: pa.Table, vocab_size: int, policy: str) -> None:
    """Every prompt/response id must index the policy's embedding; the error names the rollout."""
    for col in ("prompt_token_ids", "response_token_ids"):
        arr = rollouts.column(col)
        flat = pc.list_flatten(arr)
        if not len(flat):
            continue
        bad = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, vocab_size))
        if pc.any(bad).as_py():
            k = pc.indices_nonzero(bad)[0].as_py()
            row = pc.list_parent_indices(arr)[k].as_py()
            raise ScoreError(
                f"rollouts: rollout_id {rollouts.column('rollout_id')[row].as_py()!r}: {col} holds id "
                f"{flat[k].as_py()}, outside the vocabulary of {policy} (0..{vocab_size - 1}); "
                "were the rollouts generated by another model?"
            )


def score_part(
    part: PartInputs,
    student,
    teacher,
    tokenizer,
    params: ScoreParams,
    teacher_checkpoint: str,
    on_batch: Callable[[int], None] | None = None,
    teacher_contexts: Sequence[list[int] | None] | None = None,
    extra_contexts: Sequence[Sequence[list[int] | None]] | None = None,
) -> tuple[pa.Table, dict]:
    """Scores table of one part's rows, and token counts of the work done.

    ``teacher`` is None when the student's weights play the teacher (``current``): then student
    and teacher sequences are batched together through one model. Where ``part.sampler_logprobs``
    is given it is the student's log-probs (:mod:`tcrlsd.score.reuse`) and no student sequence is
    run (``student`` may then be None when ``teacher`` is given). ``teacher_contexts`` may hold
    the part's teacher prompts already encoded (:func:`encode_teacher_context`; None where a row
    has no feedback), ``extra_contexts`` the extra contexts' (row -> K - 1 entries); else they are
    encoded here. Every context of a part goes through one pool of sequences, so K contexts cost K
    teacher passes over the part's rows with feedback, and memory stays that of one part.
    """
    if teacher_contexts is None:
        teacher_contexts = [None if t is None else encode_teacher_context(tokenizer, t) for t in part.teacher_prompts]
    if extra_contexts is None:
        extra_contexts = [[None if t is None else encode_teacher_context(tokenizer, t) for t in row]
                          for row in part.extra_teacher_prompts]
    responses = part.responses
    # Teacher sequences: the primary contexts of the rows with feedback first (at K = 1 exactly the
    # sequences, in the order, scored before extra contexts existed), then every extra context with text.
    jobs = [(j, -1, teacher_contexts[j]) for j, t in enumerate(part.teacher_prompts) if t is not None]
    jobs += [(j, s, c) for j, row in enumerate(extra_contexts) for s, c in enumerate(row) if c is not None]
    reuse = part.sampler_logprobs is not None
    s_ctx, s_resp = ([], []) if reuse else (part.prompts, responses)  # student sequences to run
    t_ctx = [c for _, _, c in jobs]
    t_resp = [responses[j] for j, _, _ in jobs]
    kw = dict(max_tokens_per_batch=params.max_tokens_per_batch, logits_chunk_tokens=params.logits_chunk_tokens,
              on_batch=on_batch)
    if teacher is None:
        both = response_logprobs(student, s_ctx + t_ctx, s_resp + t_resp, **kw)
        student_lp, teacher_fb = both[: len(s_ctx)], both[len(s_ctx) :]
    else:
        student_lp = response_logprobs(student, s_ctx, s_resp, **kw) if s_ctx else []
        teacher_fb = response_logprobs(teacher, t_ctx, t_resp, **kw)
    if reuse:  # the sampler's numbers are the student forward's (tcrlsd.score.reuse)
        student_lp = [np.asarray(lp, dtype=np.float32) for lp in part.sampler_logprobs]
    teacher_lp = list(student_lp)  # no feedback: teacher = student, no second pass
    extra_lp = [[student_lp[j]] * len(row) for j, row in enumerate(extra_contexts)]  # the same rule per context
    for (j, s, _), lp in zip(jobs, teacher_fb):
        if s < 0:
            teacher_lp[j] = lp
        else:
            extra_lp[j][s] = lp
    schema = schema_for("scores")
    table = pa.table(
        {
            "rollout_id": pa.array(part.rollout_ids, pa.string()),
            "student_logprobs": pa.array([a.tolist() for a in student_lp], schema.field("student_logprobs").type),
            "teacher_logprobs": pa.array([a.tolist() for a in teacher_lp], schema.field("teacher_logprobs").type),
            "teacher_checkpoint": pa.array([teacher_checkpoint] * len(part), pa.string()),
        },
        schema=schema,
    )
    if part.extra_teacher_prompts:  # K > 1: columns of their own; absent at K = 1 (bytes unchanged)
        table = table.append_column("extra_teacher_logprobs", pa.array(
            [[a.tolist() for a in row] for row in extra_lp], pa.list_(schema.field("teacher_logprobs").type)))
        table = table.append_column("extra_teacher_kinds", pa.array(
            [list(k) for k in part.extra_teacher_kinds], pa.list_(pa.string())))
    counts = {
        "rows": len(part),
        "forward_tokens": sum(len(c) + len(r) for c, r in zip(s_ctx + t_ctx, s_resp + t_resp) if r),
        "response_tokens_scored": sum(len(r) for r in s_resp + t_resp),
    }
    return table, counts
