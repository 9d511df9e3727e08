"""End to end: `dvc repro` of the real dvc.yaml on the embedded default, offline, in a temp copy.

The copy uses the repository's own dvc.yaml, stages and params.yaml, with a few params shrunk so
the whole chain runs in about a minute on 2 cores (a short warm start, fewer prompts). It checks
that every artifact exists, validates against its contract, joins on rollout_id with matching
token lengths, that a second `dvc repro` has nothing to do, and that changing an advantages param
re-runs only the advantages stage.
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

from tcrlsd.artifacts import read_artifact
from tcrlsd.schemas import check_token_lengths

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "stages", "configs", "data/raw"]

SMALL = {
    "prepare": {"sources": [
        {"name": "synthetic", "format": "synthetic", "split": "train", "path": None, "count": 64,
         "levels": [1, 2, 3, 4], "max_operand": 20},
        {"name": "synthetic", "format": "synthetic", "split": "val", "path": None, "count": 16,
         "levels": [1, 2, 3, 4], "max_operand": 20},
    ]},
    "warmstart": {"steps": 60, "warmup_steps": 10, "sft_problems": 1500, "tokenizer_problems": 500},
    "generate": {"prompts_per_step": 6, "samples_per_prompt": 4, "num_parts": 2},
}


def _run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists():
        pytest.fail("dvc is not installed; it is a dependency of tcrlsd")
    work = tmp_path_factory.mktemp("pipeline")
    for rel in COPY:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, work / rel)
        else:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    # dvc.yaml lists library files as deps; they resolve against the copy.
    shutil.copytree(ROOT / "tcrlsd", work / "tcrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section, keys in SMALL.items():
        params[section].update(keys)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], work)
    _run([dvc, "config", "core.analytics", "false"], work)
    _run([dvc, "repro"], work)
    return work, dvc


@pytest.mark.slow
def test_repro_writes_every_artifact_consistently(repo):
    work, _ = repo
    it = work / "data" / "iter-0000"
    prompts = read_artifact(work / "data" / "prompts.parquet", "prompts")
    assert sorted(set(prompts.column("split").to_pylist())) == ["train", "val"]
    assert (work / "models" / "policy-0000" / "model.safetensors").exists()
    rollouts = read_artifact(it / "rollouts", "rollouts")
    assert rollouts.num_rows == 6 * 4
    verdicts = read_artifact(it / "verdicts.parquet", "verdicts")
    critiques = read_artifact(it / "critiques", "critiques")
    scores = read_artifact(it / "scores", "scores")
    advantages = read_artifact(it / "advantages.parquet", "advantages")
    for name, table in [("verdicts", verdicts), ("critiques", critiques), ("scores", scores), ("advantages", advantages)]:
        check_token_lengths(rollouts, table, name)
    # default run: external (reference) critique of the incorrect rollouts
    wrong = {r for r, ok in zip(verdicts.column("rollout_id").to_pylist(), verdicts.column("is_correct").to_pylist()) if not ok}
    with_feedback = {r for r, f in zip(critiques.column("rollout_id").to_pylist(), critiques.column("feedback_text").to_pylist()) if f is not None}
    assert with_feedback == wrong
    metrics = {p.stem: json.loads(p.read_text()) for p in (it / "metrics").glob("*.json")}
    assert {"generate", "verify", "critique", "score", "advantages"} <= set(metrics)
    assert metrics["advantages"]["estimator"] == "rlsd_hybrid"


@pytest.mark.slow
def test_second_repro_is_a_no_op_and_params_rerun_only_their_stage(repo):
    work, dvc = repo
    status = _run([dvc, "status"], work).stdout
    assert "up to date" in status, status
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["advantages"]["alpha"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([dvc, "repro"], work).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"advantages@0000"}, out


@pytest.mark.slow
def test_compare_on_the_stored_iteration(repo):
    work, _ = repo
    tcrlsd = str(Path(sys.executable).parent / "tcrlsd")
    out = _run([tcrlsd, "compare", str(work / "data" / "iter-0000"), "--format", "csv"], work).stdout
    header = out.splitlines()[0]
    for est in ("grpo", "rlsd", "rlsd_add", "rlsd_hybrid"):
        assert est in header
