"""Presets merge into params.yaml: keys change, comments stay, typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tcrlsd.cli import app
from tcrlsd.params import ParamsError
from tcrlsd.presets import apply_preset, list_presets

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"grpo", "rlsd_gold", "rlsd_self", "tc_rlsd_mult", "tc_rlsd_add", "tc_rlsd_hybrid"}
# the peers' estimators and losses (issue 24), usable by tcrlsd experiment --presets
BASELINES = {"rloo", "reinforce_pp", "reinforce_pp_baseline", "dr_grpo", "gspo"}


def test_the_six_runs_are_presets():
    assert RUNS | BASELINES <= set(list_presets(ROOT / "configs" / "presets"))


def test_every_preset_gives_valid_params(tmp_path):
    """Each preset over the shipped params.yaml loads into the stages' dataclasses (registry choices
    checked); the baselines set what their papers / verl use."""
    from tcrlsd.advantages import AdvantagesParams
    from tcrlsd.critique import CritiqueParams
    from tcrlsd.params import from_mapping
    from tcrlsd.update import UpdateParams

    loaded = {}
    for name in list_presets(ROOT / "configs" / "presets"):
        p = tmp_path / f"{name}.yaml"
        p.write_text((ROOT / "params.yaml").read_text())
        apply_preset(p, ROOT / "configs" / "presets" / f"{name}.yaml")
        data = yaml.safe_load(p.read_text())
        loaded[name] = (from_mapping(AdvantagesParams, data["advantages"], "advantages"),
                        from_mapping(UpdateParams, data["update"], "update"),
                        from_mapping(CritiqueParams, data["critique"], "critique"))
    adv, upd, crit = loaded["dr_grpo"]
    assert (adv.estimator, adv.norm_by_std, upd.loss_agg_mode, crit.mode) == ("grpo", False, "seq-mean-token-sum-norm", "none")
    adv, upd, _ = loaded["gspo"]
    assert (upd.policy_loss, upd.clip_ratio_low, upd.clip_ratio_high) == ("gspo", 3e-4, 4e-4)
    for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert loaded[name][0].estimator == name and loaded[name][2].mode == "none"


def test_every_preset_applies_to_the_shipped_params(tmp_path):
    for name in sorted(RUNS | BASELINES):
        p = tmp_path / f"{name}.yaml"
        p.write_text((ROOT / "params.yaml").read_text())
        apply_preset(p, ROOT / "configs" / "presets" / f"{name}.yaml")
        got = yaml.safe_load(p.read_text())
        want = yaml.safe_load((ROOT / "configs" / "presets" / f"{name}.yaml").read_text())
        for section, keys in want.items():
            for k, v in keys.items():
                assert got[section][k] == v


def test_apply_keeps_comments_and_rejects_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# top\nadvantages:\n  estimator: grpo  # which estimator\n  alpha: 0.7\n")
    preset = tmp_path / "p.yaml"
    preset.write_text("advantages:\n  estimator: rlsd_hybrid\n")
    assert apply_preset(params, preset) == [("advantages.estimator", "grpo", "rlsd_hybrid")]
    text = params.read_text()
    assert "# top" in text and "# which estimator" in text and "rlsd_hybrid" in text
    preset.write_text("advantages:\n  estimatr: rlsd\n")
    with pytest.raises(ParamsError, match="preset sets advantages.estimatr, which params.yaml does not have"):
        apply_preset(params, preset)


def test_cli_preset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    r = CliRunner().invoke(app, ["preset", "grpo", "--params", str(params), "--presets-dir", str(ROOT / "configs" / "presets")])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(params.read_text())["critique"]["mode"] == "none"
    r = CliRunner().invoke(app, ["preset", "nope", "--params", str(params), "--presets-dir", str(ROOT / "configs" / "presets")])
    assert r.exit_code == 2 and "known presets" in r.output


def test_cli_preset_inside_a_project_edits_its_params(tmp_path, monkeypatch):
    # no --params / --presets-dir: the project's, found by walking up from the working directory
    import shutil

    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(ROOT / "configs" / "presets", tmp_path / "configs" / "presets")
    (tmp_path / "data" / "iter-0000").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "data" / "iter-0000")
    r = CliRunner().invoke(app, ["preset", "grpo"])
    assert r.exit_code == 0, r.output
    assert f"preset: params: {tmp_path.resolve() / 'params.yaml'}" in r.stderr
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["critique"]["mode"] == "none"
    (tmp_path / "dvc.yaml").unlink()  # not a project any more: nothing to edit
    r = CliRunner().invoke(app, ["preset", "grpo"])
    assert r.exit_code == 2 and "no params.yaml + dvc.yaml" in r.stderr


def _git(args, cwd):
    import subprocess

    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_git_diff_shows_only_the_preset_keys(tmp_path):
    """A real `git diff` after `tcrlsd preset`: one -/+ line pair per changed key, nothing else."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    _git(["init", "-q"], tmp_path)
    _git(["-c", "user.email=t@t", "-c", "user.name=t", "add", "params.yaml"], tmp_path)
    _git(["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "params"], tmp_path)
    for name, n_keys in (("grpo", 2), ("tc_rlsd_add", 1)):
        _git(["checkout", "-q", "params.yaml"], tmp_path)
        changes = apply_preset(tmp_path / "params.yaml", ROOT / "configs" / "presets" / f"{name}.yaml")
        assert len(changes) == n_keys
        numstat = _git(["diff", "--numstat", "params.yaml"], tmp_path).split()
        assert numstat[:2] == [str(n_keys), str(n_keys)], numstat
        diff = _git(["diff", "-U0", "params.yaml"], tmp_path)
        added = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        for key, _old, new in changes:
            leaf = key.split(".")[-1]
            assert any(ln.lstrip("+ ").startswith(f"{leaf}: {new}") for ln in added), (key, added)
    # a block list (the data preset's sources) is rewritten item by item, at the old indentation
    _git(["checkout", "-q", "params.yaml"], tmp_path)
    apply_preset(tmp_path / "params.yaml", ROOT / "configs" / "data" / "math.yaml")
    # (MATH's two sources, train and val, replace the synthetic train, val and test: 2 added, 3 deleted)
    assert _git(["diff", "--numstat", "params.yaml"], tmp_path).split()[:2] == ["2", "3"]


def test_surgical_edit_keeps_comment_columns_quotes_and_nulls(tmp_path):
    params = tmp_path / "params.yaml"
    original = ("score:\n  teacher: current            # which weights\n  dtype: auto  # dtype\n"
                "gen:\n  top_p: 1.0\n  stop: null   # none\n  tmpl: 'it''s {x}'  # quoted\n  trailing: 1   \n")
    params.write_text(original)
    preset = tmp_path / "p.yaml"
    preset.write_text("score:\n  teacher: lagged\ngen:\n  tmpl: \"# not a comment\"\n  stop: [a, b]\n")
    apply_preset(params, preset)
    lines = params.read_text().splitlines()
    assert lines[1] == "  teacher: lagged             # which weights"  # comment column kept
    assert lines[2] == "  dtype: auto  # dtype"
    assert lines[5] == "  stop: [a, b] # none"
    assert yaml.safe_load(params.read_text())["gen"]["tmpl"] == "# not a comment"
    assert lines[7] == "  trailing: 1   "  # untouched lines keep even their trailing spaces
    assert yaml.safe_load(params.read_text())["gen"]["top_p"] == 1.0


def test_an_edit_that_adds_lines_does_not_shift_the_later_ones(tmp_path):
    # The list under `sources` grows from 2 lines to 3; `later.value` and the nested `deep.x` sit below
    # it. Positions are read again after each key, so the later edits land on their own lines (the
    # GPU preset once wrote critique.sampling.max_new_tokens over a comment line this way).
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  sources:\n    - {name: a}\n    - {name: b}\n"
                      "later:\n  value: 1   # a comment\n  # a comment line\n  deep:\n    x: 2  # (sets 9)\n"
                      "  empty: {}\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text("prepare: {sources: [{name: a}, {name: b}, {name: c}]}\n"
                      "later: {value: 5, deep: {x: 9}, empty: {k: 1, j: 2}}\n")
    apply_preset(params, preset)
    assert yaml.safe_load(params.read_text()) == {
        "prepare": {"sources": [{"name": "a"}, {"name": "b"}, {"name": "c"}]},
        "later": {"value": 5, "deep": {"x": 9}, "empty": {"k": 1, "j": 2}}}
    text = params.read_text()
    assert "value: 5   # a comment\n  # a comment line\n" in text and "x: 9  # (sets 9)" in text
