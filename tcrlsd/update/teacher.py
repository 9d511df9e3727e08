"""The teacher weights the score stage reads in its ``lagged`` and ``ema`` modes.

``score.teacher`` decides (:func:`teacher_mode` reads it, validated, from the params file). The
teacher travels with the policy checkpoint (:mod:`tcrlsd.teachers`): the update of iteration k
reads the teacher that scored iteration k (``<policy>/teacher``, or the policy itself before the
first update) and writes the next one into the new policy's folder, ``<policy_out>/teacher`` (a
plain Hugging Face checkpoint), where the next iteration's score stage finds it. So the teacher is
a DVC output like the policy it belongs to, and a new run started from any checkpoint continues
with that checkpoint's teacher.

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

from tcrlsd.params import ParamsError, load_yaml, merge
from tcrlsd.teachers import TEACHER_DIR
from tcrlsd.update.params import TEACHER_MODES, UpdateError

__all__ = ["teacher_mode", "write_teacher"]


def teacher_mode(params_path: str | os.PathLike, preset: str | os.PathLike | None = None) -> str:
    """``score.teacher`` of the params file (a preset merged over it), checked against TEACHER_MODES.

    The update writes the teacher the score stage reads, so it reads the score stage's key; a file
    without it is an error here (not a silent ``current``).
    """
    data = load_yaml(params_path)
    if preset:
        data = merge(data, load_yaml(preset))
    section = data.get("score")
    if not isinstance(section, dict) or "teacher" not in section:
        raise ParamsError(f"{params_path}: no key score.teacher (one of {', '.join(TEACHER_MODES)}); the update "
                          "keeps the teacher weights it names")
    mode = section["teacher"]
    if mode not in TEACHER_MODES:
        raise ParamsError(f"params score.teacher: {mode!r} is not one of {', '.join(map(repr, TEACHER_MODES))}")
    return mode


def write_teacher(mode: str, next_step: int, new_policy: Path, previous: Path, out: Path, *, refresh_every: int,
                  tau: float) -> str | None:
    """Write the teacher for step ``next_step`` into ``out``; returns what was done (for metrics)."""
    from tcrlsd.policy import load_tokenizer, save_policy

    if mode == "current":
        return None
    if mode == "lagged":
        from tcrlsd.artifacts import atomic_dir

        refresh = next_step % refresh_every == 0
        src = new_policy if refresh else previous
        with atomic_dir(out) as tmp:
            # a policy folder's own kept teacher is not part of the copy (a teacher keeps no teacher)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*", TEACHER_DIR), dirs_exist_ok=True)
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
    raise UpdateError(f"unknown teacher mode {mode!r}; known: {', '.join(TEACHER_MODES)}")
