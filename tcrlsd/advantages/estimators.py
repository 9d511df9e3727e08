"""The estimators: pure functions, two signatures, one registry (:data:`ESTIMATORS`).

An estimator is a pair: its *outcome* advantage A (one number per rollout, from the rewards: a group
or batch baseline) and its *token* form Â_t (from A and the teacher gap Δ_t). Adding one = one
function (an outcome baseline or a token form) + one line in :data:`ESTIMATORS` (+ its reference
in :data:`_REFERENCE` and the tests' hand table); nothing branches on an estimator's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

STD_EPS = 1e-6  # added to the group std, as in verl
WHITEN_EPS = 1e-8  # added to the batch variance, as in verl's masked_whiten


@dataclass(frozen=True)
class Settings:
    """Everything an estimator reads besides rewards, A and Δ (λ already resolved for the iteration)."""

    lam: float
    eps_w: float
    alpha: float
    beta: float
    delta_clip: float | None = None
    norm_by_std: bool = True  # the GRPO outcome: divide by the group std
    # rlcsd (RLCSD, arXiv 2606.11709): r_t = clip(weight · λ · tanh(e_t / temperature), ±clip), dropped
    # where |r_t| <= threshold. Defaults: the paper's released configs (tau 0.02, beta 1.0, delta
    # 0.02, residual clip ±2.0).
    contrast_temperature: float = 0.02
    contrast_weight: float = 1.0
    contrast_threshold: float = 0.02
    contrast_clip: float = 2.0


# ---------------------------------------------------------------------------------------------
# Outcome advantages: one number per rollout.
#   group:   (R,) int    group index 0..G-1 (one group per prompt)
#   rewards: (R,) float  verifier reward
#   lengths: (R,) int    response tokens (batch-whitened forms weigh rollouts by tokens, as verl)
#   returns (R,) float64 A
# A group of one, or a group whose rewards are all equal, has no relative signal: every group
# baseline gives it A = 0 exactly (verl: a singleton group keeps A = r; see docs/ARCHITECTURE.md).

Outcome = Callable[[np.ndarray, np.ndarray, np.ndarray, Settings], np.ndarray]


def _group_stats(group: np.ndarray, rewards: np.ndarray):
    """(count (G,), mean (G,), centred r − mean (R,), flat (G,) singleton-or-all-equal)."""
    n_groups = int(group.max()) + 1
    count = np.bincount(group, minlength=n_groups).astype(np.float64)  # (G,)
    mean = np.bincount(group, weights=rewards, minlength=n_groups) / np.maximum(count, 1)  # (G,)
    centred = rewards - mean[group]  # (R,)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, group, rewards)
    np.maximum.at(hi, group, rewards)
    return count, mean, centred, (count < 2) | (lo == hi)


def _as_arrays(group, rewards):
    return np.asarray(group, dtype=np.int64), np.asarray(rewards, dtype=np.float64)


def group_advantages(group: np.ndarray, rewards: np.ndarray, norm_by_std: bool) -> np.ndarray:
    """GRPO A per rollout: (r − mean_group) / (std_group + 1e-6), or r − mean_group. Returns (R,) float64.

    Unbiased std (ddof=1) like verl; a group of one, or a group whose rewards are all equal, gets 0.
    """
    group, r = _as_arrays(group, rewards)  # (R,), (R,)
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    count, _, centred, flat = _group_stats(group, r)
    ss = np.bincount(group, weights=centred * centred, minlength=len(count))  # (G,)
    std = np.sqrt(ss / np.maximum(count - 1, 1))  # (G,) unbiased; singleton handled by flat
    adv = centred / (std[group] + STD_EPS) if norm_by_std else centred
    return np.where(flat[group], 0.0, adv)


def group_baseline(group, rewards, lengths, s: Settings) -> np.ndarray:
    """GRPO (and every RLSD form): :func:`group_advantages` with ``s.norm_by_std``."""
    return group_advantages(group, rewards, s.norm_by_std)


def leave_one_out(group, rewards, lengths, s: Settings) -> np.ndarray:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean)."""
    group, r = _as_arrays(group, rewards)
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    count, _, centred, flat = _group_stats(group, r)
    n = count[group]  # (R,)
    return np.where(flat[group], 0.0, centred * n / np.maximum(n - 1, 1))


def _whiten(x: np.ndarray, lengths) -> np.ndarray:
    """(x − mean) / sqrt(var + 1e-8) over the batch's response tokens (each rollout weighs its length;
    unbiased var over tokens), as verl's masked_whiten on a reward broadcast over the response."""
    w = np.asarray(lengths, dtype=np.float64)  # (R,)
    n = w.sum()
    if n < 2:  # verl raises on fewer than 2 tokens; no batch signal here
        return np.zeros_like(x)
    mean = (w * x).sum() / n
    var = (w * (x - mean) ** 2).sum() / n * (n / (n - 1))
    return (x - mean) / np.sqrt(var + WHITEN_EPS)


def batch_whitened(group, rewards, lengths, s: Settings) -> np.ndarray:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): the return (= r, γ = 1, one reward at the end), whitened
    over the batch's tokens; no group baseline."""
    _, r = _as_arrays(group, rewards)
    return _whiten(r, lengths)


def group_centred_batch_whitened(group, rewards, lengths, s: Settings) -> np.ndarray:
    """REINFORCE++-baseline (same paper): r − mean_group, then whitened over the batch's tokens."""
    group, r = _as_arrays(group, rewards)
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    _, _, centred, flat = _group_stats(group, r)
    return _whiten(np.where(flat[group], 0.0, centred), lengths)


# ---------------------------------------------------------------------------------------------
# Token forms: Â_t from A and Δ.
#   adv:   (N,) float32  the rollout's outcome advantage A, repeated over its tokens
#   delta: (N,) float32  Δ_t = teacher − student log-prob (the contrastive gap e_t where the entry's
#                        gap is "contrast": see :func:`contrast_gap`)
#   returns (N,) Â_t, same dtype
# Token math runs in float32, the dtype of the inputs and of the stored output: float64 gave the
# same values to a few float32 ulps at twice the time (the outcome advantage itself is float64).

TokenForm = Callable[[np.ndarray, np.ndarray, Settings], np.ndarray]


def _reweight(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    """m_t = (1 − λ) + λ · clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for large Δ; the clip bounds it
        w = np.exp(np.sign(adv) * delta)  # (N,)
    return (1.0 - s.lam) + s.lam * np.clip(w, 1.0 - s.eps_w, 1.0 + s.eps_w)


def _additive_delta(delta: np.ndarray, s: Settings) -> np.ndarray:
    return delta if s.delta_clip is None else np.clip(delta, -s.delta_clip, s.delta_clip)


def outcome_only(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    """Â_t = A (GRPO, RLOO, REINFORCE++: the teacher is not used)."""
    return adv.copy()


def rlsd(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return adv * _reweight(adv, delta, s)


def rlsd_add(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return (1.0 - s.lam) * adv + s.lam * _additive_delta(delta, s)


def rlsd_hybrid(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return s.alpha * adv * _reweight(adv, delta, s) + s.beta * _additive_delta(delta, s)


def contrast_residual(gap: np.ndarray, s: Settings) -> np.ndarray:
    """r_t = clip(weight · λ · tanh(e_t / temperature), ±clip), 0 where |r_t| <= threshold."""
    r = np.clip(s.contrast_weight * s.lam * np.tanh(gap / s.contrast_temperature), -s.contrast_clip, s.contrast_clip)
    return np.where(np.abs(r) > s.contrast_threshold, r, 0.0)


def rlcsd(adv: np.ndarray, gap: np.ndarray, s: Settings) -> np.ndarray:
    """A + r_t with the verifier's sign kept: A > 0 -> max(A + r, 0), A < 0 -> min(A + r, 0), A = 0 -> 0.

    ``gap`` is the contrastive gap e_t (:func:`contrast_gap`), not Δ_t (the entry's ``gap``).
    """
    raw = adv + contrast_residual(gap, s)
    return np.where(adv > 0, np.maximum(raw, 0.0), np.where(adv < 0, np.minimum(raw, 0.0), 0.0))


def contrast_gap(teacher: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """e_t = log Q_t − log((1/K') Σ_j Q_t^(j)): ``teacher`` (N,) the correct-hint log-probs, ``extra``
    (K', N) the wrong-hint contexts' log-probs; the wrong side is the log of their mean probability
    (RLCSD's K-marginal), computed in float64 and rounded to float32 before the difference, which is
    taken in float32 like Δ_t: K' copies of one context give that context back exactly, so a row
    whose contexts are all the student's gets e_t = 0 exactly. Returns (N,) float32."""
    extra = np.asarray(extra, dtype=np.float64)  # (K', N)
    mixture = (np.logaddexp.reduce(extra, axis=0) - math.log(extra.shape[0])).astype(np.float32)  # (N,)
    return np.asarray(teacher, dtype=np.float32) - mixture


@dataclass(frozen=True)
class Estimator:
    """One registry entry: which outcome advantage A, and how Â_t is formed from A and a teacher gap."""

    outcome: Outcome
    token: TokenForm
    doc: str = ""  # one line for --help and the docs
    # The gap the token form reads: "delta" (Δ_t = log Q − log P) or "contrast" (e_t, the correct-hint
    # teacher against the wrong-hint teachers: needs scores with extra teacher contexts).
    gap: str = "delta"


ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(group_baseline, outcome_only, "Â = A, A = group-normalised reward"),
    "rlsd": Estimator(group_baseline, rlsd, "Â = A·m_t"),
    "rlsd_add": Estimator(group_baseline, rlsd_add, "Â = (1−λ)·A + λ·Δ_t"),
    "rlsd_hybrid": Estimator(group_baseline, rlsd_hybrid, "Â = α·A·m_t + β·Δ_t"),
    "rloo": Estimator(leave_one_out, outcome_only, "Â = r − mean of the group's other rewards"),
    "reinforce_pp": Estimator(batch_whitened, outcome_only, "Â = r whitened over the batch's tokens"),
    "reinforce_pp_baseline": Estimator(group_centred_batch_whitened, outcome_only,
                                       "Â = (r − group mean) whitened over the batch's tokens"),
    "rlcsd": Estimator(group_baseline, rlcsd, "Â = A + r_t(e_t), A's sign kept (needs critique.wrong_hints)",
                       gap="contrast"),
}

# The estimators that read the contrastive gap e_t (need scores with extra teacher contexts).
READS_CONTRAST: frozenset[str] = frozenset(n for n, e in ESTIMATORS.items() if e.gap == "contrast")


def outcome_advantages(estimator: str, group, rewards, lengths, settings: Settings) -> np.ndarray:
    """A per rollout for ``estimator``: (R,) float64."""
    return ESTIMATORS[estimator].outcome(group, rewards, lengths, settings)


# ---------------------------------------------------------------------------------------------
# Group advantage and token-level computation on flat arrays


def token_advantages(
    estimator: str,
    group_adv: np.ndarray,
    offsets: np.ndarray,
    student: np.ndarray,
    teacher: np.ndarray,
    settings: Settings,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """Â for a batch of rows given as flat token arrays.

    ``group_adv``: (B,) A per row; ``offsets``: (B+1,) start of each row in the flat arrays (0-based);
    ``student``/``teacher``: (N,) log-probs; ``extra``: (K', N) wrong-hint log-probs (needed by the
    estimators of :data:`READS_CONTRAST`). Returns (N,) float32.
    """
    lengths = np.diff(offsets)  # (B,)
    adv_tok = np.repeat(np.asarray(group_adv, dtype=np.float32), lengths)  # (N,)
    if estimator in READS_CONTRAST:
        if extra is None:
            raise ValueError(f"estimator {estimator!r} needs the wrong-hint contexts' log-probs (extra)")
        gap = contrast_gap(teacher, extra)  # (N,) e_t
    else:
        gap = np.asarray(teacher, dtype=np.float32) - np.asarray(student, dtype=np.float32)  # (N,) Δ_t
    return ESTIMATORS[estimator].token(adv_tok, gap, settings).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# A plain restatement of the formulas, token by token in Python floats: the ground truth for the
# loop-vs-vectorised tests and the "per-row Python loop" baseline of bench/recompute.py.

_REFERENCE: dict[str, Callable[[float, float, float, float, Settings], float]] = {
    # (A, Δ, m, Δ for the additive term, settings) -> Â_t
    "grpo": lambda a, d, m, dd, s: a,
    "rlsd": lambda a, d, m, dd, s: a * m,
    "rlsd_add": lambda a, d, m, dd, s: (1.0 - s.lam) * a + s.lam * dd,
    "rlsd_hybrid": lambda a, d, m, dd, s: s.alpha * a * m + s.beta * dd,
    "rloo": lambda a, d, m, dd, s: a,
    "reinforce_pp": lambda a, d, m, dd, s: a,
    "reinforce_pp_baseline": lambda a, d, m, dd, s: a,
    "rlcsd": lambda a, e, m, dd, s: _reference_rlcsd(a, e, s),  # e = the contrastive gap
}


def _reference_rlcsd(a: float, e: float, s: Settings) -> float:
    r = min(max(s.contrast_weight * s.lam * math.tanh(e / s.contrast_temperature), -s.contrast_clip), s.contrast_clip)
    r = r if abs(r) > s.contrast_threshold else 0.0
    return max(a + r, 0.0) if a > 0 else min(a + r, 0.0) if a < 0 else 0.0


def reference_token_advantages(
    estimator: str, group_adv: float, student: Sequence[float], teacher: Sequence[float], s: Settings,
    extra: Sequence[Sequence[float]] = (),
) -> list[float]:
    """Â for one row, one token at a time (slow; for tests and benchmarks only). ``extra``: one list
    of log-probs per wrong-hint context (the estimators of :data:`READS_CONTRAST`)."""
    sign = (group_adv > 0) - (group_adv < 0)
    out = []
    for t, (p, q) in enumerate(zip(student, teacher)):
        d = float(q) - float(p)
        if estimator in READS_CONTRAST:  # e_t = log Q − log(mean_j exp(log Q_j))
            d = float(q) - math.log(sum(math.exp(float(w[t])) for w in extra) / len(extra))
        try:
            w = math.exp(sign * d)
        except OverflowError:
            w = math.inf
        m = (1.0 - s.lam) + s.lam * min(max(w, 1.0 - s.eps_w), 1.0 + s.eps_w)
        dd = d if s.delta_clip is None else min(max(d, -s.delta_clip), s.delta_clip)
        out.append(_REFERENCE[estimator](group_adv, d, m, dd, s))
    return out
