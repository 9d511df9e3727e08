"""End to end: two training iterations through `dvc repro` of the real dvc.yaml, offline, in a temp copy.

The copy uses the repository's own dvc.yaml, iterations.yaml, stages and params.yaml, with a few
params shrunk so the chain runs in a minute or two on 2 cores (a short warm start, few prompts, a
small evaluation). The first `dvc repro` runs prepare, warmstart, the baseline evaluation and
iteration 0000 (generate ... update, evaluate); `tcrlsd iterate 1` appends iteration 0001 and runs
`dvc repro`, which must run only that iteration's stages and the summary. Checks: every artifact of
both iterations exists and validates and joins on rollout_id; each update changed the weights; the
table and headline metrics have two iterations; a third `dvc repro` has nothing to do; changing
advantages.alpha makes `dvc status` name the advantages stages but not verify/critique/score of the
first iteration (generate only through the params dynamic sampling reads); deleted outputs come back from the cache with `dvc checkout`.

The params that need more than the default wiring run the same way, two iterations each, in copies
of that project with the setting changed: score.teacher lagged (with a k3 KL to the starting
policy, update.kl_coef > 0) and score.teacher ema.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tcrlsd.artifacts import read_artifact
from tcrlsd.loop.iterations import truncate_iterations
from tcrlsd.schemas import check_token_lengths

ROOT = Path(__file__).resolve().parents[1]
COPY = [".dvcignore", "dvc.yaml", "params.yaml", "iterations.yaml", "stages", "configs", "data/raw"]
ITERS = ("0000", "0001")
ITER_STAGES = ("generate", "verify", "critique", "score", "advantages", "update", "evaluate")

SMALL = yaml.safe_load((ROOT / "tests" / "data" / "small-pipeline.yaml").read_text())


def _run(cmd, cwd):
    # the stages import the copy's tcrlsd (the one dvc.yaml's deps name), whatever PYTHONPATH says,
    # and dvc.yaml's `python` is this interpreter
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(cwd), PATH=path)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _digests(work: Path, tops: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``tops`` (hidden resume journals aside: they hold times)."""
    import hashlib

    return {p.relative_to(work).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in tops for p in sorted((work / top).rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(work).parts)}


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    bindir = Path(sys.executable).parent
    if not (bindir / "dvc").exists() and shutil.which("dvc") is None:
        pytest.fail("dvc is not installed; it is a dependency of tcrlsd")
    work = tmp_path_factory.mktemp("pipeline")
    for rel in COPY:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, work / rel)
        else:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    # The first iteration only: `tcrlsd iterate` in this checkout (the README's first command) appends more.
    truncate_iterations(work / "iterations.yaml", 1)
    # dvc.yaml lists library files as deps; they resolve against the copy.
    shutil.copytree(ROOT / "tcrlsd", work / "tcrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section, keys in SMALL.items():
        params[section].update(keys)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    tcrlsd = str(bindir / "tcrlsd") if (bindir / "tcrlsd").exists() else "tcrlsd"
    _run([dvc, "init", "--no-scm", "-q"], work)
    _run([dvc, "config", "core.analytics", "false"], work)
    first = _run([dvc, "repro"], work).stdout
    plain = tmp_path_factory.mktemp("pipeline-plain") / "work"  # for the stage host's check: the project before
    shutil.copytree(work, plain, symlinks=True)                   # iteration 0001, which runs here through the host
    second = _run([tcrlsd, "iterate", "1"], work).stdout
    return {"work": work, "dvc": dvc, "tcrlsd": tcrlsd, "first": first, "second": second, "plain": plain}


@pytest.mark.slow
def test_adding_an_iteration_runs_only_its_stages(repo):
    assert {f"{s}@0000" for s in ITER_STAGES} | {"code", "prepare", "warmstart", "baseline", "summarize"} <= _ran(repo["first"])
    assert _ran(repo["second"]) == {f"{s}@0001" for s in ITER_STAGES} | {"summarize"}, repo["second"]
    items = yaml.safe_load((repo["work"] / "iterations.yaml").read_text())["iterations"]
    assert items["0001"] == {"k": 1, "policy": "models/policy-0001", "next_policy": "models/policy-0002"}


@pytest.mark.slow
def test_the_stage_host_changes_no_output_byte(repo):
    """`tcrlsd iterate 1` ran iteration 0001 through the warm stage host (tcrlsd/stagehost.py, its
    default); the same command with --no-stage-host (a new interpreter per stage) on a copy of the
    project made before it writes the same bytes: every artifact part, the checkpoint."""
    tops = ("data/iter-0001", "models/policy-0002")
    hosted = _digests(repo["work"], tops)
    assert any(k.endswith("model.safetensors") for k in hosted) and any("/scores/" in k for k in hosted)
    plain = repo["plain"]  # the project as it was before `tcrlsd iterate 1`
    assert _ran(_run([repo["tcrlsd"], "iterate", "1", "--no-stage-host"], plain).stdout) == \
        {f"{s}@0001" for s in ITER_STAGES} | {"summarize"}
    assert _digests(plain, tops) == hosted
    assert not (plain / ".dvc" / "tmp" / "stage-host.log").exists()
    assert "stage host: imported" in (repo["work"] / ".dvc" / "tmp" / "stage-host.log").read_text()


@pytest.mark.slow
def test_both_iterations_write_every_artifact_and_the_policy_learns(repo):
    work = repo["work"]
    prompts = read_artifact(work / "data" / "prompts.parquet", "prompts")
    assert sorted(set(prompts.column("split").to_pylist())) == ["train", "val"]
    policies = [work / "models" / f"policy-{i:04d}" for i in range(3)]
    for p in policies:
        assert (p / "model.safetensors").exists(), p
    # each update changed the weights; the second continued from the first one's saved state
    assert _weights(policies[0]) != _weights(policies[1]) != _weights(policies[2])
    assert json.loads((work / "models" / "policy-0002-state" / "trainer_state.json").read_text())["iteration"] == 1
    for key in ITERS:
        it = work / "data" / f"iter-{key}"
        rollouts = read_artifact(it / "rollouts", "rollouts")
        assert rollouts.num_rows == 6 * 4
        assert set(rollouts.column("iteration").to_pylist()) == {int(key)}
        for name, path in [("verdicts", it / "verdicts.parquet"), ("critiques", it / "critiques"),
                           ("scores", it / "scores"), ("advantages", it / "advantages.parquet")]:
            check_token_lengths(rollouts, read_artifact(path, name), name)
        evals = read_artifact(it / "evaluations", "evaluations")
        assert evals.num_rows == 8 * (1 + 2)
        for stage in ITER_STAGES:
            assert json.loads((work / "data" / "metrics" / f"iter-{key}" / f"{stage}.json").read_text())
    assert read_artifact(work / "data" / "baseline" / "evaluations", "evaluations").num_rows == 8 * 3
    # iteration 1 generated with the policy iteration 0's update wrote
    gen1 = json.loads((work / "data" / "metrics" / "iter-0001" / "evaluate.json").read_text())
    assert gen1["policy"] == "models/policy-0002"


@pytest.mark.slow
def test_table_and_headline_have_two_iterations(repo):
    work = repo["work"]
    with open(work / "data" / "summary" / "iterations.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["iteration"] for r in rows] == ["0", "1"]
    for r in rows:
        for col in ("reward_mean", "val_greedy", "val_avg_at_k", "critique_coverage", "delta_gap",
                    "saturated_share", "entropy", "response_length", "pg_clipfrac"):
            assert r[col] != "", (col, r)
    head = json.loads((work / "data" / "summary" / "headline.json").read_text())
    assert head["iterations"] == 2 and head["baseline"]["greedy_mean_at_1"] is not None
    shown = _run([repo["dvc"], "metrics", "show", "--json"], work).stdout
    assert "headline.json" in shown and "update.json" not in shown  # details stay out of dvc metrics
    plots = json.loads(_run([repo["dvc"], "plots", "show", "--json"], work).stdout)["data"]
    assert {"validation accuracy", "reward and critique coverage", "update"} <= set(plots)
    # one value per (row, y column): two iterations x [val_greedy, val_avg_at_k, val_maj_at_k]
    values = plots["validation accuracy"][0]["content"]["data"]["values"]
    assert sorted({v["iteration"] for v in values}) == ["0", "1"] and len(values) == 2 * 3
    md = _run([repo["tcrlsd"], "report", "--out", str(work / "reports")], work)
    assert (work / "reports" / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", md.stdout
    assert "| iteration |" in (work / "reports" / "report.md").read_text()


@pytest.mark.slow
def test_no_op_alpha_rerun_and_checkout(repo):
    work, dvc = repo["work"], repo["dvc"]
    assert _ran(_run([dvc, "repro"], work).stdout) == set()
    # a changed advantages.alpha: advantages of every iteration are stale, not what produced their inputs
    params_text = (work / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["advantages"]["alpha"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(_run([dvc, "status", "--json"], work).stdout)
    finally:
        (work / "params.yaml").write_text(params_text)
    assert {"advantages@0000", "advantages@0001"} <= set(status), status
    assert not {f"{s}@0000" for s in ("verify", "critique", "score")} & set(status), status
    # generate lists the advantages section for dynamic sampling (off here): stale to DVC through that
    # param alone; its resume fingerprint leaves it out, so that run would recompute nothing
    assert status.get("generate@0000", []) in ([], [{"changed deps": {"params.yaml": {"advantages": "modified"}}}])
    assert json.loads(_run([dvc, "status", "--json"], work).stdout) == {}
    # a code change: the code stage's fingerprints name the stages that run the changed module, only them
    module = work / "tcrlsd" / "advantages" / "estimators.py"
    source = module.read_text()
    module.write_text(source + "\n# an edit\n")
    try:
        assert set(json.loads(_run([dvc, "status", "--json"], work).stdout)) == {"code"}
        _run([dvc, "repro", "code"], work)
        stale = set(json.loads(_run([dvc, "status", "--json"], work).stdout))
    finally:
        module.write_text(source)
    _run([dvc, "repro", "code"], work)
    assert {"advantages@0000", "advantages@0001"} <= stale, stale
    assert not {f"{s}@000{i}" for s in ("verify", "critique", "score", "update") for i in (0, 1)} & stale
    assert json.loads(_run([dvc, "status", "--json"], work).stdout) == {}
    # an earlier iteration's outputs come back from the cache
    adv = work / "data" / "iter-0000" / "advantages.parquet"
    before, policy = adv.read_bytes(), _weights(work / "models" / "policy-0001")
    adv.unlink()
    shutil.rmtree(work / "models" / "policy-0001")
    _run([dvc, "checkout"], work)
    assert adv.read_bytes() == before and _weights(work / "models" / "policy-0001") == policy


@pytest.mark.slow
def test_compare_on_the_stored_iteration(repo):
    work = repo["work"]
    out = _run([repo["tcrlsd"], "compare", str(work / "data" / "iter-0000"), "--format", "csv"], work).stdout
    header = out.splitlines()[0]
    for est in ("grpo", "rlsd", "rlsd_add", "rlsd_hybrid"):
        assert est in header


@pytest.mark.slow
def test_experiment_runs_presets_by_seeds_in_parallel_and_resumes(repo, tmp_path):
    """`tcrlsd experiment` end to end on the small params: 2 presets x 2 seeds, 2 runs at a time."""
    work, out = repo["work"], tmp_path / "exp"
    cmd = [repo["tcrlsd"], "experiment", "--presets", "grpo,tc_rlsd_hybrid", "--iterations", "1", "--seeds", "2",
           "--jobs", "2", "--out", str(out), "--doc", str(tmp_path / "docs" / "R.md"), "--title", "Small"]
    _run(cmd, work)
    names = ["grpo-s0", "grpo-s1", "tc_rlsd_hybrid-s0", "tc_rlsd_hybrid-s1"]
    # every run trained from the same warm start (restored from the shared cache), and trained its own way
    starts = {_weights(out / "runs" / n / "models" / "policy-0000") for n in names}
    assert len(starts) == 1
    assert len({_weights(out / "runs" / n / "models" / "policy-0001") for n in names}) == 4
    logs = {n: (out / "runs" / n / "repro.log").read_text() for n in names}
    assert sum("Running stage 'warmstart'" in t for t in logs.values()) == 1
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["preset"], r["seed"], r["iteration"]) for r in rows) == sorted(
        (p, s, i) for p in ("grpo", "tc_rlsd_hybrid") for s in ("0", "1") for i in ("-1", "0"))
    hybrid = [r for r in rows if r["preset"] == "tc_rlsd_hybrid" and r["iteration"] == "0"]
    assert all(float(r["critique_coverage"]) > 0 for r in hybrid)
    assert all(float(r["critique_coverage"]) == 0 for r in rows if r["preset"] == "grpo" and r["iteration"] == "0")
    doc = (tmp_path / "docs" / "R.md").read_text()
    assert doc.startswith("# Small") and "| grpo | 2 | 1 |" in doc and "| tc_rlsd_hybrid | 2 | 1 |" in doc
    assert "tcrlsd experiment --presets grpo,tc_rlsd_hybrid" in doc
    for n in names:
        assert json.loads((out / "runs" / n / "wall.json").read_text())["seconds"] > 0
    # the same command again: nothing left to run
    _run(cmd, work)
    for n in names:
        assert (out / "runs" / n / "repro.log").read_text().count("Running stage") == logs[n].count("Running stage")


# Settings reachable only through more dvc.yaml wiring than the default run uses (issue 21, item 6).
VARIANTS = {
    # lagged teacher refreshed every 2 steps: kept (a copy of policy-0000) after step 1, refreshed after step 2;
    # and the k3 KL to the starting policy (dvc.yaml passes --reference-policy ${initial_policy})
    "lagged_kl": {"score": {"teacher": "lagged"}, "update": {"teacher_refresh_every": 2, "kl_coef": 0.1}},
    "ema": {"score": {"teacher": "ema"}, "update": {"teacher_ema_tau": 0.5}},
}


def _tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(repo, request, tmp_path_factory):
    """The finished two-iteration project, copied (DVC cache included), with the variant's params: `dvc repro`."""
    work = tmp_path_factory.mktemp(f"pipeline-{request.param}") / "work"
    shutil.copytree(repo["work"], work, symlinks=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section, keys in VARIANTS[request.param].items():
        params[section].update(keys)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([repo["dvc"], "repro"], work).stdout
    return {"name": request.param, "work": work, "out": out, "dvc": repo["dvc"]}


@pytest.mark.slow
def test_teacher_modes_and_kl_run_through_dvc_repro(repo, variant):
    work, name = variant["work"], variant["name"]
    mode = VARIANTS[name]["score"]["teacher"]
    assert not (repo["work"] / "models" / "policy-0001" / "teacher").exists()  # the default run keeps none
    ran = _ran(variant["out"])
    # the first iteration's samples, verdicts and critiques stay; what reads the new params runs again (and
    # generate@0001: its policy folder now holds the teacher; with EMA the weights, hence the samples, may be
    # the default run's, and DVC stops the cascade there)
    assert {"score@0000", "update@0000", "generate@0001", "score@0001", "update@0001"} <= ran, variant["out"]
    assert not {"generate@0000", "verify@0000", "critique@0000"} & ran, variant["out"]
    # the teacher: the starting policy for the first iteration, then the one the update kept in the policy folder
    for key, want in (("0000", "models/policy-0000"), ("0001", "models/policy-0001/teacher")):
        scores = read_artifact(work / "data" / f"iter-{key}" / "scores", "scores")
        assert set(scores.column("teacher_checkpoint").to_pylist()) == {want}
        assert json.loads((work / "data" / "metrics" / f"iter-{key}" / "score.json").read_text())["teacher"] == mode
    p0, p1, p2 = (work / "models" / f"policy-{i:04d}" for i in range(3))
    t1, t2 = p1 / "teacher", p2 / "teacher"
    if mode == "lagged":  # step 1 of refresh-every-2: kept; step 2: refreshed
        assert _weights(t1) == _weights(p0) and _weights(t2) == _weights(p2)
    else:  # tau 0.5: t1 = (p0 + p1) / 2, t2 = (t1 + p2) / 2
        a, b, c, e1, e2 = _tensors(p0), _tensors(p1), _tensors(p2), _tensors(t1), _tensors(t2)
        for k in e1:
            np.testing.assert_allclose(e1[k], 0.5 * a[k] + 0.5 * b[k], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(e2[k], 0.5 * e1[k] + 0.5 * c[k], rtol=1e-6, atol=1e-7)
    for key in ITERS:
        update = json.loads((work / "data" / "metrics" / f"iter-{key}" / "update.json").read_text())
        assert update["params"]["kl_coef"] == VARIANTS[name]["update"].get("kl_coef", 0.0)
        # two mini-batches: the second one's policy has moved away from the reference
        assert (update["kl_to_reference"] > 0) == ("kl_coef" in VARIANTS[name]["update"]), update["kl_to_reference"]
    assert json.loads(_run([variant["dvc"], "status", "--json"], work).stdout) == {}
    assert _ran(_run([variant["dvc"], "repro"], work).stdout) == set()
