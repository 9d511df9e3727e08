"""Token-level advantages: GRPO, RLSD, and the two forms that keep a signal when A = 0.

Formulas (ARCHITECTURE.md, exactly)::

    A   = (r − mean_group) / (std_group + 1e-6)   std unbiased (like verl); norm_by_std=false → r − mean
    Δ_t = log Q_t − log P_t                        teacher_logprobs − student_logprobs
    w_t = exp(sign(A) · Δ_t)
    m_t = (1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w)
    λ(k) = λ_0 · max(0, 1 − k / decay_steps)       k = the rollouts' iteration

    grpo         Â_t = A
    rlsd         Â_t = A · m_t
    rlsd_add     Â_t = (1 − λ) · A + λ · Δ_t
    rlsd_hybrid  Â_t = α · A · m_t + β · Δ_t
    rlcsd        e_t = log Q_t − log mean_j Q_t^(j)      Q^(j): the teacher under wrong hint j
                 r_t = clip(β_c · λ · tanh(e_t / τ), ±c), 0 where |r_t| <= δ
                 Â_t = max(A + r_t, 0) if A > 0, min(A + r_t, 0) if A < 0, 0 if A = 0

    outcome-only estimators (the teacher unused), each with its own A:
    rloo                   A = r − mean of the group's other rewards = n/(n−1) · (r − mean_group)
    reinforce_pp           A = whiten_batch(r)               (REINFORCE++, γ = 1)
    reinforce_pp_baseline  A = whiten_batch(r − mean_group)  (REINFORCE++-baseline)
    whiten_batch(x) = (x − mean) / sqrt(var + 1e-8), mean and unbiased var over the iteration's
    response tokens (a rollout weighs its length), as verl's masked_whiten

Where this departs from the references, and why:

- A group of one rollout gets A = 0. verl treats a singleton group as mean 0, std 1, so there A = r;
  the design here says a lone sample carries no relative information.
- A group whose rewards are all equal gets A = 0 exactly (the formula gives 0 up to the rounding of
  the mean for non-binary rewards); that is what "saturated" means in the metrics.
- ``delta_clip`` (off by default) clips Δ_t to [−c, c] in the additive term only; the
  multiplicative term is already bounded by ε_w. Neither RLSD nor SDPO clips Δ.

Layout: an estimator is a pair of pure functions in one dict, :data:`ESTIMATORS`: its outcome
advantage (group, rewards, lengths, settings) -> A per rollout, and its token form (A broadcast to
tokens, Δ, settings) -> Â. :func:`compute_advantages` streams the scores by Parquet batches (memory does not
grow with the number of tokens), computes Â with numpy on the flattened list values and offsets, and
writes the ``advantages`` artifact through a ParquetWriter to a temporary name, renamed at the end.
:func:`compare_estimators` does the same pass for every estimator at once and writes nothing.


Layout of this package: ``params``, ``estimators``, ``inputs``, ``metrics``, ``stream``, ``stage``, ``compare`` (see
docs/ARCHITECTURE.md). Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.advantages.compare import compare_estimators  # noqa: F401
from tcrlsd.advantages.estimators import (  # noqa: F401
    ESTIMATORS,
    READS_CONTRAST,
    STD_EPS,
    Estimator,
    Settings,
    batch_whitened,
    contrast_gap,
    group_advantages,
    group_baseline,
    group_centred_batch_whitened,
    leave_one_out,
    outcome_advantages,
    outcome_only,
    reference_token_advantages,
    rlcsd,
    rlsd,
    rlsd_add,
    rlsd_hybrid,
    token_advantages,
)
from tcrlsd.advantages.inputs import IterationInputs  # noqa: F401
from tcrlsd.advantages.params import DEFAULT_BATCH_ROWS, AdvantagesParams, lam_schedule, settings_for  # noqa: F401
from tcrlsd.advantages.stage import compute_advantages  # noqa: F401
