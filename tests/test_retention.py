"""Checkpoint retention (tcrlsd/loop/retention.py) in a real DVC repository of tiny shell stages.

The stages copy the real dvc.yaml's shape around a checkpoint: an update per iteration writes
`next_policy` (weights + config + weights.sha256, a persist output) and, undeclared, its state
beside it; generate reads `policy`, evaluate reads `next_policy`. `tcrlsd iterate` runs them one
iteration per `dvc repro` and prunes after each; the checks are what DVC says afterwards.
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

from tcrlsd.loop.retention import (STATE_SUFFIX, CheckpointParams, ignore_line, is_kept, plan_ignores, prune)
from tcrlsd.params import ParamsError
from tcrlsd.policy import WEIGHTS_DIGEST

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# One update: weights that differ per iteration, the digest of them, a config; the state beside.
UPDATE = ("mkdir -p ${item.next_policy} ${item.next_policy}-state m/${key} && "
          "{ cat ${item.policy}/model.safetensors; echo ${key}; } > ${item.next_policy}/model.safetensors && "
          "sha256sum ${item.next_policy}/model.safetensors | cut -c1-64 > ${item.next_policy}/weights.sha256 && "
          "echo '{}' > ${item.next_policy}/config.json && echo ${key} > ${item.next_policy}-state/moments && "
          "echo u > m/${key}/update.json")
DVC_YAML = {
    "vars": ["iterations.yaml"],
    "stages": {
        "warmstart": {"cmd": "mkdir -p models/policy-0000 && echo w0 > models/policy-0000/model.safetensors",
                      "outs": ["models/policy-0000"]},
        "generate": {"foreach": "${iterations}", "do": {
            "cmd": "mkdir -p d/${key} && sha256sum ${item.policy}/model.safetensors > d/${key}/rollouts",
            "deps": ["${item.policy}"], "outs": ["d/${key}/rollouts"]}},
        "update": {"foreach": "${iterations}", "do": {
            "cmd": UPDATE, "deps": ["${item.policy}", "d/${key}/rollouts"],
            "outs": [{"${item.next_policy}": {"persist": True}}, "m/${key}/update.json"]}},
        "evaluate": {"foreach": "${iterations}", "do": {
            "cmd": "cat ${item.next_policy}/model.safetensors > /dev/null && echo e > m/${key}/evaluate.json",
            "deps": ["${item.next_policy}"], "outs": ["m/${key}/evaluate.json"]}},
    },
}


def _run(cmd, cwd):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _repo(tmp_path: Path, keep_every: int, keep_latest: int) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    _run([str(BIN / "dvc"), "init", "--no-scm", "-q"], work)
    shutil.copyfile(ROOT / ".dvc" / "config", work / ".dvc" / "config")  # the project's cache link type
    _run([str(BIN / "dvc"), "config", "core.no_scm", "true"], work)
    (work / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (work / "iterations.yaml").write_text(
        'iterations:\n  "0000": {k: 0, policy: models/policy-0000, next_policy: models/policy-0001}\n')
    (work / "params.yaml").write_text(yaml.safe_dump(
        {"checkpoints": {"keep_every": keep_every, "keep_latest": keep_latest}}))
    return work


@pytest.mark.slow
def test_iterate_prunes_and_dvc_stays_clean(tmp_path):
    work = _repo(tmp_path, keep_every=2, keep_latest=2)
    # checkpoints 1..4: the first `dvc repro` runs the warm start and iterations 0000, 0001
    out = _run([str(BIN / "tcrlsd"), "iterate", "3"], work)
    # Checkpoint j (written by k = j - 1): kept when j % 2 == 0 or among the newest two (3, 4);
    # 1 is deleted after the repro that wrote 3 (newest: 2, 3); 2 stays after 4 as a multiple of 2.
    # policy-0000 is the initial policy: not an update's checkpoint, never touched.
    weights = {j: (work / f"models/policy-{j:04d}/model.safetensors").exists() for j in range(5)}
    assert weights == {0: True, 1: False, 2: True, 3: True, 4: True}, out
    assert "deleted the weights of models/policy-0001" in out
    assert (work / "models/policy-0001" / WEIGHTS_DIGEST).exists()  # what DVC tracks of it is still there
    # only the newest state is kept
    assert sorted(p.name for p in (work / "models").glob(f"*{STATE_SUFFIX}")) == ["policy-0004-state"]
    ignores = (work / ".dvcignore").read_text()
    assert [ln for ln in ignores.splitlines() if ln.startswith("/")] == [
        ignore_line(f"models/policy-{j:04d}") for j in (1, 3)]
    # DVC: nothing changed, nothing to run, and the kept checkpoint's weights are in the cache
    assert json.loads(_run([str(BIN / "dvc"), "status", "--json"], work)) == {}
    assert "Running stage" not in _run([str(BIN / "dvc"), "repro"], work)
    kept = work / "models/policy-0002/model.safetensors"
    assert kept.stat().st_nlink == 2 and kept.stat().st_mode & 0o222 == 0  # hardlinked to the cache, read-only
    assert (work / "models/policy-0003/model.safetensors").stat().st_nlink == 1  # out of DVC: one copy
    # why only ignored weights are deleted: a tracked output that is missing is "deleted" to DVC
    # (and `dvc repro` would run its update again); a kept checkpoint comes back from the cache
    shutil.rmtree(work / "models/policy-0002")
    status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], work))
    assert {"changed outs": {"models/policy-0002": "deleted"}} in status["update@0001"], status
    _run([str(BIN / "dvc"), "checkout"], work)
    assert kept.exists() and json.loads(_run([str(BIN / "dvc"), "status", "--json"], work)) == {}


def test_rule_keep_all_and_tracked_weights(tmp_path):
    # keep_every 0: nothing listed, nothing deleted (every checkpoint stays a normal DVC output)
    shutil.copyfile(ROOT / "iterations.yaml", tmp_path / "iterations.yaml")
    assert plan_ignores(tmp_path, tmp_path / "iterations.yaml", CheckpointParams(0, 2)) == []
    assert not (tmp_path / ".dvcignore").exists()
    assert [is_kept(j, CheckpointParams(10, 2)) for j in (1, 9, 10, 20, 21)] == [False, False, True, True, False]
    # three finished checkpoints; 1 is due for deletion but was written without its .dvcignore line
    (tmp_path / "iterations.yaml").write_text("iterations:\n" + "".join(
        f'  "{k:04d}": {{k: {k}, policy: models/p-{k:04d}, next_policy: models/p-{k + 1:04d}}}\n' for k in range(3)))
    for j in (1, 2, 3):
        (tmp_path / f"models/p-{j:04d}").mkdir(parents=True)
        (tmp_path / f"models/p-{j:04d}/model.safetensors").write_bytes(b"w" * 100)
        (tmp_path / f"models/p-{j:04d}" / WEIGHTS_DIGEST).write_text("d\n")
        (tmp_path / f"models/p-{j:04d}{STATE_SUFFIX}").mkdir()
        (tmp_path / f"models/p-{j:04d}{STATE_SUFFIX}/moments").write_bytes(b"s" * 10)
    keep = CheckpointParams(keep_every=5, keep_latest=2)
    report = prune(tmp_path, tmp_path / "iterations.yaml", keep, dry_run=True)
    assert report.weights_deleted == [] and report.tracked_kept == ["models/p-0001"]
    assert report.states_deleted == ["models/p-0001-state", "models/p-0002-state"] and report.freed_bytes == 20
    assert (tmp_path / "models/p-0001-state").exists()  # a dry run deletes nothing
    (tmp_path / ".dvcignore").write_text(ignore_line("models/p-0001") + "\n")
    report = prune(tmp_path, tmp_path / "iterations.yaml", keep)
    assert report.weights_deleted == ["models/p-0001"] and report.freed_bytes == 100 + 20
    assert not (tmp_path / "models/p-0001/model.safetensors").exists()
    assert not (tmp_path / "models/p-0002-state").exists() and (tmp_path / "models/p-0003-state").exists()
    with pytest.raises(ParamsError, match="keep_latest must be >= 1"):
        CheckpointParams(keep_every=10, keep_latest=0)


def test_pipeline_wiring_matches_the_rule():
    """dvc.yaml: the state beside the checkpoint (STATE_SUFFIX) is not an output; the checkpoint is persist."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["update"]["do"]
    assert f"--state-out ${{item.next_policy}}{STATE_SUFFIX}" in stage["cmd"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert f"${{item.next_policy}}{STATE_SUFFIX}" not in outs
    assert {"${item.next_policy}": {"persist": True}} in stage["outs"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["checkpoints"]
    assert CheckpointParams(**params).keep_every == 0  # the embedded default keeps everything
    gpu = yaml.safe_load((ROOT / "configs" / "gpu" / "llama3b_qwen3_4b_math.yaml").read_text())["checkpoints"]
    assert CheckpointParams(**{**params, **gpu}).keep_every == 10
