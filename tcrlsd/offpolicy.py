"""The sampler/scorer mismatch: its per-iteration metrics and the truncated importance weights.

The generate stage samples with one set of numerics (vLLM in bf16 with its own kernels, say) and
stores the sampler's log-prob of each sampled token, ``rollouts.sampler_logprobs`` = log mu(y_t):
the distribution the token was drawn from (:mod:`tcrlsd.generation`). The score stage recomputes
log pi(y_t) with the training weights in its own precision (``scores.student_logprobs``), which the
update uses as the PPO "old" log-probs, so the first PPO ratio is 1 although the samples came from
mu, not pi. Per token, with the log-ratio clamped to [-20, 20] (a corrupt value cannot overflow):

    l_t = log pi(y_t) - log mu(y_t)             scorer minus sampler
    r_t = exp(l_t)                              importance ratio pi / mu

Metrics (score stage, ``sampler_mismatch``): token means of |l_t|, of the k1 KL estimate -l_t and of
the k3 estimate r_t - 1 - l_t (both estimate KL(mu || pi) from tokens drawn from mu; k3 is >= 0 per
token), and the extreme ratios.

Truncated importance sampling (``update.rollout_is``, registry :data:`ROLLOUT_IS`): the per-token
PPO loss is multiplied by

    token     w_t = min(r_t, C)
    sequence  w_t = min(exp(sum_s l_s), C)      the same weight for every token of the sequence
    none      w_t = 1

with C = ``update.rollout_is_cap``. This is TIS as in verl's rollout correction (``truncate`` mode)
and TRL's ``vllm_importance_sampling_cap`` (token / sequence truncation): weights above the cap are
truncated, never masked, and the weights are data (detached: mu and the score stage's pi are both
fixed before the update), so they multiply the loss, not the ratio inside the clip. Where this
departs: verl and TRL take pi from the trainer's own old-log-prob pass, here it is the score stage's
``student_logprobs`` (the same role: the update's old log-probs).

Where sampler and scorer are the same numbers, the score stage skips the student forward
(:mod:`tcrlsd.sampler`).

numpy only; importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["ROLLOUT_IS", "LOG_RATIO_CLAMP", "log_ratio", "rollout_is_weights", "MismatchSums"]

LOG_RATIO_CLAMP = 20.0


def log_ratio(scorer, sampler) -> np.ndarray:
    """l_t = clamp(log pi - log mu, -20, 20) in float64: ``(T,), (T,) -> (T,)``."""
    s = np.asarray(scorer, dtype=np.float64)
    q = np.asarray(sampler, dtype=np.float64)
    if s.shape != q.shape:
        raise ValueError(f"scorer and sampler log-probs differ in length: {s.shape} vs {q.shape}")
    return np.clip(s - q, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _none(lr: np.ndarray, cap: float) -> np.ndarray:
    return np.ones_like(lr)


def _token(lr: np.ndarray, cap: float) -> np.ndarray:
    return np.minimum(np.exp(lr), cap)


def _sequence(lr: np.ndarray, cap: float) -> np.ndarray:
    total = float(np.clip(lr.sum(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return np.full_like(lr, min(float(np.exp(total)), cap))


# mode -> weights(l (T,) float64: one sequence's clamped log-ratios, cap) -> (T,) float64
ROLLOUT_IS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "none": _none,
    "token": _token,
    "sequence": _sequence,
}


def rollout_is_weights(scorer, sampler, mode: str, cap: float) -> np.ndarray:
    """The truncated importance weights of one sequence (module notes), ``(T,)`` float32."""
    try:
        fn = ROLLOUT_IS[mode]
    except KeyError:
        raise ValueError(f"unknown rollout_is mode {mode!r}; known: {', '.join(ROLLOUT_IS)}") from None
    if not cap > 0:
        raise ValueError(f"rollout_is_cap must be > 0, got {cap}")
    return fn(log_ratio(scorer, sampler), float(cap)).astype(np.float32)


@dataclass
class MismatchSums:
    """Running sums of the mismatch metrics over the sequences folded in so far."""

    sequences: int = 0
    tokens: int = 0
    abs_sum: float = 0.0
    k1_sum: float = 0.0
    k3_sum: float = 0.0
    max_log_ratio: float = -np.inf
    min_log_ratio: float = np.inf
    max_abs_seq_log_ratio: float = 0.0

    def add(self, scorer, sampler, lengths) -> None:
        """Fold in sequences given flat: ``scorer``/``sampler`` (N,) log-probs, ``lengths`` (B,) tokens each."""
        lr = log_ratio(scorer, sampler)  # (N,)
        lengths = np.asarray(lengths, dtype=np.int64)  # (B,)
        if int(lengths.sum()) != len(lr):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(lr)} tokens were given")
        self.sequences += len(lengths)
        self.tokens += len(lr)
        if not len(lr):
            return
        self.abs_sum += float(np.abs(lr).sum())
        self.k1_sum += float((-lr).sum())
        self.k3_sum += float((np.expm1(lr) - lr).sum())
        self.max_log_ratio = max(self.max_log_ratio, float(lr.max()))
        self.min_log_ratio = min(self.min_log_ratio, float(lr.min()))
        seq = np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=lr, minlength=len(lengths))  # (B,)
        self.max_abs_seq_log_ratio = max(self.max_abs_seq_log_ratio, float(np.abs(seq).max()))

    def result(self) -> dict:
        n = self.tokens
        if not n:
            return {"sequences": self.sequences, "tokens": 0, "mean_abs_log_ratio": None, "kl_k1": None,
                    "kl_k3": None, "max_ratio": None, "min_ratio": None, "max_abs_seq_log_ratio": None}
        return {
            "sequences": self.sequences,
            "tokens": n,
            "mean_abs_log_ratio": self.abs_sum / n,  # mean |log pi - log mu|
            "kl_k1": self.k1_sum / n,  # mean (log mu - log pi): KL(mu || pi), unbiased, any sign
            "kl_k3": self.k3_sum / n,  # mean (r - 1 - log r): KL(mu || pi), >= 0 per token
            "max_ratio": float(np.exp(self.max_log_ratio)),  # largest pi / mu of a token
            "min_ratio": float(np.exp(self.min_log_ratio)),
            "max_abs_seq_log_ratio": self.max_abs_seq_log_ratio,  # largest |sum_t l_t| of a sequence
        }
