"""Metrics of a scores artifact: Delta-gap and its spread over token positions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.schemas import check_token_lengths
from tcrlsd.score.inputs import ScoringInputs

# ----------------------------------------------------------------------------- metrics

_ABS_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024)


def _bucket_label(k: int) -> str:
    lo = _ABS_EDGES[k]
    return f"{lo}-{_ABS_EDGES[k + 1] - 1}" if k + 1 < len(_ABS_EDGES) else f"{lo}+"


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x, dtype=np.float64)) if len(x) else None


def score_metrics(scores: pa.Table, inputs: ScoringInputs) -> dict:
    """Delta-gap summary of a complete scores artifact.

    Delta_t = teacher - student, over the tokens of rows with feedback (rows without have Delta = 0
    by construction and would only dilute the mean). Also its spread over token positions: mean
    Delta per relative-position decile (t / T, so short and long responses weigh alike per decile)
    and per absolute-position bucket.
    """
    scores = check_token_lengths(
        pa.table({"rollout_id": inputs.rollout_ids,
                  "response_token_ids": pa.array(inputs.responses, pa.list_(pa.int32()))}),
        scores, "scores",
    )
    has_fb = np.array([t is not None for t in inputs.teacher_prompts], dtype=bool)
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
    nofb_equal = bool(np.array_equal(teacher[~fb_tok], student[~fb_tok]))

    decile = np.minimum((10 * d_pos) // np.maximum(d_len, 1), 9)
    bucket = np.searchsorted(np.asarray(_ABS_EDGES), d_pos, side="right") - 1
    row_sums = np.bincount(row_of, weights=teacher - student, minlength=len(lengths))
    with_tokens = has_fb & (lengths > 0)
    row_means = row_sums[with_tokens] / lengths[with_tokens]

    def _table(keys, labels):
        return [{"bucket": lab, "tokens": int(np.sum(keys == k)), "mean_delta": _mean(delta[keys == k])}
                for k, lab in labels]

    return {
        "rollouts": int(len(lengths)),
        "rollouts_with_feedback": int(has_fb.sum()),
        "critique_coverage": float(has_fb.mean()) if len(has_fb) else None,
        "response_tokens": int(len(student)),
        "feedback_response_tokens": int(len(delta)),
        "delta_gap": _mean(delta),  # token mean of teacher - student over rows with feedback
        "delta_gap_row_mean": _mean(row_means),  # mean over feedback rows of their token-mean Delta
        "delta_std": float(np.std(delta)) if len(delta) else None,
        "delta_positive_share": float(np.mean(delta > 0)) if len(delta) else None,
        "student_logprob_mean": _mean(student),
        "student_logprob_mean_feedback_rows": _mean(student[fb_tok]),
        "teacher_logprob_mean_feedback_rows": _mean(teacher[fb_tok]),
        "teacher_equals_student_without_feedback": nofb_equal,
        "delta_by_relative_decile": _table(decile, [(k, f"{k / 10:.1f}-{(k + 1) / 10:.1f}") for k in range(10)]),
        "delta_by_position": _table(bucket, [(k, _bucket_label(k)) for k in range(len(_ABS_EDGES))]),
    }
