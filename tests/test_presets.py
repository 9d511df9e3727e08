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


def test_the_six_runs_are_presets():
    assert RUNS <= set(list_presets(ROOT / "configs" / "presets"))


def test_every_preset_applies_to_the_shipped_params(tmp_path):
    for name in sorted(RUNS):
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
