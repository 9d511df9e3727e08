"""``tcrlsd experiment``: several presets x seeds from the same warm start, side by side.

Each run (preset, seed) is its own workspace ``DIR/runs/<preset>-s<seed>/``: a copy of the project's
pipeline files (dvc.yaml, iterations.yaml, stages/, configs/, the tcrlsd/ sources the stages list
as deps; data/raw hard-linked) with params.yaml = the base params, the preset applied and the seed
keys set, all sharing one DVC cache ``DIR/cache``. Why workspaces and not `dvc exp run`:

- the loop is encoded in iterations.yaml (DVC ``vars``), which `dvc exp run -S` cannot edit, and
  an experiment queue cannot chain iterations (FACTS.md);
- DVC experiments need a git repository and run one at a time in the workspace (or in temporary
  copies of it anyway); plain workspaces need neither and are left on disk, inspectable;
- through the shared cache, DVC's run-cache restores stages whose command, deps and params are
  identical in another workspace instead of running them: prepare and the warm start run once for
  all runs, so every run starts from the same warm start (checked in a scratch repository: DVC
  3.67 run-caches stages with deps and ordinary outputs; stages with `persist` outputs, such as
  the baseline evaluation, run again in each workspace -- deterministically, same seed and weights).

Resumable: a rerun re-enters each workspace, extends iterations.yaml to K items if needed and
calls `dvc repro`, which skips what is done (a killed stage resumes from its finished parts).
Results: ``DIR/results.csv`` (one row per preset, seed, iteration), ``DIR/results.md`` (peak and
final validation accuracy, mean +- std over seeds, like the method note's tables) and PNG curves.

A ``--presets`` entry naming a peer (:data:`tcrlsd.loop.peers.PEERS`, e.g. ``trl_grpo``) is another
trainer: its workspace is prepared like a run of the peer's preset, `dvc repro baseline` there gives
the same warm start and baseline evaluation, and the peer's own command trains in it and writes the
rows the report reads (a finished peer run is skipped on a rerun; an unfinished one starts over).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from tcrlsd.loop.final import final_evaluation, final_lines, thread_env
from tcrlsd.stagehost import host_blockers, stage_host
from tcrlsd.loop.peers import MARKER, PEERS, peer_command, peer_finished, require_peer
from tcrlsd.loop.results import RESULT_COLUMNS, Run, collect_results, summary_table, write_results

__all__ = ["SEED_KEYS", "RESULT_COLUMNS", "Run", "preset_labels", "prepare_workspace", "run_experiment", "collect_results",
           "summary_table", "write_results"]

# params set to the run's seed: what samples and trains differs between seeds; the data, the warm
# start and the evaluation's sampling stay the same, so runs differ only by their training.
SEED_KEYS: tuple[tuple[str, str], ...] = (("generate", "seed"), ("update", "seed"), ("critique", "seed"))
PIPELINE_FILES = ("dvc.yaml", "iterations.yaml", "stages", "configs", "tcrlsd")


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a data folder (falls back to copying across file systems)."""
    def link(s, d):
        if os.path.exists(d):
            if os.path.samefile(s, d):
                return d  # linked by an earlier call (resume)
            os.unlink(d)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
        return d

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def preset_label(entry: str) -> str:
    """A ``--presets`` entry's label: a YAML path's file stem, a preset name as it is."""
    return Path(entry).stem if Path(entry).suffix in (".yaml", ".yml") else entry


def preset_labels(presets: list[str], presets_dir: Path) -> dict[str, Path]:
    """Each ``--presets`` entry by its label: a named preset by its name, a YAML path by its file's stem
    (``configs/experiments/lr/grpo-lr2e-4.yaml`` -> ``grpo-lr2e-4``: the run's folder and report row);
    a peer (a name in PEERS) by its name, with the preset its workspace is prepared with.
    Two entries with one label are an error, not two runs in one folder."""
    from tcrlsd.presets import preset_path

    found: dict[str, Path] = {}
    for entry in presets:
        label = preset_label(entry)
        path = preset_path(PEERS[entry].preset if entry in PEERS else entry, presets_dir)
        if label in found and found[label].resolve() != path.resolve():
            raise ValueError(f"two presets are both called {label!r} ({found[label]} and {path}): rename one")
        found[label] = path
    return found


def prepare_workspace(project: Path, base_params: Path, run: Run, presets_dir: Path, ws: Path, cache: Path,
                      iterations: int, setting: Path | None = None, preset_file: Path | None = None) -> Path:
    """Create (or refresh) the run's workspace; returns it. Existing outputs are kept (resume).

    params.yaml = ``base_params``, then ``setting`` (a params-shaped YAML shared by every run of the
    experiment, e.g. another task mix), then the run's preset (``preset_file``, by default the preset
    named ``run.preset`` in ``presets_dir``), then its seed keys.
    """
    import yaml

    from tcrlsd.code import ensure_ignored
    from tcrlsd.loop.iterations import append_iterations, read_iterations, truncate_iterations
    from tcrlsd.loop.retention import CheckpointParams, plan_ignores
    from tcrlsd.params import load_section
    from tcrlsd.presets import apply_preset, preset_path

    ws.mkdir(parents=True, exist_ok=True)
    fresh = not (ws / "iterations.yaml").exists()
    for rel in PIPELINE_FILES:
        if rel == "iterations.yaml" and (ws / rel).exists():
            continue  # keep the run's own (possibly longer) chain
        _copy(project / rel, ws / rel)
    if (project / "data" / "raw").is_dir():
        _link_tree(project / "data" / "raw", ws / "data" / "raw")
    _copy(base_params, ws / "params.yaml")
    if setting is not None:
        apply_preset(ws / "params.yaml", setting)
    apply_preset(ws / "params.yaml", preset_file or preset_path(run.preset, presets_dir))
    seeds = {}
    for section, key in SEED_KEYS:
        seeds.setdefault(section, {})[key] = run.seed
    seed_file = ws / ".seed-preset.yaml"
    seed_file.write_text(yaml.safe_dump(seeds))
    apply_preset(ws / "params.yaml", seed_file)
    seed_file.unlink()
    if not (ws / ".dvc").is_dir():
        subprocess.run([_dvc(), "init", "--no-scm", "-q"], cwd=ws, check=True)
        subprocess.run([_dvc(), "config", "core.analytics", "false"], cwd=ws, check=True)
    subprocess.run([_dvc(), "config", "--local", "cache.dir", str(cache.resolve())], cwd=ws, check=True)
    ensure_ignored(ws)  # bytecode out of the code stage's folder deps
    if (project / ".dvc" / "config").is_file():  # the project's cache link type (hardlinks: no second copy)
        shutil.copyfile(project / ".dvc" / "config", ws / ".dvc" / "config")
        subprocess.run([_dvc(), "config", "core.no_scm", "true"], cwd=ws, check=True)
    if fresh:  # a run starts at the project's first iteration, whatever the project has run since
        truncate_iterations(ws / "iterations.yaml", 1)
    have = len(read_iterations(ws / "iterations.yaml"))
    if have > iterations:
        raise ValueError(f"{ws}/iterations.yaml already has {have} iterations, more than --iterations {iterations}; "
                         "use another --out or a larger --iterations")
    if have < iterations:
        append_iterations(ws / "iterations.yaml", iterations - have)
    # checkpoint retention: weights the rule deletes later stay out of DVC from the start
    plan_ignores(ws, ws / "iterations.yaml", load_section(ws / "params.yaml", "checkpoints", CheckpointParams))
    return ws


def _add_seconds(path: Path, seconds: float) -> None:
    """Add ``seconds`` to the ``{"seconds": ...}`` counter in ``path`` (written atomically)."""
    from tcrlsd.artifacts import write_json

    spent = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    write_json({"seconds": round(spent + seconds, 1)}, path)


def _logged(ws: Path, cmd: list[str], threads: int = 0, env: dict | None = None) -> int:
    """``cmd`` in ``ws``, output appended to ``ws/repro.log``; its wall time is added to ``ws/wall.json``
    (kept across resumes). ``threads`` > 0 caps torch's CPU threads per process; ``env`` (a stage host's
    environment, made with the same cap) replaces that."""
    start = time.perf_counter()
    with open(ws / "repro.log", "a") as fh:
        code = subprocess.call(cmd, cwd=ws, stdout=fh, stderr=subprocess.STDOUT, env=env or thread_env(threads))
    _add_seconds(ws / "wall.json", time.perf_counter() - start)
    return code


def _repro(ws: Path, target: str | None = None, threads: int = 0, env: dict | None = None) -> int:
    """``dvc repro [target]`` in ``ws`` (:func:`_logged`)."""
    return _logged(ws, [_dvc(), "repro"] + ([target] if target else []), threads, env)


def _peer(ws: Path, name: str, iterations: int, threads: int, tag: str, log, env: dict | None = None) -> int:
    """A peer run in ``ws``: its warm start and baseline evaluation (`dvc repro baseline`: the shared cache's
    warm start), then the peer's command unless the workspace holds a finished run (its marker)."""
    code = _repro(ws, "baseline", threads, env)
    if code != 0:
        return code
    if peer_finished(ws, iterations):
        log(f"{tag}: finished before ({ws / MARKER}); not trained again")
        return 0
    log(f"{tag}: {PEERS[name].about}")
    code = _logged(ws, peer_command(name), threads)
    return code if code >= 0 else 128 - code  # killed by a signal: a failure to report, like a shell's status


def _prune(ws: Path) -> list[str]:
    """The run's checkpoint retention (params checkpoints) once its `dvc repro` is done."""
    from tcrlsd.loop.retention import CheckpointParams, prune
    from tcrlsd.params import load_section

    return prune(ws, ws / "iterations.yaml", load_section(ws / "params.yaml", "checkpoints", CheckpointParams)).lines()


def _report(out: Path, rows: list[dict], presets: list[str], runs: list[Run], command: str, doc: Path | None,
            title: str, intro: str, aims: Sequence, final_split: str | None) -> Path:
    """The results and report, with the final table when the runs are evaluated on ``final_split``."""
    extra = final_lines(out, presets, runs, final_split) if final_split else []
    return write_results(out, rows, presets, runs, command, doc, title, intro, aims, extra)


def run_experiment(project: Path, base_params: Path, presets: list[str], seeds: list[int], iterations: int,
                   out: Path, presets_dir: Path, log=print, jobs: int = 1, command: str = "",
                   doc: Path | None = None, title: str = "Experiment", intro: str = "",
                   setting: Path | None = None, report_only: bool = False,
                   cache: Path | None = None, aims: Sequence = (), final_split: str | None = None,
                   host: bool = True) -> list[dict]:
    """Run (or resume) every preset x seed for ``iterations`` iterations; returns the result rows.

    The first run's prepare and warm start go first, alone (into the shared cache); then ``jobs``
    runs at a time, each stage process capped at ``cpu_count // jobs`` torch threads when jobs > 1
    (results then depend on ``jobs`` through float rounding: keep it in the command you publish).
    ``final_split`` (e.g. "test"): after a run's repro, its last policy is evaluated on that split
    (:mod:`tcrlsd.loop.final`) and the report gets the final table. ``host``: each run's stages go
    through a warm stage host (:mod:`tcrlsd.stagehost`; False: a new interpreter per stage).
    """
    if not report_only:
        for name in presets:
            if name in PEERS:
                require_peer(name)  # its package, before any work
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or out / "cache"
    if report_only:  # the workspaces as they are: nothing copied, nothing run, no preset file read
        presets = list(dict.fromkeys(preset_label(p) for p in presets))
        runs = [Run(p, s) for p in presets for s in seeds]
        rows = collect_results(out, runs)
        _report(out, rows, presets, runs, command, doc, title, intro, aims, final_split)
        return rows
    files = preset_labels(presets, presets_dir)
    presets = list(files)
    runs = [Run(p, s) for p in presets for s in seeds]
    started = time.perf_counter()
    spaces = [prepare_workspace(project, base_params, run, presets_dir, out / "runs" / run.name, cache, iterations,
                                setting, files[run.preset]) for run in runs]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    failures: list[str] = []
    lock = threading.Lock()  # one writer of the results files at a time
    if jobs > 1 and spaces:
        log(f"{runs[0].name}: prepare and warm start first (shared by every run through the DVC cache)")
        if _repro(spaces[0], "warmstart") != 0:
            raise RuntimeError(f"{runs[0].name}: dvc repro warmstart failed; see {spaces[0] / 'repro.log'}. "
                               "Rerun the same command to resume.")

    def one(i: int) -> None:
        tag, peer = f"[{i + 1}/{len(runs)}] {runs[i].name}", runs[i].preset in PEERS
        log(f"{tag}: {'peer' if peer else 'dvc repro'} in {spaces[i]} (log: {spaces[i] / 'repro.log'})")
        # one warm stage host per run, with the run's thread cap (tcrlsd/stagehost.py): same outputs
        with stage_host(thread_env(threads), log_path=spaces[i] / "stage-host.log", cwd=spaces[i],
                        enabled=host and not host_blockers(spaces[i] / "params.yaml")) as env:
            code = (_peer(spaces[i], runs[i].preset, iterations, threads, tag, log, env) if peer
                    else _repro(spaces[i], threads=threads, env=env))
            if code == 0 and final_split and final_evaluation(spaces[i], final_split, threads, env) != 0:
                code = -1
                failures.append(f"{runs[i].name}: the final {final_split} evaluation failed; see "
                                f"{spaces[i] / 'repro.log'}")
        if code > 0:
            what = "the peer run (dvc repro baseline, then its trainer)" if peer else "dvc repro"
            failures.append(f"{runs[i].name}: {what} failed (exit {code}); see {spaces[i] / 'repro.log'}")
        elif code == 0:
            log(f"{tag}: done")
            for line in _prune(spaces[i]):
                log(f"{tag}: {line}")
        with lock:  # results so far, after every run: a long experiment shows its table as it goes
            _report(out, collect_results(out, runs), presets, runs, command, doc, title, intro, aims, final_split)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, range(len(runs))))
    _add_seconds(out / "experiment-wall.json", time.perf_counter() - started)  # every invocation, resumes included
    rows = collect_results(out, runs)
    _report(out, rows, presets, runs, command, doc, title, intro, aims, final_split)
    if failures:
        raise RuntimeError("; ".join(failures) + ". Rerun the same command to resume.")
    return rows
