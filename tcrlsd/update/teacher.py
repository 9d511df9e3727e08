"""The teacher weights the score stage reads in its ``lagged`` and ``ema`` modes.

``score.teacher`` decides; the update stage keeps the folder inside its state folder
(``<state>/teacher``, a plain Hugging Face checkpoint) and the next iteration's score stage takes it
as ``--teacher-policy`` (:func:`tcrlsd.score.teacher_checkpoint_for` only needs an existing folder).
Before the first update the teacher is the initial policy itself.

- ``lagged`` (RLSD's scripts: every 20 steps): after the update of iteration k the teacher becomes a
  copy of the new policy when (k + 1) is a multiple of ``teacher_refresh_every``; otherwise the
  previous teacher is carried over unchanged. One update = one training step of the loop.
- ``ema`` (SDPO): teacher <- (1 - tau) * teacher + tau * new policy, parameter by parameter, in fp32.
- ``current``: nothing is written (the student's own weights play the teacher).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tcrlsd.update.params import UpdateError

__all__ = ["TEACHER_DIR", "previous_teacher", "write_teacher"]

TEACHER_DIR = "teacher"


def previous_teacher(state_dir: str | os.PathLike | None, policy: str | os.PathLike, fresh: bool) -> Path:
    """The teacher the score stage used for this iteration: the saved one, or the policy on a fresh start."""
    if fresh or state_dir is None:
        return Path(policy)
    t = Path(state_dir) / TEACHER_DIR
    if not t.is_dir():
        raise UpdateError(f"{state_dir}: no {TEACHER_DIR}/ folder; score.teacher needs the kept teacher weights "
                          "(was the previous update run with score.teacher current?). Set update.restart: true to "
                          "start the teacher from the current policy")
    return t


def write_teacher(mode: str, next_step: int, new_policy: Path, previous: Path, out: Path, *, refresh_every: int,
                  tau: float) -> str | None:
    """Write the teacher for step ``next_step`` into ``out``; returns what was done (for metrics)."""
    from tcrlsd.policy import load_tokenizer, save_policy

    if mode == "current":
        return None
    if mode == "lagged":
        refresh = next_step % refresh_every == 0
        src = new_policy if refresh else previous
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return "refreshed" if refresh else "kept"
    if mode == "ema":
        import torch
        from transformers import AutoModelForCausalLM

        kw = dict(dtype=torch.float32, use_safetensors=True)
        teacher = AutoModelForCausalLM.from_pretrained(str(previous), **kw)
        student = AutoModelForCausalLM.from_pretrained(str(new_policy), **kw)
        s_params = dict(student.named_parameters())
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name not in s_params or s_params[name].shape != p.shape:
                    raise UpdateError(f"{previous}: teacher parameter {name} does not match the policy's")
                p.mul_(1.0 - tau).add_(s_params[name], alpha=tau)
        save_policy(teacher, load_tokenizer(new_policy), out)
        return "ema"
    raise UpdateError(f"unknown teacher mode {mode!r}; known: current, lagged, ema")
