"""Typed, frozen params: unknown keys and wrong types are errors that name what is valid."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Literal

import pytest

from tcrlsd.params import ParamsError, check_choices, choice, choices, from_mapping, load_section, merge


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


# ---------------------------------------------------------------------------------------------
# params.yaml is the only place a default lives

from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _section_classes() -> dict:
    from tcrlsd.params import SECTIONS, section_class

    return {section: section_class(section) for section in SECTIONS}


def _keys(cls, prefix: str = "") -> set[str]:
    """Every key of ``cls`` as a dotted path (nested params dataclasses included)."""
    out = set()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        out |= _keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else {prefix + f.name}
    return out


def _yaml_keys(cls, data: dict, prefix: str = "") -> set[str]:
    """The keys of a params.yaml section, dotted where ``cls`` nests a params dataclass."""
    hints = typing.get_type_hints(cls)
    out = set()
    for k, v in data.items():
        tp = hints.get(k)
        nested = tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict)
        out |= _yaml_keys(tp, v, f"{prefix}{k}.") if nested else {prefix + k}
    return out


def test_code_defaults_equal_params_yaml_section_by_section():
    # The code defaults serve only outside a project (tcrlsd.params.params_in_force); they must be
    # params.yaml's. Drift this test found and fixed (params.yaml's value kept, the code's changed):
    # advantages.lam_decay_steps 50 -> 12; warmstart.carry_slip_rate 0.0 -> 0.7, steps 3000 -> 2500,
    # batch_size 8 -> 32, lr 1e-3 -> 2e-3; critique.max_new_tokens 512 -> 96.
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    classes = _section_classes()
    assert set(shipped) == set(classes)
    for section, cls in classes.items():
        # every key a dataclass has is written in params.yaml (no default only the code knows) ...
        # (warmstart.model.vocab_size is not a key: WarmstartParams.model_config() sets it from
        # warmstart.vocab_size, the trained tokenizer's size)
        assert _keys(cls) - {"model.vocab_size"} == _yaml_keys(cls, shipped[section]), section
        # ... and the code's default is params.yaml's value, nested dataclasses included
        loaded, built_in = from_mapping(cls, shipped[section], section), cls()
        for f in dataclasses.fields(cls):
            assert getattr(loaded, f.name) == getattr(built_in, f.name), f"{section}.{f.name}"


def test_find_project_walks_up_for_params_and_dvc_yaml(tmp_path, monkeypatch):
    from tcrlsd.params import find_project, params_in_force

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "params.yaml").write_text("{}\n")  # params.yaml without dvc.yaml: not a project
    assert find_project(tmp_path / "a" / "b") is None
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert find_project(tmp_path / "a" / "b") == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert params_in_force() == tmp_path.resolve() / "params.yaml"
    assert params_in_force("other.yaml") == Path("other.yaml")  # an explicit file wins


def test_help_prints_the_value_in_force(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tcrlsd.cli import app

    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "250")  # one help line per option: no wrapping inside the phrase
    monkeypatch.setenv("TERMINAL_WIDTH", "250")
    monkeypatch.chdir(ROOT)  # the project itself: params.yaml's 12
    res = runner.invoke(app, ["recompute", "--help"])
    assert res.exit_code == 0 and "default: 12 from ./params.yaml" in res.stdout, res.stdout
    (tmp_path / "params.yaml").write_text("advantages:\n  lam_decay_steps: 7\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["compare", "--help"])
    assert "default: 7 from ./params.yaml" in res.stdout and "default: 0.7 from ./params.yaml" in res.stdout
    (tmp_path / "dvc.yaml").unlink()  # no project: the built-in value, said to be built in
    res = runner.invoke(app, ["recompute", "--help"])
    assert "default: 12, built in" in res.stdout


def test_recompute_inside_a_project_gives_the_stored_advantages(tmp_path, tiny_policy, monkeypatch):
    # The bug of issue 21: inside a project, `tcrlsd recompute ITER_DIR` without --params took the
    # code defaults (lam_decay_steps 50) instead of the project's params.yaml, and its advantages
    # differed from the stored ones. Here the project's advantages section differs from every code
    # default that matters at iteration 0 (λ = lam0 there), so only the project's values reproduce
    # the stored bytes.
    import pyarrow.parquet as pq
    from harness import build_iteration, write_params
    from typer.testing import CliRunner

    from tcrlsd.cli import app

    project = tmp_path / "project"
    project.mkdir()
    params = write_params(project, advantages={"estimator": "rlsd_hybrid", "lam0": 0.3, "alpha": 0.6, "beta": 0.4,
                                               "eps_w": 0.1})
    (project / "dvc.yaml").write_text("stages: {}\n")
    it = build_iteration(project / "data" / "iter-0000", tiny_policy, params)
    monkeypatch.chdir(project / "data")  # anywhere inside the project
    out = tmp_path / "recomputed.parquet"
    res = CliRunner().invoke(app, ["recompute", str(it), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert f"recompute: params: {project.resolve() / 'params.yaml'}" in res.stderr
    stored = pq.read_table(it / "advantages.parquet")
    again = pq.read_table(out)
    assert again.column("advantages").to_pylist() == stored.column("advantages").to_pylist()
    assert json.loads(res.stdout)["lam"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# shared nested params (sampling, engine) and the one dtype rule


def test_generate_evaluate_and_critique_share_sampling_and_engine():
    from tcrlsd.generation import EngineParams, SamplingParams

    classes = _section_classes()
    for section in ("generate", "evaluate", "critique"):
        hints = typing.get_type_hints(classes[section])
        assert hints["sampling"] is SamplingParams and hints["engine"] is EngineParams, section
    # evaluate takes the vllm engine options generate has (it lacked max_model_len / engine_args)
    p = from_mapping(classes["evaluate"], {"engine": {"max_model_len": 4096, "engine_args": {"max_num_seqs": 8}}},
                     "evaluate")
    assert p.backend_options()["max_model_len"] == 4096 and p.backend_options()["engine_args"] == {"max_num_seqs": 8}


def test_a_partial_nested_mapping_keeps_the_sections_other_values():
    from tcrlsd.generation import SamplingParams

    classes = _section_classes()
    # evaluate's sampling default is temperature 0.6 (SamplingParams' own is 1.0): setting only
    # max_new_tokens keeps 0.6, as a preset setting one nested key expects
    p = from_mapping(classes["evaluate"], {"sampling": {"max_new_tokens": 7}}, "evaluate")
    assert p.sampling == SamplingParams(temperature=0.6, top_p=1.0, max_new_tokens=7)
    c = from_mapping(classes["critique"], {"sampling": {"temperature": 1.0}}, "critique")
    assert (c.sampling.temperature, c.sampling.max_new_tokens) == (1.0, 96)
    with pytest.raises(ParamsError, match=r"section 'generate.engine': unknown key\(s\) devise"):
        from_mapping(classes["generate"], {"engine": {"devise": "cpu"}}, "generate")
    with pytest.raises(ParamsError, match=r"generate.sampling.top_p: expected a number"):
        from_mapping(classes["generate"], {"sampling": {"top_p": "x"}}, "generate")
    with pytest.raises(ParamsError, match=r"engine.dtype must be auto or one of float32"):
        from_mapping(classes["evaluate"], {"engine": {"dtype": "int8"}}, "evaluate")
    with pytest.raises(ParamsError, match=r"params generate.engine: expected a mapping"):
        from_mapping(classes["generate"], {"engine": "cpu"}, "generate")


@pytest.mark.parametrize("name, device, want", [
    ("auto", "cpu", "float32"),  # CPU: float32, whether or not a GPU exists elsewhere
    ("auto", "cuda", "bfloat16"),
    ("auto", "cuda:3", "bfloat16"),
    ("float32", "cuda", "float32"),  # an explicit dtype is kept ...
    ("bf16", "cpu", "bfloat16"),  # ... aliases expanded
    ("fp16", "cuda:0", "float16"),
])
def test_resolve_dtype_follows_the_device_actually_used(name, device, want):
    from tcrlsd.policy import resolve_dtype

    assert resolve_dtype(name, device) == want


def test_resolve_dtype_refuses_unknown_dtypes_and_unresolved_devices():
    from tcrlsd.policy import resolve_dtype

    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="needs a resolved device"):
        resolve_dtype("auto", "auto")


def test_load_policy_on_cpu_is_float32_even_when_a_gpu_exists(tiny_policy, monkeypatch):
    # The bug of issue 21: dtype auto was bfloat16 whenever torch saw a GPU, even for device: cpu.
    import torch

    from tcrlsd.policy import load_policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = load_policy(tiny_policy, device="cpu", dtype="auto")
    assert next(model.parameters()).dtype == torch.float32

REGISTRY = {"grpo": None, "rloo": None}


@dataclass(frozen=True)
class WithChoice:
    estimator: str = choice("grpo", lambda: REGISTRY, "REGISTRY in tests/test_params.py")
    graders: tuple[str, ...] = choice(("grpo",), lambda: REGISTRY, "REGISTRY in tests/test_params.py")

    def __post_init__(self):
        check_choices(self)


def test_choice_fields_take_their_values_from_the_registry():
    assert from_mapping(WithChoice, {"estimator": "rloo", "graders": ["rloo", "grpo"]}, "demo").graders == ("rloo", "grpo")
    with pytest.raises(ParamsError, match=r"params demo.estimator: 'ppo' is not one of grpo, rloo "
                                          r"\(the keys of REGISTRY in tests/test_params.py\)"):
        from_mapping(WithChoice, {"estimator": "ppo"}, "demo")
    with pytest.raises(ParamsError, match=r"params demo.graders: 'x' is not one of grpo, rloo"):
        from_mapping(WithChoice, {"graders": ["grpo", "x"]}, "demo")
    with pytest.raises(ValueError, match="estimator: 'ppo' is not one of"):
        WithChoice(estimator="ppo")  # direct construction is checked too
    # the registry is read when checked: a new entry is a valid value at once, and listed
    REGISTRY["reinforce_pp"] = None
    try:
        assert from_mapping(WithChoice, {"estimator": "reinforce_pp"}, "demo").estimator == "reinforce_pp"
        assert choices(WithChoice, "estimator") == ("grpo", "rloo", "reinforce_pp")
    finally:
        del REGISTRY["reinforce_pp"]


def test_stage_params_choices_are_their_registries():
    from tcrlsd.advantages import ESTIMATORS, AdvantagesParams
    from tcrlsd.critique import CRITICS, MODES, CritiqueParams
    from tcrlsd.generate.backends import BACKENDS
    from tcrlsd.optim import LR_SCHEDULES
    from tcrlsd.prepare import FORMATS, SourceParams
    from tcrlsd.score import ScoreParams
    from tcrlsd.teachers import TEACHER_MODES
    from tcrlsd.update import UpdateParams
    from tcrlsd.update.losses import AGGREGATIONS, POLICY_LOSSES

    for cls, name, registry in ((AdvantagesParams, "estimator", ESTIMATORS), (CritiqueParams, "critic", CRITICS),
                                (CritiqueParams, "mode", MODES), (CritiqueParams, "self_backend", BACKENDS),
                                (SourceParams, "format", FORMATS), (ScoreParams, "teacher", TEACHER_MODES),
                                (UpdateParams, "loss_agg_mode", AGGREGATIONS), (UpdateParams, "policy_loss", POLICY_LOSSES),
                                (UpdateParams, "lr_schedule", LR_SCHEDULES)):
        assert choices(cls, name) == tuple(registry), (cls.__name__, name)
