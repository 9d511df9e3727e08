"""Metrics accumulated over the streamed batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcrlsd.advantages.inputs import RolloutIndex

# ---------------------------------------------------------------------------------------------
# Metrics accumulated over batches


def row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row sums of flat token ``values`` (N,) with row ``offsets`` (B+1,); empty rows give 0.

    ``np.add.reduceat`` over the starts of the non-empty rows: each segment then runs exactly to
    the next non-empty row's start, since empty rows own no tokens.
    """
    lengths = np.diff(offsets)  # (B,)
    dtype = np.int64 if values.dtype == np.bool_ else np.float64
    out = np.zeros(len(lengths), dtype=dtype)  # (B,)
    filled = lengths > 0
    if filled.any():
        out[filled] = np.add.reduceat(values, offsets[:-1][filled], dtype=dtype)
    return out


@dataclass
class EstimatorTotals:
    """Sums over tokens of one estimator's Â."""

    abs_sum: float = 0.0
    sum: float = 0.0
    nonzero: int = 0
    saturated_nonzero: int = 0

    def add(self, adv: np.ndarray, offsets: np.ndarray, saturated: np.ndarray) -> None:
        """``adv``: (N,) Â of a batch; ``offsets``: (B+1,); ``saturated``: (B,) row in an all-equal group."""
        nonzero = row_sums(adv != 0, offsets)  # (B,)
        self.abs_sum += float(np.abs(adv).sum(dtype=np.float64))
        self.sum += float(adv.sum(dtype=np.float64))
        self.nonzero += int(nonzero.sum())
        self.saturated_nonzero += int(nonzero[saturated].sum())


@dataclass
class SharedSums:
    """Sums that do not depend on the estimator."""

    tokens: int = 0
    saturated_tokens: int = 0
    delta_abs_sum: float = 0.0
    feedback_contrast_sum: float = 0.0  # Σ e_t over rows with feedback (extra teacher contexts only)
    feedback_contrast_tokens: int = 0  # their tokens
    teacher_differs_rows: int = 0


def safe_ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def group_metrics(ro: RolloutIndex) -> tuple[dict, np.ndarray]:
    """Reward and saturation metrics; also (G,) bool 'all rewards equal' per group."""
    g = ro.group
    n_groups = int(g.max()) + 1
    count = np.bincount(g, minlength=n_groups)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, g, ro.rewards)
    np.maximum.at(hi, g, ro.rewards)
    saturated = lo == hi  # (G,) includes groups of one
    metrics = {
        "rollouts": int(len(g)),
        "groups": n_groups,
        "reward_mean": float(ro.rewards.mean()),
        "saturated_group_share": float(saturated.mean()),
        "saturated_all_correct_share": float((saturated & (hi > 0)).mean()),
        "saturated_all_wrong_share": float((saturated & (hi <= 0)).mean()),
        "singleton_group_share": float((count == 1).mean()),
    }
    return metrics, saturated


def estimator_metrics(t: EstimatorTotals, sh: SharedSums) -> dict:
    return {
        "adv_abs_mean": safe_ratio(t.abs_sum, sh.tokens),
        "adv_mean": safe_ratio(t.sum, sh.tokens),
        "adv_nonzero_token_share": safe_ratio(t.nonzero, sh.tokens),
        "saturated_adv_nonzero_token_share": safe_ratio(t.saturated_nonzero, sh.saturated_tokens),
    }
