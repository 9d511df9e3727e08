"""Live tracking (tcrlsd/tracking.py): DVCLive series and summary, re-runs that replace their rows,
the summarize stage's per-iteration series, DVC reading the files through the project's own
dvc.yaml declarations, offline (sockets refused), and TensorBoard event files.

The update's per-step logging end to end is in tests/test_update.py (it needs the tiny policy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tcrlsd.summarize import collect_rows, track_rows
from tcrlsd.tracking import Tracker, TrackingError, TrackingParams, load_tracking, read_series

REPO = Path(__file__).resolve().parents[1]


def _params(folder: Path, tensorboard: bool = False) -> TrackingParams:
    return TrackingParams(dvclive=True, dir=str(folder), tensorboard=tensorboard)


def test_series_summary_and_rerun_replaces_rows(tmp_path):
    live = tmp_path / "live"
    with Tracker(_params(live)) as t:
        for step, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
            # a non-finite value (a skipped step's grad norm) and a non-number are left out
            t.log_step({"pg_loss": loss, "grad_norm": float("inf") if step == 2 else 1.0, "note": "x"}, step)
    assert read_series(live, "update/pg_loss") == ([1, 2, 3], [0.5, 0.25, 0.125])
    assert read_series(live, "update/grad_norm") == ([1, 3], [1.0, 1.0])
    assert read_series(live, "update/note") == ([], [])
    # a later process (the next iteration's update) resumes; one that starts again at step 2 (the
    # same iteration re-run) first drops rows 2 and 3 of every update series
    with Tracker(_params(live)) as t:
        t.log_step({"pg_loss": 9.0}, 2)
    assert read_series(live, "update/pg_loss") == ([1, 2], [0.5, 9.0])
    assert read_series(live, "update/grad_norm") == ([1], [1.0])
    with Tracker(_params(live)) as t:
        t.log_iteration("evaluate", {"val_greedy": 0.5}, 0)
    summary = json.loads((live / "metrics.json").read_text())
    # the summary keeps both processes' latest values; its step is the last optimizer step
    assert summary["update"] == {"pg_loss": 9.0, "grad_norm": 1.0} and summary["iteration"]["evaluate"] == {
        "val_greedy": 0.5}
    assert summary["step"] == 2


def test_off_writes_nothing(tmp_path):
    for params in (None, TrackingParams(dvclive=False, dir=str(tmp_path / "live"), tensorboard=False)):
        with Tracker(params) as t:
            t.log_step({"pg_loss": 1.0}, 1)
            assert not t.enabled
    assert not (tmp_path / "live").exists()


def test_params_section(tmp_path):
    assert load_tracking(REPO / "params.yaml").dvclive is True  # the shipped section loads
    p = tmp_path / "params.yaml"
    p.write_text("update: {}\n")
    assert load_tracking(p) is None  # a project from before tracking: off, not an error
    p.write_text("tracking: {dvclive: true, dir: live, tensorboard: false, studio: true}\n")
    with pytest.raises(ValueError, match="unknown key.*studio"):
        load_tracking(p)


def _stage(name):
    spec = importlib.util.spec_from_file_location(f"{name}_stage_for_tracking_tests", REPO / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(folder: Path, reward: float, val: float) -> None:
    folder.mkdir(parents=True)
    (folder / "verify.json").write_text(json.dumps({"reward_mean": reward}))
    (folder / "evaluate.json").write_text(json.dumps({"greedy_mean_at_1": val, "avg_at_k": val / 2, "maj_at_k": val}))
    (folder / "update.json").write_text(json.dumps({"entropy": 0.5, "pg_clipfrac": 0.01, "pg_loss": -0.1}))


def test_summarize_stage_writes_every_stage_per_iteration(tmp_path):
    m = tmp_path / "metrics"
    _metrics(m / "iter-0000", 0.25, 0.40)
    _metrics(m / "iter-0001", 0.50, 0.35)
    params = tmp_path / "params.yaml"
    params.write_text(f"tracking: {{dvclive: true, dir: {tmp_path / 'live'}, tensorboard: false}}\n")
    args = ["--metrics-dir", str(m), "--table", str(tmp_path / "t.csv"), "--headline", str(tmp_path / "h.json"),
            "--params", str(params)]
    assert _stage("summarize").main(args) == 0
    live = tmp_path / "live"
    assert read_series(live, "iteration/verify/reward_mean") == ([0, 1], [0.25, 0.5])
    assert read_series(live, "iteration/evaluate/val_maj_at_k") == ([0, 1], [0.4, 0.35])
    assert read_series(live, "iteration/update/pg_loss") == ([0, 1], [-0.1, -0.1])
    assert read_series(live, "iteration/critique/critique_coverage") == ([], [])  # no critique metrics: no rows
    # summarize runs again after every dvc repro: the series are rewritten, not appended to
    _metrics(m / "iter-0002", 0.75, 0.5)
    assert _stage("summarize").main(args) == 0
    assert read_series(live, "iteration/verify/reward_mean") == ([0, 1, 2], [0.25, 0.5, 0.75])


def test_track_rows_one_call_per_stage_and_iteration():
    calls = []

    class Recorder:
        def log_iteration(self, stage, metrics, iteration):
            calls.append((stage, iteration, metrics))

    rows = [{"iteration": 0, "val_greedy": 0.5, "reward_mean": 0.2}, {"iteration": "x", "val_greedy": 0.1}]
    n = track_rows(rows, Recorder())
    # the row with a non-numeric id has no place on the x axis
    assert n == len(calls) == len({stage for stage, _, _ in calls}) and {i for _, i, _ in calls} == {0}
    evaluate = next(m for s, _, m in calls if s == "evaluate")
    assert evaluate == {"val_greedy": 0.5, "val_avg_at_k": None, "val_maj_at_k": None}


def test_dvc_reads_the_live_files_through_the_projects_declarations(tmp_path, monkeypatch):
    """A DVC repository whose dvc.yaml has exactly the project's top-level live-tracking `plots` and
    `metrics` entries (${tracking.dir} resolved from params.yaml): DVC's plots and metrics API
    (what `dvc plots show/diff`, `dvc metrics show` and the VS Code extension call) returns the
    series the tracker wrote."""
    from dvc.repo import Repo

    project = yaml.safe_load((REPO / "dvc.yaml").read_text())
    top = {"plots": [p for p in project["plots"] if "${tracking.dir}/plots/metrics" in p],
           "metrics": [m for m in project["metrics"] if "${tracking.dir}" in m]}
    assert top["plots"] and top["metrics"]
    monkeypatch.chdir(tmp_path)
    Repo.init(".", no_scm=True)
    Path("dvc.yaml").write_text(yaml.safe_dump(top))
    Path("params.yaml").write_text("tracking: {dvclive: true, dir: runlive, tensorboard: false}\n")
    with Tracker(load_tracking("params.yaml")) as t:
        t.log_step({"pg_loss": 0.5}, 1)
        t.log_step({"pg_loss": 0.25}, 2)
        t.log_iteration("evaluate", {"val_greedy": 0.75}, 0)
    repo = Repo(".")
    sources = repo.plots.show()["workspace"]["sources"]["data"]
    steps = sources["runlive/plots/metrics/update/pg_loss.tsv"]["data"]
    assert [(int(r["step"]), float(r["pg_loss"])) for r in steps] == [(1, 0.5), (2, 0.25)]
    assert "runlive/plots/metrics/iteration/evaluate/val_greedy.tsv" in sources
    metrics = repo.metrics.show()[""]["data"]["runlive/metrics.json"]["data"]
    assert metrics["update"]["pg_loss"] == 0.25 and metrics["iteration"]["evaluate"]["val_greedy"] == 0.75


def test_offline_no_socket_is_opened_even_with_a_studio_token(tmp_path, monkeypatch):
    """With a DVC Studio token in the environment DVCLive would post to Studio; the tracker must not
    call Studio's client at all, open no connection (sockets refused and counted) and leave the
    environment as it was."""
    import dvclive.studio
    from dvc_studio_client.config import get_studio_config

    monkeypatch.setenv("DVC_STUDIO_TOKEN", "not-a-real-token")
    monkeypatch.setenv("DVC_STUDIO_REPO_URL", "https://example.invalid/repo.git")
    monkeypatch.delenv("DVC_STUDIO_OFFLINE", raising=False)
    assert get_studio_config()  # the control: this environment would make DVCLive post
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network refused by the test")

    posts = []
    monkeypatch.setattr(dvclive.studio, "post_live_metrics", lambda *a, **k: posts.append(a))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with Tracker(_params(tmp_path / "live")) as t:
        t.log_step({"pg_loss": 0.5}, 1)
        t.log_iteration("verify", {"reward_mean": 0.5}, 0)
    assert attempts == [] and posts == []
    assert "DVC_STUDIO_OFFLINE" not in os.environ
    assert read_series(tmp_path / "live", "update/pg_loss") == ([1], [0.5])


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = tmp_path / "live"
    with Tracker(_params(live, tensorboard=True)) as t:
        t.log_step({"pg_loss": 0.5}, 1)
        t.log_step({"pg_loss": 0.25}, 2)
        t.log_iteration("evaluate", {"val_greedy": 0.75}, 0)
    for run, tag, expected in (("steps", "update/pg_loss", [(1, 0.5), (2, 0.25)]),
                               ("iterations", "iteration/evaluate/val_greedy", [(0, 0.75)])):
        acc = EventAccumulator(str(live / "tensorboard" / run))
        acc.Reload()
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] == expected
    assert read_series(live, "update/pg_loss") == ([1, 2], [0.5, 0.25])  # the same calls fed DVCLive


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(TrackingError, match=r"tracking.tensorboard is true.*tcrlsd\[tensorboard\]"):
        with Tracker(_params(tmp_path / "live", tensorboard=True)) as t:
            t.log_step({"pg_loss": 0.5}, 1)
