"""Checkpoint retention: storage that does not grow with the run, and a `dvc status` that stays clean.

Each update writes a policy checkpoint (models/policy-NNNN: 6.4 GB of bf16 weights at 3B parameters)
and its optimizer state beside it (``<checkpoint>-state``: ~36 GB). Params ``checkpoints``:

- ``keep_every: 0`` (the embedded default): everything is kept; the checkpoints are DVC outputs
  with their weights in the DVC cache, as before; the states are on disk (never cached).
- ``keep_every: N``: checkpoint j (written by the update of k = j - 1) is kept when j % N == 0, and
  the newest ``keep_latest`` checkpoints are kept; the others' weights are deleted. Only the newest
  checkpoint's state is kept (the next update resumes from it; an older one is never read again).

Why weights can be deleted without `dvc status` reporting them or `dvc repro` re-running their
stages (measured with DVC 3.67, tests/test_retention.py): a deleted output or dependency of a
finished stage is "deleted" to `dvc status` and makes `dvc repro` run the stage again (also with
``cache: false``), and `frozen` stages still check their outputs. A file that ``.dvcignore`` names
is invisible to DVC: not hashed, not cached, never restored or reported, left alone by `dvc
checkout`. So before a `dvc repro` (:func:`plan_ignores`), the weight files (``*.safetensors``) of
every checkpoint not written yet that the rule will delete are listed in ``.dvcignore``; DVC then
never hashes them and tracks the rest of the folder, whose ``weights.sha256`` (written
by the update, :data:`tcrlsd.policy.WEIGHTS_DIGEST`) changes with the weights, so the stages that
read the checkpoint still re-run when it changes. :func:`prune` deletes only weights listed there;
a checkpoint whose weights DVC tracks (written before the setting changed, or by a `dvc repro`
that no `tcrlsd iterate` / `tcrlsd prune` preceded) is left alone and reported.

When: `tcrlsd iterate` lists, runs `dvc repro` and deletes, one iteration at a time; `tcrlsd prune`
lists and deletes (run it before and after a `dvc repro` of one's own). Not inside a stage: DVC orders the stages of several iterations depth-first along the
dvc.yaml order, so every evaluate may run after every update (each evaluate reads the checkpoint
its iteration wrote); only after a whole `dvc repro` has every reader of a checkpoint run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tcrlsd.loop.iterations import Iteration, read_iterations
from tcrlsd.params import ParamsError

__all__ = ["CheckpointParams", "STATE_SUFFIX", "IGNORE_FILE", "checkpoint_index", "is_kept", "ignore_line",
           "plan_ignores", "PruneReport", "prune"]

# dvc.yaml's update passes `--state-out ${item.next_policy}-state` (checked by tests/test_retention.py)
STATE_SUFFIX = "-state"
IGNORE_FILE = ".dvcignore"
_WEIGHTS = "*.safetensors"
_MARK = "# tcrlsd checkpoint retention (tcrlsd/loop/retention.py): weights DVC does not track"


@dataclass(frozen=True)
class CheckpointParams:
    """``checkpoints:`` section of params.yaml (documented there; these defaults equal it)."""

    keep_every: int = 0  # 0 = keep every checkpoint; N > 0: keep checkpoint j when j % N == 0
    keep_latest: int = 2  # the newest checkpoints always kept (>= 1)

    def __post_init__(self):
        if self.keep_every < 0:
            raise ParamsError(f"params checkpoints.keep_every must be >= 0 (0 = keep all), got {self.keep_every}")
        if self.keep_latest < 1:
            raise ParamsError(f"params checkpoints.keep_latest must be >= 1 (the next iteration starts from the "
                              f"newest checkpoint), got {self.keep_latest}")


def checkpoint_index(item: Iteration) -> int:
    """The number j of the checkpoint an item's update writes (its ``next_policy``): j = k + 1."""
    return item.k + 1


def is_kept(index: int, params: CheckpointParams) -> bool:
    """Kept by the rule whatever comes later (the newest ``keep_latest`` are kept on top of these)."""
    return params.keep_every == 0 or index % params.keep_every == 0


def ignore_line(checkpoint: str) -> str:
    """The .dvcignore pattern of a checkpoint's weights (a path relative to the repository root)."""
    return f"/{Path(checkpoint).as_posix().strip('/')}/{_WEIGHTS}"


def _ignore_lines(root: Path) -> set[str]:
    path = root / IGNORE_FILE
    return {ln.strip() for ln in path.read_text().splitlines()} if path.exists() else set()


def plan_ignores(root: str | os.PathLike, iterations: str | os.PathLike, params: CheckpointParams) -> list[str]:
    """List in ``root/.dvcignore`` the weights of the checkpoints, not written yet, that the rule deletes later.

    Only checkpoints whose folder does not exist: a pattern added for a checkpoint DVC already hashed
    would change that hash and run its update again. Returns the lines added."""
    from tcrlsd.artifacts import write_text

    root = Path(root)
    have = _ignore_lines(root)
    add = [ignore_line(it.next_policy) for it in read_iterations(iterations)
           if not is_kept(checkpoint_index(it), params) and not (root / it.next_policy).exists()]
    add = [ln for ln in dict.fromkeys(add) if ln not in have]
    if add:
        path = root / IGNORE_FILE
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        if _MARK not in text:
            text += _MARK + "\n"
        write_text(text + "".join(ln + "\n" for ln in add), path)
    return add


@dataclass
class PruneReport:
    weights_deleted: list[str] = field(default_factory=list)  # checkpoints whose weights were deleted
    states_deleted: list[str] = field(default_factory=list)
    tracked_kept: list[str] = field(default_factory=list)  # due for deletion, but DVC tracks their weights
    freed_bytes: int = 0

    def lines(self) -> list[str]:
        out = [f"deleted the weights of {p} (checkpoint retention)" for p in self.weights_deleted]
        out += [f"deleted the optimizer state {p} (a newer one exists)" for p in self.states_deleted]
        out += [f"kept {p}: its weights are tracked by DVC (not listed in {IGNORE_FILE} before it was written), "
                "so deleting them would make `dvc repro` run its update again" for p in self.tracked_kept]
        if self.weights_deleted or self.states_deleted:
            out.append(f"freed {self.freed_bytes / 1e6:.1f} MB")
        return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune(root: str | os.PathLike, iterations: str | os.PathLike, params: CheckpointParams, *,
          dry_run: bool = False) -> PruneReport:
    """Delete what the rule does not keep among the checkpoints (and states) the iterations file names.

    Only finished checkpoints count (their ``weights.sha256`` exists: the update wrote it last). Run it
    when no `dvc repro` is running (a stage may still read a checkpoint)."""
    from tcrlsd.policy import WEIGHTS_DIGEST

    root = Path(root)
    items = read_iterations(iterations)
    report = PruneReport()
    if params.keep_every == 0:
        return report
    done = [it for it in items if (root / it.next_policy / WEIGHTS_DIGEST).is_file()]
    newest = {it.next_policy for it in done[-params.keep_latest:]}
    ignored = _ignore_lines(root)
    for it in done:
        folder = root / it.next_policy
        if it.next_policy in newest or is_kept(checkpoint_index(it), params):
            continue
        weights = sorted(folder.glob(_WEIGHTS))
        if not weights:
            continue  # deleted before
        if ignore_line(it.next_policy) not in ignored:
            report.tracked_kept.append(it.next_policy)
            continue
        report.weights_deleted.append(it.next_policy)
        for w in weights:
            report.freed_bytes += w.stat().st_size
            if not dry_run:
                w.unlink()
    if not done:
        return report  # no finished checkpoint to tell the newest state by: delete nothing
    latest_state = done[-1].next_policy + STATE_SUFFIX
    for it in items:
        state = it.next_policy + STATE_SUFFIX
        if state != latest_state and (root / state).is_dir():
            report.states_deleted.append(state)
            report.freed_bytes += _size(root / state)
            if not dry_run:
                shutil.rmtree(root / state)
    return report
