"""Metrics of a scores artifact: Delta-gap and its spread over token positions, part by part.

The artifact is read one part file at a time and folded into running sums (the spread by Chan's
pairwise update), so computing the metrics holds one part, like scoring does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.artifacts import artifact_files, read_table
from tcrlsd.offpolicy import MismatchSums
from tcrlsd.schemas import SchemaError, check_token_lengths
from tcrlsd.score.inputs import ScoringInputs
from tcrlsd.signals import DeltaGap, coverage

# ----------------------------------------------------------------------------- metrics

_ABS_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024)
_DECILES = 10


def _bucket_label(k: int) -> str:
    lo = _ABS_EDGES[k]
    return f"{lo}-{_ABS_EDGES[k + 1] - 1}" if k + 1 < len(_ABS_EDGES) else f"{lo}+"


@dataclass
class _Sums:
    """Running sums of the Delta statistics over the parts folded in so far."""

    rows: int = 0
    feedback_rows: int = 0
    tokens: int = 0
    student_sum: float = 0.0
    fb_tokens: int = 0
    fb_student_sum: float = 0.0
    fb_teacher_sum: float = 0.0
    gap: DeltaGap = field(default_factory=DeltaGap)  # the Δ-gap and its spread (tcrlsd.signals)
    delta_positive: int = 0
    row_mean_sum: float = 0.0
    row_mean_count: int = 0
    nofb_equal: bool = True
    decile_sum: np.ndarray = field(default_factory=lambda: np.zeros(_DECILES))
    decile_n: np.ndarray = field(default_factory=lambda: np.zeros(_DECILES, dtype=np.int64))
    bucket_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(_ABS_EDGES)))
    bucket_n: np.ndarray = field(default_factory=lambda: np.zeros(len(_ABS_EDGES), dtype=np.int64))

    def add(self, scores: pa.Table, has_fb: np.ndarray) -> None:
        """Fold in one part: its scores rows and, per row, whether it has feedback."""
        s_col, t_col = scores.column("student_logprobs"), scores.column("teacher_logprobs")
        lengths = pc.list_value_length(s_col).to_numpy(zero_copy_only=False).astype(np.int64)
        student = pc.list_flatten(s_col).to_numpy(zero_copy_only=False).astype(np.float64)
        teacher = pc.list_flatten(t_col).to_numpy(zero_copy_only=False).astype(np.float64)
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        pos = np.arange(len(student)) - np.repeat(starts, lengths)  # token index t within its response
        fb_tok = has_fb[row_of] if len(row_of) else np.zeros(0, dtype=bool)
        delta = (teacher - student)[fb_tok]
        d_pos, d_len = pos[fb_tok], lengths[row_of][fb_tok]

        self.rows += len(lengths)
        self.feedback_rows += int(has_fb.sum())
        self.tokens += len(student)
        self.student_sum += float(student.sum())
        self.fb_student_sum += float(student[fb_tok].sum())
        self.fb_teacher_sum += float(teacher[fb_tok].sum())
        self.nofb_equal &= bool(np.array_equal(teacher[~fb_tok], student[~fb_tok]))
        self.gap.add(delta)
        self.fb_tokens += len(delta)
        self.delta_positive += int((delta > 0).sum())
        decile = np.minimum((_DECILES * d_pos) // np.maximum(d_len, 1), _DECILES - 1)
        bucket = np.searchsorted(np.asarray(_ABS_EDGES), d_pos, side="right") - 1
        self.decile_sum += np.bincount(decile, weights=delta, minlength=_DECILES)
        self.decile_n += np.bincount(decile, minlength=_DECILES)
        self.bucket_sum += np.bincount(bucket, weights=delta, minlength=len(_ABS_EDGES))
        self.bucket_n += np.bincount(bucket, minlength=len(_ABS_EDGES))
        row_sums = np.bincount(row_of, weights=teacher - student, minlength=len(lengths))
        with_tokens = has_fb & (lengths > 0)
        self.row_mean_sum += float((row_sums[with_tokens] / lengths[with_tokens]).sum())
        self.row_mean_count += int(with_tokens.sum())

    def result(self) -> dict:
        def div(a: float, b: int) -> float | None:
            return float(a / b) if b else None

        def table(sums, counts, labels):
            return [{"bucket": lab, "tokens": int(counts[k]), "mean_delta": div(sums[k], counts[k])}
                    for k, lab in enumerate(labels)]

        n_fb = self.fb_tokens
        return {
            "rollouts": self.rows,
            "rollouts_with_feedback": self.feedback_rows,
            "critique_coverage": coverage(self.feedback_rows, self.rows),
            "response_tokens": self.tokens,
            "feedback_response_tokens": n_fb,
            "delta_gap": self.gap.mean,  # token mean of teacher - student, feedback rows (tcrlsd.signals)
            "delta_gap_row_mean": div(self.row_mean_sum, self.row_mean_count),  # mean of feedback rows' means
            "delta_std": self.gap.std,
            "delta_positive_share": div(self.delta_positive, n_fb),
            "student_logprob_mean": div(self.student_sum, self.tokens),
            "student_logprob_mean_feedback_rows": div(self.fb_student_sum, n_fb),
            "teacher_logprob_mean_feedback_rows": div(self.fb_teacher_sum, n_fb),
            "teacher_equals_student_without_feedback": self.nofb_equal,
            "delta_by_relative_decile": table(self.decile_sum, self.decile_n,
                                              [f"{k / 10:.1f}-{(k + 1) / 10:.1f}" for k in range(_DECILES)]),
            "delta_by_position": table(self.bucket_sum, self.bucket_n,
                                       [_bucket_label(k) for k in range(len(_ABS_EDGES))]),
        }


def score_metrics(parts: Iterable[tuple[pa.Table, np.ndarray]]) -> dict:
    """Delta-gap summary of scores given part by part as ``(scores rows, has_feedback per row)``.

    Delta_t = teacher - student, over the tokens of rows with feedback (rows without have Delta = 0
    by construction and would only dilute the mean). Also its spread over token positions: mean
    Delta per relative-position decile (t / T, so short and long responses weigh alike per decile)
    and per absolute-position bucket. The result does not depend on how the rows are cut into parts
    (up to float summation order).
    """
    sums = _Sums()
    for scores, has_fb in parts:
        sums.add(scores, np.asarray(has_fb, dtype=bool))
    return sums.result()


def artifact_metrics(scores_path: str | os.PathLike, inputs: ScoringInputs) -> dict:
    """:func:`score_metrics` of the complete scores artifact at ``scores_path``, read one part file at
    a time, each validated and checked against the inputs' rows (same rollout ids in the same order,
    token lists as long as the responses). Adds ``teacher_checkpoint`` (of the first row) and
    ``sampler_mismatch``: the student log-probs against the rollouts' ``sampler_logprobs``
    (:class:`tcrlsd.offpolicy.MismatchSums`; null for rollouts without that column)."""
    files = artifact_files(scores_path, "scores")
    has_fb = inputs.has_feedback()
    state = {"offset": 0, "teacher_checkpoint": None}
    sampler = inputs.table.column("sampler_logprobs") if "sampler_logprobs" in inputs.table.column_names else None
    mismatch = MismatchSums()

    def parts():
        for path in files:
            scores = read_table(path, "scores")
            start, stop = state["offset"], state["offset"] + scores.num_rows
            if stop > len(inputs):
                raise SchemaError(f"{path}: more scores rows than rollouts ({stop} > {len(inputs)})")
            rollouts = inputs.table.slice(start, scores.num_rows)
            want = rollouts.column("rollout_id")
            if scores.num_rows and not pc.all(pc.equal(scores.column("rollout_id"), want)).as_py():
                raise SchemaError(f"{path}: its rollout_ids are not rows {start}..{stop - 1} of the rollouts, in order")
            check_token_lengths(rollouts, scores, "scores", source=str(path))
            if sampler is not None:
                student = scores.column("student_logprobs")
                mismatch.add(pc.list_flatten(student).to_numpy(zero_copy_only=False),
                             pc.list_flatten(sampler.slice(start, scores.num_rows)).to_numpy(zero_copy_only=False),
                             pc.list_value_length(student).to_numpy(zero_copy_only=False))
            if state["teacher_checkpoint"] is None and scores.num_rows:
                state["teacher_checkpoint"] = scores.column("teacher_checkpoint")[0].as_py()
            state["offset"] = stop
            yield scores, has_fb[start:stop]

    metrics = score_metrics(parts())
    if state["offset"] != len(inputs):
        raise SchemaError(f"{scores_path}: scores hold {state['offset']} rows but there are {len(inputs)} rollouts")
    metrics["teacher_checkpoint"] = state["teacher_checkpoint"]
    metrics["sampler_mismatch"] = mismatch.result() if sampler is not None else None
    return metrics
