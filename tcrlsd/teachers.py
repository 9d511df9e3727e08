"""The teacher: THE list of its modes (params ``score.teacher``) and where a checkpoint keeps it.

Modes: name -> what it means (for messages and help). The score stage loads the weights of a mode;
the update stage keeps them between iterations (:mod:`tcrlsd.update.teacher`).

The teacher that scores iteration k alongside policy k (``lagged`` / ``ema``) travels with that
checkpoint: the update of iteration k - 1 writes it into ``<policy k>/teacher/`` (a plain Hugging
Face folder). A checkpoint without that folder -- the warm start, the first policy of a new run, or
a run that used the ``current`` teacher so far -- is its own teacher: before the first update the
teacher is the starting policy. The score stage and the update read the teacher through
:func:`kept_teacher`, so they always agree on it, and DVC tracks it as part of the policy folder
both stages already depend on (no per-iteration path to write in dvc.yaml, and nothing in the
training state, which need not stay in the DVC cache).

Loaders of the policy itself ignore the subfolder (``from_pretrained`` and vLLM read the top-level
files only).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TEACHER_MODES", "TEACHER_DIR", "kept_teacher"]

TEACHER_MODES: dict[str, str] = {
    "current": "the student's own weights",
    "lagged": "a copy of the policy refreshed every update.teacher_refresh_every iterations (RLSD)",
    "ema": "an exponential moving average of the policy, rate update.teacher_ema_tau (SDPO)",
}

TEACHER_DIR = "teacher"


def kept_teacher(policy: str | os.PathLike) -> Path:
    """The teacher checkpoint of ``policy``: its ``teacher/`` folder, else the policy itself."""
    kept = Path(policy) / TEACHER_DIR
    return kept if kept.is_dir() else Path(policy)
