"""The stages that need no model import neither torch nor transformers, and no stage process pandas
(issue 23, item 1).

Each runs as its own process, as DVC starts it (``python stages/<name>.py ...``), on a hand-made
8-rollout iteration, with tests/import_watch.py as the process's ``sitecustomize``: every process of
the run -- the stage and verify's grading workers -- records the watched libraries it imports.
torch + transformers cost ~3.7 s of start-up per process on this machine, pandas 0.4-0.5 s
(docs/ARCHITECTURE.md, "Start-up"), so a stray import in verify, critique, advantages or summarize
is a regression. pandas is hidden in a stage process (tcrlsd/startup.py); the test also shows that
each of these stages runs whole without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from critic_server import CriticServer
from fixtures import Row, synthetic_prompts, write_iteration
from import_watch import imported, watch_env

from tcrlsd.artifacts import write_artifact

REPO = Path(__file__).resolve().parents[1]
NOT_IMPORTED = {"torch", "transformers", "pandas"}


def _iteration(d: Path) -> Path:
    # 4 prompts x 2 samples; prompt ids as synthetic_prompts writes them, so verify and the
    # reference critic find each rollout's prompt
    write_artifact(synthetic_prompts(4), d / "prompts.parquet", "prompts")
    rows = [Row(f"synthetic/train/{i}", float(k == 0), [-0.5, -1.0], [-0.4, -0.9], feedback=k == 1)
            for i in range(4) for k in range(2)]
    return write_iteration(d, rows)


def _params(d: Path, **critique) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["verify"].update(workers=1, start_method="fork")  # the pool path, one worker
    params["critique"].update(skip_truncated=False, **critique)
    params["tracking"].update(dir=str(d / "dvclive"))  # summarize writes the live series (dvclive on)
    path = d / f"params-{critique.get('critic', 'reference')}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _run(stage: str, args: list[str], d: Path) -> set[str]:
    log = d / f"imports-{stage}-{len(list(d.glob('imports-*')))}.log"
    env = watch_env(d / "site", log)
    env.pop("TCRLSD_DEVICE", None)
    proc = subprocess.run([sys.executable, f"stages/{stage}.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stderr[-2000:]}"
    return imported(log)


def test_model_free_stages_import_no_model_library(tmp_path):
    d = _iteration(tmp_path / "it")
    m = tmp_path / "metrics" / "iter-0000"
    p_ref = _params(tmp_path)
    prompts, rollouts = ["--prompts", str(d / "prompts.parquet")], ["--rollouts", str(d / "rollouts.parquet")]
    seen = {}
    seen["verify"] = _run("verify", ["--params", str(p_ref), *prompts, *rollouts, "--out", str(tmp_path / "v.parquet"),
                                     "--metrics", str(m / "verify.json"), "--no-progress"], tmp_path)
    assert "math_verify" in seen["verify"]  # the watch sees the grading workers' imports
    critique = [*prompts, *rollouts, "--verdicts", str(tmp_path / "v.parquet")]
    seen["critique reference"] = _run("critique", ["--params", str(p_ref), *critique, "--out", str(tmp_path / "c"),
                                                   "--metrics", str(m / "critique.json")], tmp_path)
    with CriticServer() as server:
        p_api = _params(tmp_path, critic="openai", critic_model="critic", base_url=server.base_url)
        seen["critique openai"] = _run("critique", ["--params", str(p_api), *critique, "--out", str(tmp_path / "c-api")],
                                       tmp_path)
        assert sum(server.answered.values()) > 0  # the critic was really asked
    seen["advantages"] = _run("advantages", ["--params", str(p_ref), *rollouts, "--verdicts", str(tmp_path / "v.parquet"),
                                             "--scores", str(d / "scores.parquet"), "--critiques", str(tmp_path / "c"),
                                             "--out", str(tmp_path / "a.parquet"), "--metrics",
                                             str(m / "advantages.json")], tmp_path)
    seen["summarize"] = _run("summarize", ["--metrics-dir", str(m.parent), "--table", str(tmp_path / "t.csv"),
                                           "--headline", str(tmp_path / "h.json"), "--params", str(p_ref)], tmp_path)
    assert "dvclive" in seen["summarize"]  # the live series were written: the tracking path ran
    assert json.loads((tmp_path / "h.json").read_text())  # every stage produced its output
    assert {stage: sorted(libs & NOT_IMPORTED) for stage, libs in seen.items()} == {stage: [] for stage in seen}
    shutil.rmtree(tmp_path / "site")


def test_hide_pandas_makes_it_look_not_installed():
    # in a child: hiding is for a stage's own process, never for the test process. Both ways of
    # asking see no pandas (torch's dynamo asks find_spec; pyarrow and DVCLive import it)
    code = ("import importlib.util; from tcrlsd.startup import hide_pandas\n"
            "assert hide_pandas() and not hide_pandas()  # the second call finds it hidden\n"
            "assert importlib.util.find_spec('pandas') is None and importlib.util.find_spec('numpy')\n"
            "try:\n    import pandas\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "No module named 'pandas'"


@pytest.mark.parametrize("keep", ["", "1"])
def test_stage_process_keeps_pandas_when_the_environment_asks(keep, tmp_path):
    # process_main hides pandas unless TCRLSD_STAGE_PANDAS=1 (code of one's own that needs it).
    # pandas is no dependency of tcrlsd (a clean environment has none), so the child gets a stand-in
    # package on its path: without one, "kept" and "hidden" would both print False
    (tmp_path / "pandas").mkdir()
    (tmp_path / "pandas" / "__init__.py").write_text("")
    code = ("from tcrlsd.stagecli import process_main\n"
            "def main():\n    import importlib.util\n    print(importlib.util.find_spec('pandas') is not None)\n"
            "    return 0\n"
            "raise SystemExit(process_main(main))\n")
    env = {k: v for k, v in os.environ.items() if k != "TCRLSD_STAGE_PANDAS"} | {"TCRLSD_STAGE_PANDAS": keep}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("True" if keep == "1" else "False")
