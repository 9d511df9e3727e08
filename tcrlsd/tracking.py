"""Live run tracking: per-step and per-iteration metrics through DVCLive (and TensorBoard), offline.

A run that lasts days is watched while it goes. The update stage logs every optimizer step
(:meth:`Tracker.log_step`) and the summarize stage every iteration of every stage
(:meth:`Tracker.log_iteration`) into one DVCLive folder, ``tracking.dir`` of params.yaml:

- ``<dir>/plots/metrics/update/<key>.tsv``: one row per optimizer step (x = ``step``, counted over
  the whole run: the update's global step plus the steps skipped on a non-finite gradient, so a
  curve continues across iterations, each of which is a separate process);
- ``<dir>/plots/metrics/iteration/<stage>/<column>.tsv``: one row per iteration (x = ``step`` = the
  iteration), the summarize table's columns grouped by the stage they come from;
- ``<dir>/metrics.json``: the latest value of each (DVCLive's summary; ``dvc metrics show``,
  ``dvc exp show`` and the VS Code extension's table read it);
- with ``tracking.tensorboard: true``, the same scalars as TensorBoard event files in
  ``<dir>/tensorboard/steps`` and ``<dir>/tensorboard/iterations`` (two runs: their x axes differ).

dvc.yaml declares the folder as top-level ``metrics:`` and ``plots:`` (not as any stage's outputs:
every iteration's update writes into it, and DVC forbids outputs that overlap), so ``dvc plots
show/diff`` read the workspace's files while a run goes. The folder is not cached by DVC: the
cached, restorable record stays the stages' metrics JSONs (the update's ``per_step`` list holds
the same step rows) and the summarize table.

Offline by construction: DVCLive's Studio client is switched off (``DVC_STUDIO_OFFLINE`` while the
logger starts, which disables every later post), no DVC experiment is saved, no report is made,
and DVCLive's repository discovery is skipped (``_OfflineLive``: it would open the DVC repository
or, outside one, run ``dvc init`` in the enclosing git repository). DVCLive never edits dvc.yaml
(``dvcyaml=False``). ``tests/test_tracking.py`` runs it with sockets refused and a Studio token set.

A step or iteration logged again (an update re-run after a params change, each summarize run)
first drops the rows at or after it from that series' files, so a re-run replaces its history
instead of appending a second copy (TensorBoard: ``purge_step``).

Tracking settings never change a stage's outputs, so no stage lists ``tracking`` among its DVC
params: switching TensorBoard on re-runs nothing. dvclive and tensorboard are imported only when on.
"""

from __future__ import annotations

import csv
import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tcrlsd.errors import TcrlsdError

__all__ = ["TrackingParams", "TrackingError", "Tracker", "load_tracking", "read_series", "STEP_SERIES",
           "ITERATION_SERIES"]

STEP_SERIES = "update"  # DVCLive name prefix of the per-step series
ITERATION_SERIES = "iteration"  # ... of the per-iteration series (then the stage's name)


class TrackingError(TcrlsdError, ValueError):
    """Tracking is misconfigured (e.g. TensorBoard on without the tensorboard package)."""


@dataclass(frozen=True)
class TrackingParams:
    """``tracking:`` section of params.yaml (documented there; these defaults equal it)."""

    dvclive: bool = True
    dir: str = "dvclive"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("tracking.dir must be a folder path")


def load_tracking(params_path: str | os.PathLike) -> TrackingParams | None:
    """The ``tracking`` section, or None when the file has none (a project from before tracking)."""
    from tcrlsd.params import from_mapping, load_yaml

    data = load_yaml(params_path)
    if "tracking" not in data:
        return None
    return from_mapping(TrackingParams, data["tracking"], "tracking")


@contextmanager
def _studio_offline():
    """DVC_STUDIO_OFFLINE while DVCLive starts: with no Studio config then, it skips every post."""
    old = os.environ.get("DVC_STUDIO_OFFLINE")
    os.environ["DVC_STUDIO_OFFLINE"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DVC_STUDIO_OFFLINE", None)
        else:
            os.environ["DVC_STUDIO_OFFLINE"] = old


def _offline_live(folder: Path):
    from dvclive import Live

    class _OfflineLive(Live):
        # DVCLive's repository discovery (Repo(), or `dvc init` in the git root outside a DVC repo)
        # serves experiment saving and Studio only, both off here; the files it writes need none.
        def _init_dvc(self):
            self._dvc_file = "dvc.yaml"  # read by nothing while dvcyaml is False

    with _studio_offline():
        return _OfflineLive(str(folder), resume=True, report=None, save_dvc_exp=False, dvcyaml=False,
                            monitor_system=False)


def _tensorboard_writer(logdir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TrackingError(
            f"params tracking.tensorboard is true but TensorBoard cannot be imported ({exc}); install it with "
            f"pip install 'tcrlsd[tensorboard]' or set tracking.tensorboard: false") from None
    return SummaryWriter(log_dir=str(logdir), purge_step=purge_step, flush_secs=10)


def _rewind(path: Path, from_step: int) -> None:
    """Drop the rows of one DVCLive series file whose step is >= ``from_step`` (atomic rewrite)."""
    from tcrlsd.artifacts import write_text

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [r for r in rows[1:] if r and int(r[col]) < from_step]
    if len(kept) == len(rows) - 1:
        return
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator=os.linesep)
    w.writerows([rows[0], *kept])
    write_text(buf.getvalue(), path)


def _number(value) -> float | None:
    """A loggable value: a finite number (a skipped step's infinite grad norm is left out, as in
    the metrics JSON; DVCLive would write it as text that the plots cannot draw)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class Tracker:
    """One process's logger: DVCLive, optionally TensorBoard, started lazily on the first value.

    ``Tracker(params)`` does nothing until something is logged; :meth:`close` flushes. A
    ``params`` of None or with ``dvclive: false`` and ``tensorboard: false`` logs nothing.
    """

    def __init__(self, params: TrackingParams | None):
        self.params = params
        self.dir = Path(params.dir) if params else None
        self._live = None
        self._writers: dict[str, object] = {}
        self._rewound: set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.params and (self.params.dvclive or self.params.tensorboard))

    def log_step(self, metrics: dict, step: int) -> None:
        """Log one optimizer step's metrics (``update/<key>``) at ``step`` (counted over the run)."""
        self._log(STEP_SERIES, "steps", metrics, step)

    def log_iteration(self, stage: str, metrics: dict, iteration: int) -> None:
        """Log one stage's metrics of one iteration (``iteration/<stage>/<key>``) at x = ``iteration``."""
        self._log(f"{ITERATION_SERIES}/{stage}", "iterations", metrics, iteration)

    def _log(self, prefix: str, tb_run: str, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
        if self.params.dvclive:
            live = self._dvclive()
            if prefix not in self._rewound:
                self._rewound.add(prefix)
                series = Path(live.plots_dir) / "metrics" / prefix
                for f in sorted(series.rglob("*.tsv")) if series.is_dir() else ():
                    _rewind(f, step)
            last_step = live.summary.get("step")
            live.step = step
            for k, v in values.items():
                live.log_metric(f"{prefix}/{k}", v)
            if prefix != STEP_SERIES and last_step is not None:
                live.step = last_step  # the summary's "step" stays the last optimizer step, not an iteration
            live.make_summary()
        if self.params.tensorboard:
            writer = self._writers.get(tb_run)
            if writer is None:  # purge_step: events at or after it in earlier files are dropped
                writer = self._writers[tb_run] = _tensorboard_writer(self.dir / "tensorboard" / tb_run, step)
            for k, v in values.items():
                writer.add_scalar(f"{prefix}/{k}", v, step)

    def _dvclive(self):
        if self._live is None:
            self._live = _offline_live(self.dir)
        return self._live

    def close(self) -> None:
        if self._live is not None:
            self._live.make_summary()
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_series(folder: str | os.PathLike, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one DVCLive series (``update/pg_loss``); empty when it was never logged.
    Non-finite values (written as ``nan``/``inf`` text) come back as floats."""
    path = Path(folder) / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return [], []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    key = name.rsplit("/", 1)[-1]
    try:
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]
    except (KeyError, ValueError) as exc:
        raise TrackingError(f"{path}: not a DVCLive series with columns step and {key} ({exc})") from None
