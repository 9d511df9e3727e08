"""Token colour by Δ_t = log Q_t − log P_t (teacher − student), shared by the terminal and HTML.

Δ_t < 0: the teacher, having read the feedback, finds the token less likely than the student did
(it disagrees) → red. Δ_t > 0: it finds the token more likely (it agrees) → green. Δ_t = 0 (rows
without feedback, where the teacher is the student) → neutral grey. The colour is linear in Δ_t,
saturating at ±``scale`` nats.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SCALE", "NEUTRAL", "delta_rgb", "text_rgb", "legend_stops", "resolve_scale"]

DEFAULT_SCALE = 2.0  # nats at which the colour saturates
NEUTRAL = (236, 236, 236)
_RED = (214, 39, 40)
_GREEN = (44, 160, 44)


def delta_rgb(delta: float | None, scale: float = DEFAULT_SCALE) -> tuple[int, int, int]:
    """Background colour of a token with gap ``delta`` (None: not scored → neutral)."""
    if delta is None:
        return NEUTRAL
    t = max(-1.0, min(1.0, delta / scale))
    end = _RED if t < 0 else _GREEN
    a = abs(t)
    return tuple(round(n + a * (e - n)) for n, e in zip(NEUTRAL, end))


def text_rgb(delta: float | None, scale: float = DEFAULT_SCALE) -> tuple[int, int, int]:
    """Foreground that stays readable on :func:`delta_rgb`'s background."""
    if delta is not None and abs(delta) / scale > 0.6:
        return (255, 255, 255)
    return (0, 0, 0)


def legend_stops(scale: float = DEFAULT_SCALE, n: int = 9) -> list[float]:
    """``n`` evenly spaced Δ values from −scale to +scale, for a legend."""
    return [-scale + 2 * scale * i / (n - 1) for i in range(n)]


def resolve_scale(scale: float | str, samples: list[dict]) -> float:
    """A number stays; ``'auto'`` = the 95th percentile of |Δ_t| over the samples' tokens (the
    default scale when there is no non-zero Δ). For iterations whose Δ are all small (an early
    policy that barely reads feedback), where a fixed scale would leave every token grey."""
    if scale != "auto":
        return float(scale)
    deltas = sorted(abs(t["delta"]) for d in samples for t in d["tokens"] if t["delta"] is not None)
    if not deltas or deltas[-1] == 0:
        return DEFAULT_SCALE
    return max(deltas[min(len(deltas) - 1, int(0.95 * len(deltas)))], 1e-6)
