"""Training state that must survive between iterations (each iteration's update is its own process).

Saved beside the checkpoint, in the folder ``<state>/``:

- ``zero/``: DeepSpeed's checkpoint of the engine (AdamW moments, fp32 master weights under bf16,
  per-process ZeRO partitions), written by every process, loaded by every process.
- ``trainer_state.json``: the global optimizer step (the LR schedule's step), skipped steps, the
  iteration it ends, the process count and ZeRO stage it was written with (ZeRO partitions cannot
  be loaded by another process count), and the sha256 of the policy folder written with it.
- (not here: the lagged / EMA teacher is kept in the policy folder, :mod:`tcrlsd.teachers`.)

The folder is resume state, not a DVC output: DVC neither caches it (~12 bytes per parameter: 36 GB
at 3B parameters, per iteration) nor hashes it. It is kept on disk by the loop's retention rule
(:mod:`tcrlsd.loop.retention`: with params checkpoints.keep_every > 0 only the latest iteration's
state stays). Run-cache restores are off for the update (its checkpoint output is ``persist``), so a
state on disk never meets a policy DVC brought back from another run; the sha256 check below
refuses such a pair anyway.

Rules (:func:`resolve_state`): the first iteration (k = 0) starts fresh; a later one loads the
previous state, and a missing or mismatched state is an error unless params ``update.restart`` asks
for a fresh optimizer explicitly (recorded in the metrics). Never a silent reset.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tcrlsd.update.params import UpdateError

__all__ = ["TrainerState", "STATE_FILE", "ZERO_DIR", "TAG", "weights_digest", "read_state", "resolve_state",
           "write_state_json", "replace_dir"]

STATE_FILE = "trainer_state.json"
ZERO_DIR = "zero"
TAG = "state"


@dataclass(frozen=True)
class TrainerState:
    global_step: int = 0  # optimizer steps applied so far, over all iterations (the LR schedule's step)
    skipped_steps: int = 0  # steps skipped for a non-finite gradient norm, over all iterations
    iteration: int = -1  # the iteration (k) whose update wrote this state; -1 = none yet
    world_size: int = 1
    zero_stage: int = 2
    policy_sha256: str = ""  # weights of the policy folder written with this state


def weights_digest(policy: str | os.PathLike) -> str:
    """sha256 over the policy folder's *.safetensors files (names and bytes, sorted)."""
    import hashlib

    from tcrlsd.resume import content_digest

    files = sorted(Path(policy).glob("*.safetensors"))
    if not files:
        raise UpdateError(f"{policy}: no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + content_digest(f).encode() + b"\n")
    return h.hexdigest()


def read_state(state_dir: str | os.PathLike) -> TrainerState:
    path = Path(state_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return TrainerState(**data)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise UpdateError(f"{path}: unreadable trainer state ({exc})") from None


def resolve_state(state_dir: str | os.PathLike | None, iteration: int, policy: str | os.PathLike, *,
                  restart: bool, world_size: int, zero_stage: int) -> tuple[TrainerState | None, str]:
    """(state to load or None for a fresh start, why). Errors instead of a silent reset."""
    present = state_dir is not None and (Path(state_dir) / STATE_FILE).exists()
    if restart:
        return None, "restart requested (params update.restart)"
    if not present:
        if iteration == 0:
            return None, "first iteration"
        raise UpdateError(
            f"iteration {iteration}: no saved training state at {state_dir} (expected {STATE_FILE} and {ZERO_DIR}/ "
            "written by the previous iteration's update; it is not in the DVC cache, and with checkpoints.keep_every > 0 "
            "only the latest iteration's is kept); a fresh optimizer would silently change the algorithm. "
            "Set params update.restart: true to start a new optimizer on purpose"
        )
    state = read_state(state_dir)
    if state.world_size != world_size or state.zero_stage != zero_stage:
        raise UpdateError(
            f"{state_dir}: state was written by {state.world_size} process(es) with ZeRO stage {state.zero_stage}; this "
            f"run has {world_size} with stage {zero_stage}. Run with the same layout, or set update.restart: true"
        )
    digest = weights_digest(policy)
    if state.policy_sha256 != digest:
        raise UpdateError(
            f"{state_dir}: state belongs to other weights than {policy} (sha256 {state.policy_sha256[:12]} vs "
            f"{digest[:12]}); pass the state written together with this policy, or set update.restart: true"
        )
    if state.iteration >= iteration:
        raise UpdateError(f"{state_dir}: state already covers iteration {state.iteration}; this update is for "
                          f"iteration {iteration} (rollouts of an older policy?)")
    return state, "loaded"


def write_state_json(state: TrainerState, folder: str | os.PathLike) -> None:
    from tcrlsd.artifacts import write_json

    write_json(asdict(state), Path(folder) / STATE_FILE)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished folder into place (the old one, if any, removed first)."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
