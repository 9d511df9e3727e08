"""The ``advantages:`` params section, settings and the λ schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tcrlsd.advantages.estimators import ESTIMATORS, Settings
from tcrlsd.params import check_choices, choice

DEFAULT_BATCH_ROWS = 1024  # scores rows per streamed batch (~1M tokens at 1k tokens a response)


# ---------------------------------------------------------------------------------------------
# Params and settings


@dataclass(frozen=True)
class AdvantagesParams:
    """``params.yaml`` section ``advantages``."""

    estimator: str = choice("rlsd_hybrid", lambda: ESTIMATORS, "ESTIMATORS in tcrlsd/advantages/estimators.py")
    alpha: float = 0.7  # rlsd_hybrid: weight of A·m_t
    beta: float = 0.3  # rlsd_hybrid: weight of Δ_t
    lam0: float = 0.5  # λ_0, teacher weight at iteration 0
    lam_decay_steps: int = 12  # λ reaches 0 at this iteration
    eps_w: float = 0.2  # clip of w_t to [1 − ε_w, 1 + ε_w]
    norm_by_std: bool = True  # A divided by the group std (+1e-6); false → A = r − mean
    delta_clip: float | None = None  # clip Δ_t to [−c, c] in the additive term; None = off
    contrast_temperature: float = 0.02  # rlcsd: τ of tanh(e_t / τ)
    contrast_weight: float = 1.0  # rlcsd: β of r_t = clip(β · λ · tanh(e_t / τ), ±contrast_clip)
    contrast_threshold: float = 0.02  # rlcsd: r_t with |r_t| <= this is dropped
    contrast_clip: float = 2.0  # rlcsd: |r_t| bound

    def __post_init__(self):
        check_choices(self)
        for name in ("alpha", "beta", "lam0", "eps_w"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.0 <= self.lam0 <= 1.0:
            raise ValueError(f"lam0 must lie in [0, 1], got {self.lam0}")
        if self.lam_decay_steps <= 0:
            raise ValueError(f"lam_decay_steps must be a positive integer, got {self.lam_decay_steps}")
        if not 0.0 <= self.eps_w <= 1.0:
            raise ValueError(f"eps_w must lie in [0, 1], got {self.eps_w}")
        for name in ("contrast_temperature", "contrast_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("contrast_weight", "contrast_threshold"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.delta_clip is not None and not (self.delta_clip > 0 and math.isfinite(self.delta_clip)):
            raise ValueError(f"delta_clip must be a positive number or null, got {self.delta_clip}")




def lam_schedule(lam0: float, decay_steps: int, iteration: int) -> float:
    """λ(k) = λ_0 · max(0, 1 − k / decay_steps)."""
    return lam0 * max(0.0, 1.0 - iteration / decay_steps)


def settings_for(params: AdvantagesParams, iteration: int, lam: float | None = None) -> Settings:
    """Resolve λ: ``lam`` when given, else the schedule at ``iteration``."""
    if lam is None:
        lam = lam_schedule(params.lam0, params.lam_decay_steps, iteration)
    elif not (0.0 <= lam <= 1.0):
        raise ValueError(f"λ must lie in [0, 1], got {lam}")
    return Settings(lam=float(lam), eps_w=params.eps_w, alpha=params.alpha, beta=params.beta,
                    delta_clip=params.delta_clip, norm_by_std=params.norm_by_std,
                    contrast_temperature=params.contrast_temperature, contrast_weight=params.contrast_weight,
                    contrast_threshold=params.contrast_threshold, contrast_clip=params.contrast_clip)
