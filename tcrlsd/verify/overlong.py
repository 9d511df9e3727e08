"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), a verify option.

With L_max the response token limit (``generate.sampling.max_new_tokens``), L_cache the buffer
(``verify.overlong_penalty_buffer``) and f the factor (``verify.overlong_penalty_factor``), a
response of |y| tokens (its stop id included, as every token-level column counts it) gets

    0                                   |y| <= L_max - L_cache
    f * ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
    -f                                  |y| > L_max   (not reached here: generation stops at L_max)

added to its reward, whatever the grade: the penalty grows linearly over the last L_cache tokens
before the limit, so a response cut by the limit (finish_reason length, |y| = L_max) gets -f.
DAPO uses f = 1 (verl's ``overlong_buffer.penalty_factor``). L_cache = 0 turns it off.
"""

from __future__ import annotations

import numpy as np

from tcrlsd.errors import InputError

__all__ = ["overlong_penalty"]


def overlong_penalty(lengths, max_tokens: int, buffer: int, factor: float) -> np.ndarray:
    """The penalty (<= 0) per response, ``(R,) lengths -> (R,) float64`` (module notes)."""
    lengths = np.asarray(lengths, dtype=np.float64)  # (R,)
    if buffer == 0:
        return np.zeros_like(lengths)
    if not 0 < buffer <= max_tokens:
        raise InputError(f"overlong_penalty_buffer = {buffer} must lie in 1..{max_tokens} (generate.sampling.max_new_tokens); "
                         "0 turns the penalty off")
    start = max_tokens - buffer  # the last length without penalty
    over = np.clip(lengths - start, 0.0, None)  # (R,) tokens into the buffer
    return np.where(lengths > max_tokens, -factor, -factor * over / buffer)
