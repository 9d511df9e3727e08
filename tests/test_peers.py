"""The trl_grpo peer (tcrlsd/loop/peers.py, tcrlsd/commands/trl_grpo.py): TRL's GRPOTrainer as one more row
of `tcrlsd experiment`, from the same warm start, on the budget and schedule the workspace's params give.

The end-to-end test runs the real command on a tiny project (the pipeline test's small params shrunk
further: a 1-layer policy warm-started for 10 steps, 4 prompts x 4 samples, 24 new tokens): one peer
iteration with the final test-split evaluation, a grpo workspace's baseline from the same cache, and the
command again (nothing retrained).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tcrlsd.commands.trl_grpo import grpo_settings, load_params, trl_schedule
from tcrlsd.loop.iterations import truncate_iterations
from tcrlsd.loop.peers import PEERS, Peer, PeerError, require_peer
from tcrlsd.presets import apply_preset

ROOT = Path(__file__).resolve().parents[1]
COPY = [".dvcignore", "dvc.yaml", "params.yaml", "iterations.yaml", "stages", "configs", "data/raw"]
SMALL = yaml.safe_load((ROOT / "tests" / "data" / "small-pipeline.yaml").read_text())
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24}
TINY = {  # over SMALL, section by section: the cheapest run that still trains, evaluates and walks prompts
    "prepare": {"sources": [
        {"name": "synthetic", "format": "synthetic", "split": split, "path": None, "count": n, "levels": [1, 2],
         "max_operand": 20} for split, n in (("train", 16), ("val", 4), ("test", 4))]},
    "warmstart": {"steps": 10, "warmup_steps": 2, "sft_problems": 200, "tokenizer_problems": 200,
                  "eval_max_new_tokens": 24,
                  "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0}},
    "generate": {"prompts_per_step": 4, "samples_per_prompt": 4, "num_parts": 1, "sampling": SAMPLING},
    "evaluate": {"samples": 1, "max_prompts": 4, "num_parts": 1, "sampling": {**SAMPLING, "temperature": 0.6}},
    "update": {"mini_batch_prompts": 2},
}


def _params(tmp_path: Path, *presets: Path) -> dict:
    """The project's params with the grpo preset (a peer's workspace) and ``presets`` applied."""
    path = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", path)
    for preset in (ROOT / "configs" / "presets" / "grpo.yaml", *presets):
        apply_preset(path, preset)
    return load_params(path)


def test_schedule_follows_params_default_and_one_step(tmp_path):
    # default: 32 prompts per iteration in mini-batches of 8 prompts x 8 samples -> 4 optimizer steps of
    # 64 completions per iteration; 5 iterations -> 20 steps
    params = _params(tmp_path)
    s = trl_schedule(params["generate"], params["update"], 5)
    assert (s.prompts_per_step, s.samples_per_prompt, s.completions_per_step) == (8, 8, 64)
    assert (s.steps_per_generation, s.steps_per_iteration, s.total_steps) == (4, 4, 20)
    kwargs, unmatched = grpo_settings(params, 5)
    assert (kwargs["per_device_train_batch_size"], kwargs["steps_per_generation"], kwargs["max_steps"]) == (64, 4, 20)
    assert kwargs["learning_rate"] == params["update"].lr == 1e-4 and kwargs["lr_scheduler_type"] == "constant"
    assert (kwargs["num_generations"], kwargs["max_completion_length"], kwargs["beta"]) == (8, 96, 0.0)
    assert kwargs["epsilon"] == kwargs["epsilon_high"] == 0.2 and kwargs["shuffle_dataset"] is False
    assert any(u.startswith("sampling:") for u in unmatched)
    # configs/experiments/one-step.yaml: 8 prompts per iteration, one mini-batch of 8 -> one step of 64
    # completions per iteration; 4x the iterations (20) for the same 20 steps
    params = _params(tmp_path, ROOT / "configs" / "experiments" / "one-step.yaml")
    s = trl_schedule(params["generate"], params["update"], 20)
    assert (s.prompts_per_step, s.completions_per_step, s.steps_per_iteration, s.total_steps) == (8, 64, 1, 20)
    kwargs, _ = grpo_settings(params, 20)
    assert (kwargs["per_device_train_batch_size"], kwargs["steps_per_generation"], kwargs["max_steps"]) == (64, 1, 20)
    # two epochs over each generation: twice the steps; a mini-batch that does not divide the iteration is refused
    (tmp_path / "more.yaml").write_text("update:\n  ppo_epochs: 2\n  mini_batch_prompts: 16\n")
    params = _params(tmp_path, ROOT / "configs" / "experiments" / "one-step.yaml", tmp_path / "more.yaml")
    with pytest.raises(PeerError, match=r"prompts_per_step \(8\) is not a multiple of update.mini_batch_prompts \(16\)"):
        trl_schedule(params["generate"], params["update"], 3)
    (tmp_path / "more.yaml").write_text("update:\n  ppo_epochs: 2\n  mini_batch_prompts: 4\n")
    params = _params(tmp_path, tmp_path / "more.yaml")
    assert trl_schedule(params["generate"], params["update"], 3).total_steps == 3 * 8 * 2
    # what TRL cannot reproduce is refused by key, not run differently
    (tmp_path / "sched.yaml").write_text("update:\n  lr_schedule: cosine\n  dual_clip: 3.0\n")
    with pytest.raises(PeerError, match="update.lr_schedule.*update.dual_clip"):
        grpo_settings(_params(tmp_path, tmp_path / "sched.yaml"), 1)


def test_a_missing_peer_package_is_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tcrlsd.cli import app

    monkeypatch.setitem(PEERS, "trl_grpo", Peer("grpo", "x", "no_such_package_here", 'pip install -e ".[bench]"', "x"))
    with pytest.raises(PeerError, match=r'needs the no_such_package_here package, which is not installed: pip install'):
        require_peer("trl_grpo")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["experiment", "--presets", "grpo,trl_grpo", "--iterations", "1", "--out", "exp"])
    assert r.exit_code == 1 and r.stderr.strip().endswith('not installed: pip install -e ".[bench]"'), r.output
    assert len(r.stderr.strip().splitlines()) == 2 and not (tmp_path / "exp").exists()  # params line + error


def test_an_unfinished_peer_run_starts_over_from_the_warm_start(tmp_path):
    # what a killed run leaves (checkpoints, evaluations, rows, a final evaluation, scratch) goes; the warm
    # start, the baseline, the prompts and the pipeline files stay; without its marker a run is not finished
    from tcrlsd.commands.trl_grpo import clean
    from tcrlsd.loop.peers import params_sha256, peer_finished

    ws = tmp_path / "ws"
    keep = ["params.yaml", "models/policy-0000/model.safetensors", "data/prompts.parquet", "dvc.yaml",
            "data/baseline/evaluations/part-00000.parquet", "data/metrics/evaluate-baseline.json", "repro.log"]
    gone = ["models/policy-0001/model.safetensors", "models/policy-0002/config.json", ".peer-step0/policy/x",
            "data/iter-0000/evaluations/part-00000.parquet", "data/metrics/iter-0001/trl.json", ".trl/x",
            "data/summary/iterations.csv", "data/final-test/evaluations/x", "data/metrics/final-test.json"]
    for rel in keep + gone:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("x")
    (ws / "peer.json").write_text(json.dumps({"iterations": 2, "params_sha256": params_sha256(ws)}))
    assert peer_finished(ws, 2) and not peer_finished(ws, 3)  # more iterations: trained again, from the start
    clean(ws, "models/policy-0000")
    assert all((ws / rel).exists() for rel in keep) and not any((ws / rel).exists() for rel in gone)
    assert not peer_finished(ws, 2) and not (ws / "models/policy-0001").exists()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("peer") / "work"
    for rel in COPY:
        src, dst = ROOT / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    truncate_iterations(work / "iterations.yaml", 1)  # this checkout's own `tcrlsd iterate` may have appended more
    shutil.copytree(ROOT / "tcrlsd", work / "tcrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section in set(SMALL) | set(TINY):
        params[section].update({**SMALL.get(section, {}), **TINY.get(section, {})})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def _run(cmd, cwd):
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(cwd),
               PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def test_trl_grpo_row_in_the_experiment_report(project, tmp_path):
    from safetensors.numpy import load_file

    from tcrlsd.artifacts import read_artifact
    from tcrlsd.loop.experiment import prepare_workspace
    from tcrlsd.loop.results import Run

    out = tmp_path / "exp"
    cmd = [_tool("tcrlsd"), "experiment", "--presets", "trl_grpo", "--iterations", "1", "--final-split", "test",
           "--out", str(out)]
    first = _run(cmd, project).stdout
    assert "[1/1] trl_grpo-s0: peer in" in first and "[1/1] trl_grpo-s0: done" in first
    ws = out / "runs" / "trl_grpo-s0"
    peer = json.loads((ws / "peer.json").read_text())
    params = yaml.safe_load((ws / "params.yaml").read_text())
    # TRL ran the budget and schedule params give: 4 prompts per iteration in steps of 2 prompts x 4 samples
    used, upd = peer["trl_used"], params["update"]
    assert used["optimizer_steps"] == used["max_steps"] == peer["schedule"]["total_steps"] == 4 // 2
    assert used["per_device_train_batch_size"] == 2 * 4 and used["num_generations"] == 4
    assert used["learning_rate"] == upd["lr"] and used["learning_rates"] == [upd["lr"]]
    assert used["max_completion_length"] == 24 and used["beta"] == upd["kl_coef"] and used["seed"] == 0
    assert peer["step0_check"]["equals_evaluate_baseline"] is True
    # the prompts TRL trained on are the generate stage's walk for iteration 0 (select_prompts, seed 0)
    from tcrlsd.generate.selection import select_prompts, train_prompt_ids

    prompts = read_artifact(ws / "data" / "prompts.parquet", "prompts")
    trl = json.loads((ws / "data" / "metrics" / "iter-0000" / "trl.json").read_text())
    assert trl["prompt_ids"] == select_prompts(train_prompt_ids(prompts), 4, 0, 0)
    # the rows: baseline and iteration 0, in the report like any run; no critique signals
    with open(out / "results.csv", newline="") as fh:
        rows = {r["iteration"]: r for r in csv.DictReader(fh) if r["preset"] == "trl_grpo"}
    assert set(rows) == {"-1", "0"}
    row = rows["0"]
    assert row["val_greedy"] != "" and row["entropy"] != "" and row["response_length"] != ""
    assert row["critique_coverage"] == row["delta_gap"] == "" and float(row["prompts_drawn"]) == 4
    weights = {n: load_file(str(ws / "models" / n / "model.safetensors")) for n in ("policy-0000", "policy-0001")}
    changed = any((weights["policy-0000"][k] != weights["policy-0001"][k]).any() for k in weights["policy-0000"])
    assert changed, "TRL's two optimizer steps left the weights as they were"
    if (row["val_greedy"], row["val_avg_at_k"]) != (rows["-1"]["val_greedy"], rows["-1"]["val_avg_at_k"]):
        assert changed  # a row that differs from the baseline comes from training
    evaluate = json.loads((ws / "data" / "metrics" / "iter-0000" / "evaluate.json").read_text())
    assert evaluate["policy"] == "models/policy-0001" and float(row["val_greedy"]) == evaluate["greedy_mean_at_1"]
    final = json.loads((ws / "data" / "metrics" / "final-test.json").read_text())
    assert final["split"] == "test" and final["policy"] == "models/policy-0001"
    md = (out / "results.md").read_text()
    assert "| trl_grpo | 1 | 1 |" in md and "## Final table: the test split" in md
    # the same warm start and baseline as a grpo run of the experiment (prepared by the experiment, same cache)
    grpo = prepare_workspace(project, project / "params.yaml", Run("grpo", 0), project / "configs" / "presets",
                             out / "runs" / "grpo-s0", out / "cache", 1)
    log = _run([_tool("dvc"), "repro", "baseline"], grpo).stdout
    assert (grpo / "models/policy-0000/model.safetensors").read_bytes() == \
        (ws / "models/policy-0000/model.safetensors").read_bytes()
    assert "Running stage 'warmstart'" not in log and "Running stage 'baseline'" in log  # warm start: the cache's
    base = [json.loads((w / "data/metrics/evaluate-baseline.json").read_text()) for w in (grpo, ws)]
    assert base[0] == base[1] and base[0]["greedy_mean_at_1"] == float(rows["-1"]["val_greedy"])
    # the same command again: the finished peer run is not trained again
    before = {p: (ws / p).read_bytes() for p in ("peer.json", "models/policy-0001/model.safetensors")}
    again = _run(cmd, project).stdout
    assert "finished before" in again and before == {p: (ws / p).read_bytes() for p in before}
    assert (ws / "repro.log").read_text().count("GRPOTrainer, 2 optimizer steps") == 1
