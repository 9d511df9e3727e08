"""The loop's pieces without running a pipeline: iterations.yaml, the summary table, reports, experiments."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from tcrlsd.loop.experiment import Run, collect_results, summary_table
from tcrlsd.loop.iterations import IterationsError, append_iterations, read_iterations
from tcrlsd.loop.report import write_report
from tcrlsd.summarize import COLUMNS, collect_rows, headline, read_table, write_table
from tcrlsd.progress import LogLines, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_iterations_file_chains():
    items = read_iterations(ROOT / "iterations.yaml")
    assert items[0].k == 0 and items[0].policy == "models/policy-0000"
    for prev, cur in zip(items, items[1:]):
        assert cur.policy == prev.next_policy


def test_append_keeps_the_file_and_continues_the_chain(tmp_path):
    path = tmp_path / "iterations.yaml"
    text = ("# my notes\niterations:\n"
            '  "0000": {k: 0, policy: models/policy-0000, next_policy: models/policy-0001}  # first\n'
            "# trailing comment\n")
    path.write_text(text)
    new = append_iterations(path, 2)
    assert [(i.key, i.k, i.policy, i.next_policy) for i in new] == [
        ("0001", 1, "models/policy-0001", "models/policy-0002"),
        ("0002", 2, "models/policy-0002", "models/policy-0003")]
    out = path.read_text()
    assert out.startswith(text.split("# trailing")[0]) and out.endswith("# trailing comment\n")
    assert list(yaml.safe_load(out)["iterations"]) == ["0000", "0001", "0002"]


def test_broken_chains_are_errors(tmp_path):
    path = tmp_path / "iterations.yaml"
    path.write_text('iterations:\n  "0000": {k: 0, policy: a-0, next_policy: a-1}\n'
                    '  "0001": {k: 1, policy: a-9, next_policy: a-2}\n')
    with pytest.raises(IterationsError, match="'0001' generates with 'a-9'.*chain is broken"):
        read_iterations(path)
    path.write_text('iterations:\n  "0000": {k: 0, policy: a, next_policy: b}\n')
    with pytest.raises(IterationsError, match="ends without a number"):
        append_iterations(path, 1)
    path.write_text('iterations:\n  "0000": {k: 0, policy: a-0}\n')
    with pytest.raises(IterationsError, match="exactly the keys"):
        read_iterations(path)


def _metrics(folder: Path, reward: float, val: float, with_update: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "verify.json").write_text(json.dumps({"reward_mean": reward, "by_reason": {"correct": 3}}))
    (folder / "evaluate.json").write_text(json.dumps({"greedy_mean_at_1": val, "avg_at_k": val / 2}))
    (folder / "critique.json").write_text(json.dumps({"coverage": 1 - reward}))
    if with_update:
        (folder / "update.json").write_text(json.dumps({"entropy": 0.5, "pg_clipfrac": 0.01, "pg_loss": -0.1}))


def test_table_rows_headline_and_report(tmp_path):
    m = tmp_path / "metrics"
    _metrics(m / "iter-0000", 0.25, 0.40)
    _metrics(m / "iter-0001", 0.50, 0.35, with_update=False)
    (m / "evaluate-baseline.json").write_text(json.dumps({"greedy_mean_at_1": 0.3, "avg_at_k": 0.2, "samples": 4,
                                                          "prompts": 10}))
    rows = collect_rows(m)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["reward_mean"] == 0.25 and rows[1]["critique_coverage"] == 0.5
    assert rows[1]["entropy"] is None and rows[0]["delta_gap"] is None  # missing stage / key: empty cell
    write_table(rows, tmp_path / "t.csv")
    back = read_table(tmp_path / "t.csv")
    assert back[0]["val_greedy"] == 0.4 and back[1]["entropy"] is None
    assert next(csv.reader(io.StringIO((tmp_path / "t.csv").read_text()))) == ["iteration", *COLUMNS]
    head = headline(m, rows)
    assert head["iterations"] == 2 and head["best_val_greedy"] == 0.4
    assert head["baseline"] == {"greedy_mean_at_1": 0.3, "avg_at_k": 0.2, "maj_at_k": None}
    assert head["verify"] == {"reward_mean": 0.5} and head["update"]["entropy"] is None
    md = write_report(tmp_path / "t.csv", tmp_path / "rep", baseline=m / "evaluate-baseline.json")
    text = md.read_text()
    assert "peak 0.4000 after iteration 0" in text and "![Validation accuracy](validation.png)" in text
    for png in ("validation", "reward", "delta_gap", "update", "response_length"):
        assert (tmp_path / "rep" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "rep" / "steps.png").exists()  # no live folder: no per-step figure
    # with the live tracking folder the report adds the update's per-step series it holds
    from tcrlsd.tracking import Tracker, TrackingParams

    with Tracker(TrackingParams(dvclive=True, dir=str(tmp_path / "live"), tensorboard=False)) as t:
        for step in (1, 2, 3):
            t.log_step({"pg_loss": 0.1 * step, "lr": 1e-4}, step)
    md = write_report(tmp_path / "t.csv", tmp_path / "rep2", baseline=m / "evaluate-baseline.json",
                      live=tmp_path / "live")
    assert "![Update, per optimizer step (live tracking)](steps.png)" in md.read_text()
    assert (tmp_path / "rep2" / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_summary_mean_and_std_over_seeds(tmp_path):
    # two seeds of one preset: greedy curves [0.2, 0.5, 0.4] and [0.3, 0.3, 0.6]
    # peak: 0.5 and 0.6 -> 55.0 ± 7.1 (sample std of {50, 60} = 7.07); final: 0.4 and 0.6 -> 50.0 ± 14.1
    for seed, curve in ((0, [0.2, 0.5, 0.4]), (1, [0.3, 0.3, 0.6])):
        m = tmp_path / "runs" / f"grpo-s{seed}" / "data" / "metrics"
        for i, v in enumerate(curve):
            _metrics(m / f"iter-{i:04d}", 0.1, v)
        (m / "evaluate-baseline.json").write_text(json.dumps({"greedy_mean_at_1": 0.9, "avg_at_k": 0.9}))
        rows = collect_rows(m)
        write_table(rows, m.parent / "summary" / "iterations.csv")
    rows = collect_results(tmp_path, [Run("grpo", 0), Run("grpo", 1)])
    assert len(rows) == 2 * (1 + 3) and {r["iteration"] for r in rows} == {-1, 0, 1, 2}
    table = summary_table(rows, ["grpo"])
    # the baseline (iteration -1, 0.9) is not a training result: it never counts as the peak
    assert "| grpo | 2 | 3 | 55.0 ± 7.1 | 50.0 ± 14.1 | 27.5 ± 3.5 | 25.0 ± 7.1 |" in table


def test_progress_lines_in_a_log_file(monkeypatch):
    monkeypatch.setenv("TCRLSD_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()
    bar = progress_bar(total=3, desc="stage", unit="row", file=buf)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[-1].startswith("stage: 100%") and all(ln.startswith("stage:") for ln in lines)
    w = LogLines(buf)
    assert not w.isatty()
    # a stage's set_postfix does not force a line in a log (only the interval does)
    monkeypatch.setenv("TCRLSD_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    bar = progress_bar(total=100, desc="x", file=log)
    for i in range(100):
        bar.update(1)
        bar.set_postfix(loss=i)
    bar.close()
    assert len(log.getvalue().splitlines()) <= 2, log.getvalue()


def test_experiment_workspace_applies_preset_seed_iterations_and_shared_cache(tmp_path):
    from tcrlsd.loop.experiment import prepare_workspace

    ws = prepare_workspace(ROOT, ROOT / "params.yaml", Run("grpo", 3), ROOT / "configs" / "presets",
                           tmp_path / "runs" / "grpo-s3", tmp_path / "cache", iterations=3)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["critique"]["mode"] == "none" and params["advantages"]["estimator"] == "grpo"
    assert params["generate"]["seed"] == params["update"]["seed"] == params["critique"]["seed"] == 3
    assert params["warmstart"] == yaml.safe_load((ROOT / "params.yaml").read_text())["warmstart"]  # same warm start
    assert [it.key for it in read_iterations(ws / "iterations.yaml")] == ["0000", "0001", "0002"]
    assert (ws / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert str((tmp_path / "cache").resolve()) in (ws / ".dvc" / "config.local").read_text()
    assert (ws / "data" / "raw").is_dir() and (ws / "tcrlsd" / "schemas.py").exists()
    # re-entering (resume) keeps the run's chain; asking for fewer iterations than it has is an error
    prepare_workspace(ROOT, ROOT / "params.yaml", Run("grpo", 3), ROOT / "configs" / "presets", ws,
                      tmp_path / "cache", iterations=3)
    with pytest.raises(ValueError, match="more than --iterations 2"):
        prepare_workspace(ROOT, ROOT / "params.yaml", Run("grpo", 3), ROOT / "configs" / "presets", ws,
                          tmp_path / "cache", iterations=2)


def test_experiment_setting_applies_to_every_run_before_its_preset(tmp_path):
    from tcrlsd.loop.experiment import prepare_workspace

    setting = ROOT / "configs" / "experiments" / "saturated.yaml"
    ws = prepare_workspace(ROOT, ROOT / "params.yaml", Run("tc_rlsd_add", 1), ROOT / "configs" / "presets",
                           tmp_path / "runs" / "tc_rlsd_add-s1", tmp_path / "cache", iterations=1, setting=setting)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["generate"]["train_levels"] == [1]
    assert params["advantages"]["estimator"] == "rlsd_add" and params["generate"]["seed"] == 1
    # only the setting's, the preset's and the seed's keys differ from the base params: the prompts
    # file and the warm start (prepare, warmstart sections) are the base's
    changed = {(sec, k) for sec in base for k in base[sec] if params[sec][k] != base[sec][k]}
    assert changed == {("generate", "train_levels"), ("advantages", "estimator"), ("generate", "seed"),
                       ("update", "seed"), ("critique", "seed")}


def _rows(preset, seed, greedy, **extra):
    return [{"preset": preset, "seed": seed, "iteration": i, "val_greedy": v, "val_avg_at_k": v / 2,
             **{k: vals[i] for k, vals in extra.items()}} for i, v in enumerate(greedy)]


def test_paired_t_with_equal_differences_is_infinite_not_a_rounding_artefact():
    from tcrlsd.loop.controls import paired_t
    from tcrlsd.loop.results import paired_table

    # 0.755 - 0.78 and 0.685 - 0.71 are both -2.5 points, apart only in the last float bits: sd 0
    assert paired_t([100 * (0.755 - 0.78), 100 * (0.685 - 0.71)]) == (-2.5, 0.0, float("-inf"))
    assert paired_t([1.0, 1.0, 1.0])[2] == float("inf") and paired_t([0.0, 0.0])[2] == 0.0
    mean, sd, t = paired_t([10.0, 12.0, 8.0])
    assert (mean, sd) == (10.0, 2.0) and t == pytest.approx(8.660254)
    rows = _rows("a", 0, [0.3, 0.78]) + _rows("a", 1, [0.3, 0.71])
    rows += _rows("p", 0, [0.3, 0.755]) + _rows("p", 1, [0.3, 0.685])
    line = next(ln for ln in paired_table(rows, ["a", "p"], "a").splitlines() if ln.startswith("| p |"))
    assert "-2.5 (0.0) | -inf" in line and "differs (peak and final)" in line, line


def test_paired_comparison_by_seed_and_its_verdict():
    from tcrlsd.loop.results import paired_table

    rows = []
    # b beats a by 10, 12, 8 points at the final iteration (mean 10, sd 2 -> t = 8.66 > 4.303)
    for seed, (a, b) in enumerate(((0.50, 0.60), (0.40, 0.52), (0.45, 0.53))):
        rows += _rows("a", seed, [0.3, a]) + _rows("b", seed, [0.3, b])
    # c differs by +5, -5, +2: within seed noise
    for seed, d in enumerate((0.05, -0.05, 0.02)):
        rows += _rows("c", seed, [0.3, (0.50, 0.40, 0.45)[seed] + d])
    table = paired_table(rows, ["a", "b", "c"], "a")
    line_b = next(ln for ln in table.splitlines() if ln.startswith("| b |"))
    assert "+10.0 (2.0)" in line_b and "+8.66" in line_b and "differs (peak and final)" in line_b
    line_c = next(ln for ln in table.splitlines() if ln.startswith("| c |"))
    assert "within seed noise" in line_c


def test_signals_table_and_report_with_command_and_doc(tmp_path):
    from tcrlsd.loop.results import Run, signals_table, write_results

    rows = []
    for seed in (0, 1):
        rows += _rows("grpo", seed, [0.5, 0.6], critique_coverage=[0.0, 0.0], saturated_share=[0.2, 0.4 + 0.2 * seed],
                      delta_gap=[None, None])
        rows += _rows("tc", seed, [0.5, 0.7], critique_coverage=[0.5, 0.3], saturated_share=[0.2, 0.2],
                      delta_gap=[0.1, 0.3], prompts_drawn=[32, 40 + 8 * seed])
    walls = {"grpo": [60.0, 120.0], "tc": [180.0, 180.0]}
    table = signals_table(rows, ["grpo", "tc"], walls)
    # saturated share: seed means 0.3 and 0.4 -> 35.0 ± 7.1; wall 1 and 2 min -> median 1.5
    assert "| grpo | 0.0 ± 0.0 |  | 35.0 ± 7.1 |" in table and table.splitlines()[2].endswith("| 1.5 |")
    assert "| tc | 40.0 ± 0.0 | 0.200 ± 0.000 | 20.0 ± 0.0 |" in table
    # prompts drawn (dynamic sampling): seed means 36 and 40 -> 38.0 ± 2.8, said per preset
    assert "prompts drawn per iteration" in table.splitlines()[0] and "| 38.000 ± 2.828 | 3.0 |" in table
    out = tmp_path / "exp"
    out.mkdir()
    for run in (Run("grpo", 0), Run("tc", 0)):
        (out / "runs" / run.name).mkdir(parents=True)
        (out / "runs" / run.name / "wall.json").write_text(json.dumps({"seconds": 90.0}))
    doc = tmp_path / "docs" / "RESULTS.md"
    path = write_results(out, rows, ["grpo", "tc"], [Run("grpo", 0), Run("tc", 0)], command="tcrlsd experiment --x 1",
                         doc=doc, title="T", intro="Why.")
    text = doc.read_text()
    assert path == doc and text.startswith("# T\n\nWhy.") and "tcrlsd experiment --x 1" in text
    assert "![Validation greedy mean@1](RESULTS-figures/val_greedy.png)" in text and "## Paired by seed" in text
    assert (tmp_path / "docs" / "RESULTS-figures" / "val_greedy.png").read_bytes()[:4] == b"\x89PNG"
    assert "](val_greedy.png)" in (out / "results.md").read_text()
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("preset,seed,iteration,val_greedy") and "saturated_nonzero_adv_share" in header


def test_hypothesis_line_is_decided_by_the_paired_interval_not_the_mean():
    from tcrlsd.loop.results import hypothesis_lines, load_aims

    aims = load_aims(ROOT / "configs" / "aims.yaml")  # the aim is data: tc_rlsd_hybrid >= grpo + 2 points
    assert [(a.run, a.reference, a.margin_points) for a in aims] == [("tc_rlsd_hybrid", "grpo", 2.0)]
    presets = ["grpo", "tc_rlsd_hybrid"]

    def line(diffs):  # tc_rlsd_hybrid minus grpo, in points, one seed each
        rows = []
        for seed, d in enumerate(diffs):
            rows += _rows("grpo", seed, [0.5, 0.60]) + _rows("tc_rlsd_hybrid", seed, [0.5, 0.60 + d / 100])
        return hypothesis_lines(rows, presets, aims)[0]

    # +3.0 (sd 0.2), 3 seeds: the interval is 3.0 ± 4.303 * 0.2 / sqrt(3) = [+2.5, +3.5], above 2
    assert "tc_rlsd_hybrid ≥ grpo + 2 points" in line([3.0, 3.2, 2.8])
    assert "**met** (difference +3.0 points, 95% interval [+2.5, +3.5]" in line([3.0, 3.2, 2.8])
    assert "**not met** (difference +1.0 points, 95% interval [+0.5, +1.5]" in line([1.0, 1.2, 0.8])
    # a mean above the margin with a wide spread is not "met": the mean alone never decides
    assert "**undecided** (difference +3.0 points" in line([3.0, 8.0, -2.0])
    assert "**undecided** (difference +3.0 points from one seed" in line([3.0])
    rows = _rows("grpo", 0, [0.5, 0.60]) + _rows("tc_rlsd_hybrid", 0, [0.5, 0.63])
    assert hypothesis_lines(rows, ["grpo"], aims) == []
    assert hypothesis_lines(rows, presets) == []  # no aims, no line


def test_a_run_without_any_feedback_is_called_out():
    from tcrlsd.loop.results import no_feedback_lines

    rows = _rows("rlsd_self", 0, [0.5, 0.6], critique_coverage=[0.0, 0.0])
    rows += _rows("tc", 0, [0.5, 0.6], critique_coverage=[0.0, 0.1]) + _rows("grpo", 0, [0.5], critique_coverage=[0.0])
    lines = no_feedback_lines(rows, ["grpo", "rlsd_self", "tc"])
    assert len([ln for ln in lines if ln]) == 1 and lines[0].startswith("rlsd_self: no rollout got feedback")


def test_a_fresh_experiment_workspace_starts_at_the_first_iteration(tmp_path):
    """A project that already ran 3 iterations: a new run still has exactly --iterations items."""
    import shutil

    from tcrlsd.loop.experiment import prepare_workspace
    from tcrlsd.loop.iterations import append_iterations

    project = tmp_path / "project"
    project.mkdir()
    for rel in ("dvc.yaml", "iterations.yaml", "params.yaml", "configs", "stages", "tcrlsd"):
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / rel)
    append_iterations(project / "iterations.yaml", 2)
    ws = prepare_workspace(project, project / "params.yaml", Run("grpo", 0), project / "configs" / "presets",
                           tmp_path / "runs" / "grpo-s0", tmp_path / "cache", iterations=1)
    assert [it.key for it in read_iterations(ws / "iterations.yaml")] == ["0000"]
    assert "# The training iterations" in (ws / "iterations.yaml").read_text()  # comments kept


def test_experiment_cli_uses_the_project_found_from_the_working_directory(tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from tcrlsd.cli import app

    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    args = ["experiment", "--presets", "grpo", "--iterations", "1", "--out", str(tmp_path / "exp"), "--report-only"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"experiment: params: {tmp_path.resolve() / 'params.yaml'}" in r.stderr
    (tmp_path / "dvc.yaml").unlink()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "no params.yaml + dvc.yaml" in r.stderr


def test_controls_section_pairs_each_run_with_its_controls_by_seed(tmp_path):
    """Final greedy, by hand: tc − grpo = +10, +12, +8 (mean 10, sd 2, t 8.66); tc − tc_blank = +4, +6,
    +2 (mean 4, sd 2, t 3.46): the content explains 4 / 10 = 40% of the gain; tc − tc_noisy = +1, +1, +1."""
    from tcrlsd.loop.controls import controls_lines, critique_lines

    rows = []
    for seed, (g, t) in enumerate(((0.50, 0.60), (0.40, 0.52), (0.45, 0.53))):
        rows += _rows("grpo", seed, [0.3, g]) + _rows("tc", seed, [0.3, t])
        rows += _rows("tc_blank", seed, [0.3, t - (0.04, 0.06, 0.02)[seed]]) + _rows("tc_noisy", seed, [0.3, t - 0.01])
    presets = ["grpo", "tc", "tc_blank", "tc_noisy"]
    text = "\n".join(controls_lines(rows, presets))
    assert "| tc | gain over grpo | +10.0 (2.0) | +8.66 | 3 |" in text
    assert "| tc | content (run − blank) | +4.0 (2.0) | +3.46 | 3 |" in text
    assert "| tc | noise degradation (run − noisy) | +1.0 (0.0) | +inf | 3 |" in text
    assert "| tc | content share of the gain | 40% | | |" in text
    assert "shuffled" not in text and controls_lines(rows, ["grpo", "tc"]) == []

    # the critique table: means over iterations, then over seeds; runs without feedback are skipped
    for name, shares in (("tc-s0", (0.0, 0.2)), ("tc-s1", (0.4, 0.4))):
        for i, x in enumerate(shares):
            d = tmp_path / "runs" / name / "data" / "metrics" / f"iter-{i:04d}"
            d.mkdir(parents=True)
            (d / "critique.json").write_text(json.dumps({"rollouts_with_feedback": 5, "leakage_share": 0.0,
                                                         "intermediate_leakage_share": x,
                                                         "reference_step_agreement": 1.0}))
    lines = critique_lines(tmp_path, ["grpo", "tc"], {"grpo": ["grpo-s0"], "tc": ["tc-s0", "tc-s1"]})
    # intermediate: seed means 0.1 and 0.4 -> 25.0
    assert "| tc | 0.0 | 25.0 | 100.0 |" in lines and not any(ln.startswith("| grpo") for ln in lines)


def test_final_table_on_the_test_split_is_paired_by_seed(tmp_path, monkeypatch):
    """The last policy of a run is evaluated with evaluate.split test (a preset beside params.yaml);
    the table: grpo 50/40/45%, tc 60/52/53% -> tc − grpo +10, +12, +8 (mean 10, sd 2, t 8.66: differs)."""
    import subprocess as sp

    from tcrlsd.loop.final import final_evaluation, final_lines, final_paths
    from tcrlsd.loop.results import Run

    runs = [Run(p, s) for p in ("grpo", "tc") for s in range(3)]
    for run, acc in zip(runs, (0.50, 0.40, 0.45, 0.60, 0.52, 0.53)):
        path = tmp_path / "runs" / run.name / final_paths("test")[1]
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"greedy_mean_at_1": acc, "avg_at_k": acc / 2, "split": "test"}))
    text = "\n".join(final_lines(tmp_path, ["grpo", "tc"], runs, "test"))
    assert "| grpo | 3 | 45.0 ± 5.0 | 22.5 ± 2.5 |  |  |  |" in text
    assert "| tc | 3 | 55.0 ± 4.4 | 27.5 ± 2.2 | +10.0 (2.0) | +8.66 | differs |" in text
    assert final_lines(tmp_path, ["grpo"], runs, "val") == []
    assert "## Controls" not in text  # no control preset in this experiment
    # with tc's content-free control (tc_blank 55/45/49%): content = tc − tc_blank +5, +7, +4 on the test split
    blank = [Run("tc_blank", s) for s in range(3)]
    for run, acc in zip(blank, (0.55, 0.45, 0.49)):
        path = tmp_path / "runs" / run.name / final_paths("test")[1]
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"greedy_mean_at_1": acc, "avg_at_k": acc / 2, "split": "test"}))
    text = "\n".join(final_lines(tmp_path, ["grpo", "tc", "tc_blank"], runs + blank, "test"))
    assert "## Controls on the test split" in text
    assert "| tc | gain over grpo | +10.0 (2.0) | +8.66 | 3 |" in text
    assert "| tc | content (run − blank) | +5.3 (1.5) | +6.05 | 3 |" in text
    assert "| tc | content share of the gain | 53% | | |" in text

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "iterations.yaml").write_text(
        'iterations:\n  "0000": {k: 0, policy: models/policy-0000, next_policy: models/policy-0001}\n'
        '  "0001": {k: 1, policy: models/policy-0001, next_policy: models/policy-0002}\n')
    seen = {}
    monkeypatch.setattr(sp, "call", lambda cmd, cwd, **kw: seen.update(cmd=cmd, cwd=cwd) or 0)
    assert final_evaluation(ws, "test") == 0
    cmd = seen["cmd"]
    assert seen["cwd"] == ws and cmd[1] == "stages/evaluate.py"
    assert cmd[cmd.index("--policy") + 1] == "models/policy-0002"  # the last iteration's update
    assert (ws / cmd[cmd.index("--preset") + 1]).read_text() == "evaluate:\n  split: test\n"
    assert cmd[cmd.index("--metrics") + 1] == "data/metrics/final-test.json"


def test_a_preset_given_as_a_path_is_labelled_by_its_stem(tmp_path):
    # `--presets grpo,configs/experiments/lr/grpo-lr2e-4.yaml`: the run folder and report row are
    # "grpo-lr2e-4", not a nested path; two files with one stem are refused, not run into one folder
    from tcrlsd.loop.experiment import preset_labels

    presets = ROOT / "configs" / "presets"
    sweep = ROOT / "configs" / "experiments" / "lr" / "grpo-lr2e-4.yaml"
    assert preset_labels(["grpo", str(sweep)], presets) == {"grpo": presets / "grpo.yaml", "grpo-lr2e-4": sweep}
    (tmp_path / "grpo.yaml").write_text("update:\n  lr: 0.0002\n")
    with pytest.raises(ValueError, match="both called 'grpo'"):
        preset_labels(["grpo", str(tmp_path / "grpo.yaml")], presets)
