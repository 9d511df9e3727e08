"""The stage contract (tcrlsd/stagecli.py), kept by every stages/*.py: arguments (``--params``
default params.yaml, ``--preset``), the error contract (the project's own errors and OSError: one
``<stage>: error:`` line, exit 2; anything else: the traceback, exit 1) and metrics writing."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcrlsd.artifacts import STAGE_ERRORS, StaleOutputError
from tcrlsd.errors import TcrlsdError
from tcrlsd.params import ParamsError
from tcrlsd.schemas import SchemaError
from tcrlsd.stagecli import run_stage, stage_parser, write_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "stages").glob("*.py"))
OPTIONAL_PARAMS = {"summarize", "code"}  # no --params default: summarize reads it only for live tracking, code never


def _main(name: str):
    spec = importlib.util.spec_from_file_location(f"_contract_{name}", REPO / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_the_project_errors_derive_from_one_base_and_stage_errors_is_narrow():
    from tcrlsd.critique import CriticAborted, CriticRetryLater, CritiqueError
    from tcrlsd.lm_head import LmHeadError
    from tcrlsd.score import ScoreError
    from tcrlsd.update import UpdateError
    from tcrlsd.verify import VerifyError, WorkerStartError

    for cls in (ParamsError, SchemaError, StaleOutputError, ScoreError, UpdateError, CritiqueError, VerifyError,
                WorkerStartError, CriticAborted, CriticRetryLater, LmHeadError):
        assert issubclass(cls, TcrlsdError), cls
    assert STAGE_ERRORS == (TcrlsdError, OSError)
    assert not issubclass(ValueError, STAGE_ERRORS) and not issubclass(RuntimeError, STAGE_ERRORS)


@pytest.mark.parametrize("exc", [ParamsError("params update.lr: expected a number, got 'x'"),
                                 FileNotFoundError("data/x.parquet: no such file"),
                                 StaleOutputError("out: finished parts of another fingerprint")])
def test_an_expected_error_is_one_line_and_status_2(exc, capsys):
    def body():
        raise exc

    assert run_stage("demo", body) == 2
    assert capsys.readouterr().err == f"demo: error: {exc}\n"


def test_anything_else_keeps_its_traceback_in_process():
    def body():
        np.zeros(4).reshape(3)  # a ValueError raised inside numpy: a bug, not a message for the user

    with pytest.raises(ValueError, match="reshape"):
        run_stage("demo", body)


def test_a_bug_exits_1_with_a_traceback():
    code = ("import numpy as np, sys\nfrom tcrlsd.stagecli import run_stage\n"
            "sys.exit(run_stage('demo', lambda: np.zeros(4).reshape(3)))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "reshape" in res.stderr and "error:" not in res.stderr


def test_further_exits_and_the_body_status(capsys):
    class Later(TcrlsdError):
        pass

    def later():
        raise Later("3 rows failed transiently")

    assert run_stage("demo", later, exits={Later: (75, "unfinished")}) == 75
    assert capsys.readouterr().err == "demo: unfinished: 3 rows failed transiently\n"
    assert run_stage("demo", lambda: None) == 0 and run_stage("demo", lambda: 3) == 3


def test_parser_and_metrics(tmp_path):
    args = stage_parser("doc", sections=("score",)).parse_args([])
    assert args.params == "params.yaml" and args.preset is None
    assert not hasattr(stage_parser("doc").parse_args([]), "params")  # a stage that reads no params
    write_metrics({"a": 1}, None)  # no --metrics: nothing written
    write_metrics({"a": 1}, tmp_path / "m" / "x.json")
    assert json.loads((tmp_path / "m" / "x.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_every_stage_script_keeps_the_contract(script, capsys):
    tree = ast.parse(script.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"stage_parser", "run_stage"} <= calls, f"{script.name} does not use tcrlsd.stagecli"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Try)], f"{script.name} handles errors itself"
    assert "ArgumentParser" not in script.read_text() and "write_json" not in script.read_text()
    with pytest.raises(SystemExit) as done:
        _main(script.stem)(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if script.stem in OPTIONAL_PARAMS:
        assert "default params.yaml" not in text
    else:
        assert "default params.yaml" in text and "--preset" in text


def _update_params(tmp_path, score: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(f"{score}update: {{device: cpu}}\n")
    return p


@pytest.mark.parametrize("score, message", [
    ("score: {teacher: bogus}\n", r"params score.teacher: 'bogus' is not one of 'current', 'lagged', 'ema'"),
    ("", r"no key score.teacher"),
])
def test_update_reads_score_teacher_validated(tmp_path, capsys, score, message):
    import re

    params = _update_params(tmp_path, score)
    argv = ["--params", str(params), "--rollouts", str(tmp_path / "r"), "--scores", str(tmp_path / "s"),
            "--advantages", str(tmp_path / "a"), "--policy", str(tmp_path / "p"), "--policy-out", str(tmp_path / "o"),
            "--state-out", str(tmp_path / "os")]
    assert _main("update")(argv) == 2
    err = capsys.readouterr().err
    assert re.search("^update: error: .*" + message, err) and "Traceback" not in err and err.count("\n") == 1, err


def test_update_reports_a_missing_input_as_one_line(tmp_path, capsys):
    params = _update_params(tmp_path, "score: {teacher: current}\n")
    argv = ["--params", str(params), "--rollouts", str(tmp_path / "none"), "--scores", str(tmp_path / "s"),
            "--advantages", str(tmp_path / "a"), "--policy", str(tmp_path / "p"), "--policy-out", str(tmp_path / "o"),
            "--state-out", str(tmp_path / "os")]
    assert _main("update")(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("update: error: ") and str(tmp_path / "none") in err and "Traceback" not in err, err


def test_teacher_mode_takes_the_preset(tmp_path):
    from tcrlsd.update.teacher import teacher_mode

    params = _update_params(tmp_path, "score: {teacher: current, dtype: auto}\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text("score: {teacher: ema}\n")
    assert teacher_mode(params) == "current" and teacher_mode(params, preset=preset) == "ema"
