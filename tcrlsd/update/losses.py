"""The update's loss terms as pure functions of per-token tensors, and the aggregation registry.

Per response token t of sequence s (all tensors flat over the tokens of a micro-batch, shape (N,)):

    r_t     = exp(clamp(logp_t - old_t, -20, 20))                 importance ratio
    pg_t    = max(-A_t * r_t, -A_t * clip(r_t, 1 - c_low, 1 + c_high))        PPO-clip
    dual:     for A_t < 0, pg_t = min(pg_t, -A_t * c_dual)        (verl's dual-clip, c_dual = 3)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           k3 estimator (>= 0)
    H_t     = entropy of the policy over the full vocabulary at the position predicting t

    loss    = agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)

The policy-gradient term pg_t comes from one registry, :data:`POLICY_LOSSES` (``update.policy_loss``):

    ppo    the PPO-clip above, ratio per token
    gspo   GSPO (Zheng et al. 2025, arXiv 2507.18071), its token-level form GSPO-token: one ratio per
           sequence, s_i = exp(mean_t(logp_t - old_t)) (the geometric mean of the token ratios),
           applied to each token as s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)] (value s_i, gradient
           s_i * grad log pi(y_t)), then clipped like PPO:
               pg_t = max(-A_t * s_i,t, -A_t * clip(s_i,t, 1 - c_low, 1 + c_high))
           With A constant over a sequence and seq-mean-token-mean aggregation this is the paper's
           sequence-level GSPO gradient exactly. The paper's clip range is 3e-4 / 4e-4 (verl's GSPO
           recipe uses the same), not PPO's 0.2: set clip_ratio_low/high with it (preset gspo).
           Departures: verl clamps log s_i,t at +10, here the sequence log-ratio is clamped to +-20 like
           the PPO ratio; verl forces seq-mean-token-mean aggregation inside its GSPO loss, here
           loss_agg_mode decides (the preset sets seq-mean-token-mean); no dual clip.

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
    "gspo_loss",
    "POLICY_LOSSES",
    "ClipSettings",
    "k3_kl",
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


@dataclass(frozen=True)
class ClipSettings:
    """What a policy loss reads besides the per-token tensors."""

    low: float  # clip_ratio_low
    high: float  # clip_ratio_high
    dual: float | None = None  # dual_clip (ppo only)


def _clip(adv, ratio, clip: ClipSettings):
    """max(-A*r, -A*clip(r)) and where the clipped branch won."""
    import torch

    unclipped = -adv * ratio
    clipped_term = -adv * torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)
    return torch.maximum(unclipped, clipped_term), clipped_term > unclipped


def ppo_clip_loss(logp, old_logp, adv, seq, clip: ClipSettings):
    """Per-token PPO-clip loss and whether the clip was active there (both (N,)).

    ``seq`` (N,) is the token's sequence index (unused: PPO's ratio is per token). ``clipped`` marks
    tokens whose loss came from the clipped branch (the gradient is zero there), the token share of
    which is ``pg_clipfrac``.
    """
    import torch

    loss, clipped = _clip(adv, importance_ratio(logp, old_logp), clip)
    if clip.dual is not None:
        lower = -adv * clip.dual
        dual = (adv < 0) & (loss > lower)
        loss = torch.where(adv < 0, torch.minimum(loss, lower), loss)
        clipped = clipped | dual
    return loss, clipped


def gspo_loss(logp, old_logp, adv, seq, clip: ClipSettings):
    """Per-token GSPO-token loss (see the module docstring) and where the clip was active (both (N,)).

    ``seq`` (N,) int: index of each token's sequence (0..S-1) in this micro-batch; every token of a
    sequence is in the same micro-batch, so the per-sequence mean is complete.
    """
    import torch

    log_ratio = (logp - old_logp).detach()  # (N,)
    n_seq = int(seq.max()) + 1 if seq.numel() else 0
    sums = torch.zeros(n_seq, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(0, seq, log_ratio)  # (S,)
    counts = torch.bincount(seq, minlength=n_seq).clamp(min=1).to(log_ratio.dtype)  # (S,)
    seq_log_ratio = torch.clamp(sums / counts, -20.0, 20.0)  # (S,) log s_i
    ratio = torch.exp(seq_log_ratio[seq] + logp - logp.detach())  # (N,) value s_i, gradient s_i * dlogp
    return _clip(adv, ratio, clip)


# name -> (logp (N,), old (N,), adv (N,), seq (N,), ClipSettings) -> (loss (N,), clipped (N,) bool)
POLICY_LOSSES: dict[str, Callable] = {
    "ppo": ppo_clip_loss,
    "gspo": gspo_loss,
}


def k3_kl(logp, ref_logp):
    """k3 estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (Schulman), >= 0."""
    import torch

    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.exp(d) - d - 1.0


