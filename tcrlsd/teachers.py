"""THE list of teacher modes (params ``score.teacher``): which weights play the teacher.

The score stage loads the weights of a mode; the update stage keeps them between iterations
(``tcrlsd/update/teacher.py``). name -> what it means (for messages and help).
"""

from __future__ import annotations

__all__ = ["TEACHER_MODES"]

TEACHER_MODES: dict[str, str] = {
    "current": "the student's own weights",
    "lagged": "a copy of the policy refreshed every update.teacher_refresh_every iterations (RLSD)",
    "ema": "an exponential moving average of the policy, rate update.teacher_ema_tau (SDPO)",
}
