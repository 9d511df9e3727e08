"""The update's loss terms as pure functions of per-token tensors, and the aggregation registry.

Per response token t of sequence s (all tensors flat over the tokens of a micro-batch, shape (N,)):

    r_t     = exp(clamp(logp_t - old_t, -20, 20))                 importance ratio
    pg_t    = max(-A_t * r_t, -A_t * clip(r_t, 1 - c_low, 1 + c_high))        PPO-clip
    dual:     for A_t < 0, pg_t = min(pg_t, -A_t * c_dual)        (verl's dual-clip, c_dual = 3)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           k3 estimator (>= 0)
    H_t     = entropy of the policy over the full vocabulary at the position predicting t

    loss    = agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)

Aggregation is linear in the per-token values: agg(x) = sum_t w_t * x_t with weights from one
registry entry. Linear weights are what let the loss be cut into micro-batches and processes and
summed back exactly: every process weighs its tokens with counts of the whole mini-batch.

    token-mean               w_t = 1 / N                 N = response tokens of the mini-batch
    seq-mean-token-mean      w_t = 1 / (S * T_s)         S = sequences, T_s = length of t's sequence
    seq-mean-token-sum-norm  w_t = 1 / (S * L)           L = loss_norm_tokens, a constant (Dr. GRPO:
                                                          the generation budget instead of T_s)

verl divides the token-sum-norm mode by L only; here it is also averaged over sequences so that
the loss scale does not grow with the mini-batch size (same gradient direction, lr differs by S).

torch is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = [
    "AggregationCounts",
    "AGGREGATIONS",
    "aggregate",
    "importance_ratio",
    "ppo_clip_loss",
    "k3_kl",
    "head_logprobs_entropy",
    "lr_factor",
]


@dataclass(frozen=True)
class AggregationCounts:
    """Counts over the whole mini-batch (all micro-batches, all processes)."""

    tokens: int  # N
    sequences: int  # S
    norm_tokens: int  # L (seq-mean-token-sum-norm)


def _token_mean(seq_len, counts: AggregationCounts):
    return seq_len.new_full(seq_len.shape, 1.0 / counts.tokens, dtype=_f32())


def _seq_mean_token_mean(seq_len, counts: AggregationCounts):
    return 1.0 / (counts.sequences * seq_len.to(_f32()))


def _seq_mean_token_sum_norm(seq_len, counts: AggregationCounts):
    return seq_len.new_full(seq_len.shape, 1.0 / (counts.sequences * counts.norm_tokens), dtype=_f32())


def _f32():
    import torch

    return torch.float32


# name -> weights(seq_len (N,) int: length of each token's sequence, counts) -> w (N,) float32
AGGREGATIONS: dict[str, Callable] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(values, seq_len, mode: str, counts: AggregationCounts):
    """sum_t w_t * values_t with the weights of ``mode`` (a micro-batch's share of the loss)."""
    try:
        weights = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {', '.join(AGGREGATIONS)}") from None
    return (weights(seq_len, counts) * values).sum()


def importance_ratio(logp, old_logp):
    """exp(clamp(logp - old, +-20)): the clamp keeps a stale or corrupt old log-prob from overflowing."""
    import torch

    return torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))


def ppo_clip_loss(logp, old_logp, adv, clip_low: float, clip_high: float, dual_clip: float | None):
    """Per-token PPO-clip loss and whether the clip was active there (both (N,)).

    ``clipped`` marks tokens whose loss came from the clipped branch (the gradient is zero there),
    the token share of which is ``pg_clipfrac``.
    """
    import torch

    ratio = importance_ratio(logp, old_logp)
    unclipped = -adv * ratio
    clipped_term = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip is not None:
        lower = -adv * dual_clip
        dual = (adv < 0) & (loss > lower)
        loss = torch.where(adv < 0, torch.minimum(loss, lower), loss)
        clipped = clipped | dual
    return loss, clipped


def k3_kl(logp, ref_logp):
    """k3 estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (Schulman), >= 0."""
    import torch

    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.exp(d) - d - 1.0


def head_logprobs_entropy(hidden, weight, targets, softcap: float | None = None):
    """log p(target) and full-vocabulary entropy at ``hidden`` positions, projected in fp32.

    hidden (n, H), weight (V, H), targets (n,) -> (logp (n,), entropy (n,)). The projection runs in
    fp32 (hidden and weight cast up) exactly like the score stage's, so the update's first ratio is 1.
    """
    import torch

    logits = torch.nn.functional.linear(hidden.float(), weight.float())  # (n, V) fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # (n,)
    probs = torch.softmax(logits, dim=-1)  # (n, V)
    entropy = lse - (probs * logits).sum(-1)  # (n,)  H = -sum p log p = lse - sum p * logit
    return logp, entropy


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based, counted over all iterations).

    Linear warm-up over ``warmup_steps`` (step 0 gets 1/warmup), then constant or a cosine from 1 down
    to ``min_ratio`` at ``total_steps`` (held there after).
    """
    import math

    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}; known: constant, cosine")
