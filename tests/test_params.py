"""Typed, frozen params: unknown keys and wrong types are errors that name what is valid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from tcrlsd.params import ParamsError, from_mapping, load_section, merge


@dataclass(frozen=True)
class Demo:
    estimator: Literal["grpo", "rlsd"] = "grpo"
    alpha: float = 0.7
    steps: int = 3
    norm_by_std: bool = True
    clip: float | None = None
    levels: tuple[int, ...] = (1, 2)


def test_defaults_and_coercion():
    p = from_mapping(Demo, {"alpha": 1, "levels": [3, 4]}, "demo")
    assert p.alpha == 1.0 and isinstance(p.alpha, float) and p.levels == (3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.alpha = 2.0  # type: ignore[misc]


def test_unknown_key_names_valid_keys():
    with pytest.raises(ParamsError, match=r"params section 'demo': unknown key\(s\) alpah; valid keys: alpha, clip, estimator, levels, norm_by_std, steps"):
        from_mapping(Demo, {"alpah": 0.1}, "demo")


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"steps": 1.5}, r"demo.steps: expected an integer"),
        ({"norm_by_std": "yes"}, r"demo.norm_by_std: expected true or false"),
        ({"estimator": "ppo"}, r"demo.estimator: 'ppo' is not one of 'grpo', 'rlsd'"),
        ({"alpha": "x"}, r"demo.alpha: expected a number"),
        ({"levels": 3}, r"demo.levels: expected a list"),
    ],
)
def test_wrong_types(data, msg):
    with pytest.raises(ParamsError, match=msg):
        from_mapping(Demo, data, "demo")


def test_load_section_with_preset(tmp_path):
    (tmp_path / "params.yaml").write_text("demo:\n  alpha: 0.5\n  steps: 2\nother: {}\n")
    (tmp_path / "preset.yaml").write_text("demo:\n  estimator: rlsd\n")
    p = load_section(tmp_path / "params.yaml", "demo", Demo, preset=tmp_path / "preset.yaml")
    assert (p.alpha, p.steps, p.estimator) == (0.5, 2, "rlsd")
    with pytest.raises(ParamsError, match=r"no section 'nope'; sections found: demo, other"):
        load_section(tmp_path / "params.yaml", "nope", Demo)


def test_merge_is_deep_and_pure():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    out = merge(base, {"a": {"y": 3}})
    assert out == {"a": {"x": 1, "y": 3}, "b": 1} and base["a"]["y"] == 2
