"""The estimators: pure functions, one signature, one registry (:data:`ESTIMATORS`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

STD_EPS = 1e-6  # added to the group std, as in verl


@dataclass(frozen=True)
class Settings:
    """Everything an estimator reads besides A and Δ (λ already resolved for the iteration)."""

    lam: float
    eps_w: float
    alpha: float
    beta: float
    delta_clip: float | None = None




# ---------------------------------------------------------------------------------------------
# The estimators: pure functions, one signature, one registry.
#   adv:   (N,) float32  the rollout's group advantage A, repeated over its tokens
#   delta: (N,) float32  Δ_t = teacher − student log-prob
#   returns (N,) Â_t, same dtype
# Token math runs in float32, the dtype of the inputs and of the stored output: float64 gave the
# same values to a few float32 ulps at twice the time (the group advantage itself is float64).

Estimator = Callable[[np.ndarray, np.ndarray, Settings], np.ndarray]


def _reweight(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    """m_t = (1 − λ) + λ · clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for large Δ; the clip bounds it
        w = np.exp(np.sign(adv) * delta)  # (N,)
    return (1.0 - s.lam) + s.lam * np.clip(w, 1.0 - s.eps_w, 1.0 + s.eps_w)


def _additive_delta(delta: np.ndarray, s: Settings) -> np.ndarray:
    return delta if s.delta_clip is None else np.clip(delta, -s.delta_clip, s.delta_clip)


def grpo(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return adv.copy()


def rlsd(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return adv * _reweight(adv, delta, s)


def rlsd_add(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return (1.0 - s.lam) * adv + s.lam * _additive_delta(delta, s)


def rlsd_hybrid(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return s.alpha * adv * _reweight(adv, delta, s) + s.beta * _additive_delta(delta, s)


ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo,
    "rlsd": rlsd,
    "rlsd_add": rlsd_add,
    "rlsd_hybrid": rlsd_hybrid,
}


# ---------------------------------------------------------------------------------------------
# Group advantage and token-level computation on flat arrays


def group_advantages(group: np.ndarray, rewards: np.ndarray, norm_by_std: bool) -> np.ndarray:
    """GRPO A per rollout. ``group``: (R,) int group index 0..G-1; ``rewards``: (R,). Returns (R,) float64.

    Unbiased std (ddof=1) like verl; a group of one, or a group whose rewards are all equal, gets 0.
    """
    group = np.asarray(group, dtype=np.int64)
    r = np.asarray(rewards, dtype=np.float64)  # (R,)
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    n_groups = int(group.max()) + 1
    count = np.bincount(group, minlength=n_groups).astype(np.float64)  # (G,)
    mean = np.bincount(group, weights=r, minlength=n_groups) / np.maximum(count, 1)  # (G,)
    centred = r - mean[group]  # (R,)
    ss = np.bincount(group, weights=centred * centred, minlength=n_groups)  # (G,)
    std = np.sqrt(ss / np.maximum(count - 1, 1))  # (G,) unbiased; singleton handled below
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, group, r)
    np.maximum.at(hi, group, r)
    flat = (count < 2) | (lo == hi)  # (G,) singleton or all-equal: no relative signal
    adv = centred / (std[group] + STD_EPS) if norm_by_std else centred
    return np.where(flat[group], 0.0, adv)


def token_advantages(
    estimator: str,
    group_adv: np.ndarray,
    offsets: np.ndarray,
    student: np.ndarray,
    teacher: np.ndarray,
    settings: Settings,
) -> np.ndarray:
    """Â for a batch of rows given as flat token arrays.

    ``group_adv``: (B,) A per row; ``offsets``: (B+1,) start of each row in the flat arrays (0-based);
    ``student``/``teacher``: (N,) log-probs. Returns (N,) float32.
    """
    lengths = np.diff(offsets)  # (B,)
    adv_tok = np.repeat(np.asarray(group_adv, dtype=np.float32), lengths)  # (N,)
    delta = np.asarray(teacher, dtype=np.float32) - np.asarray(student, dtype=np.float32)  # (N,)
    return ESTIMATORS[estimator](adv_tok, delta, settings).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# A plain restatement of the formulas, token by token in Python floats: the ground truth for the
# loop-vs-vectorised tests and the "per-row Python loop" baseline of bench/recompute.py.

_REFERENCE: dict[str, Callable[[float, float, float, float, Settings], float]] = {
    # (A, Δ, m, Δ for the additive term, settings) -> Â_t
    "grpo": lambda a, d, m, dd, s: a,
    "rlsd": lambda a, d, m, dd, s: a * m,
    "rlsd_add": lambda a, d, m, dd, s: (1.0 - s.lam) * a + s.lam * dd,
    "rlsd_hybrid": lambda a, d, m, dd, s: s.alpha * a * m + s.beta * dd,
}


def reference_token_advantages(
    estimator: str, group_adv: float, student: Sequence[float], teacher: Sequence[float], s: Settings
) -> list[float]:
    """Â for one row, one token at a time (slow; for tests and benchmarks only)."""
    sign = (group_adv > 0) - (group_adv < 0)
    out = []
    for p, q in zip(student, teacher):
        d = float(q) - float(p)
        try:
            w = math.exp(sign * d)
        except OverflowError:
            w = math.inf
        m = (1.0 - s.lam) + s.lam * min(max(w, 1.0 - s.eps_w), 1.0 + s.eps_w)
        dd = d if s.delta_clip is None else min(max(d, -s.delta_clip), s.delta_clip)
        out.append(_REFERENCE[estimator](group_adv, d, m, dd, s))
    return out
