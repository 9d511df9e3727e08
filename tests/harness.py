"""Shared helpers of the reliability tests: a tiny iteration's inputs, the stage scripts run in this
process or in a forked child that can be SIGKILLed, a watcher that reads every file visible under a
final name while a stage runs, and byte snapshots of outputs.

A forked child (``fork`` start method) runs ``stages/<name>.py``'s ``main`` with torch already
imported, so a kill test costs the stage's work, not a fresh interpreter's imports. The child sets
torch to one thread first (a fork must not use the parent's OpenMP pool).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tcrlsd.schemas import validate

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "generate", "verify", "critique", "score", "advantages")  # an iteration (warm start aside)
# artifact name of each stage's output, and whether it is a folder of parts
OUTPUTS = {"prepare": ("prompts", "prompts.parquet"), "generate": ("rollouts", "rollouts"),
           "verify": ("verdicts", "verdicts.parquet"), "critique": ("critiques", "critiques"),
           "score": ("scores", "scores"), "advantages": ("advantages", "advantages.parquet"),
           "warmstart": ("checkpoint", "warm-policy")}

PARAMS = {
    "prepare": {"sources": [
        {"name": "synthetic", "format": "synthetic", "split": "train", "path": None, "count": 16,
         "levels": [1, 2], "max_operand": 20},
        {"name": "synthetic", "format": "synthetic", "split": "val", "path": None, "count": 4,
         "levels": [1, 2], "max_operand": 20}], "seed": 0},
    "generate": {"prompts_per_step": 8, "samples_per_prompt": 2, "sampling": {"max_new_tokens": 12}, "seed": 3,
                 "num_parts": 4, "engine": {"batch_size": 8, "device": "cpu"}, "num_threads": 1},
    "verify": {"workers": 1, "start_method": "fork", "row_deadline_s": 20.0},
    # skip_truncated false: the random policy's 12-token responses are all cut by the limit, and these
    # tests exercise the critic on every wrong row (journals, kills, server faults)
    "critique": {"mode": "critique", "critic": "reference", "rows_per_part": 4, "skip_truncated": False},
    "score": {"rows_per_part": 4, "max_tokens_per_batch": 256, "logits_chunk_tokens": 64, "device": "cpu",
              "dtype": "float32"},
    "advantages": {"estimator": "rlsd_hybrid"},
    # a few seconds of training: every code path, nothing learnt
    "warmstart": {"sft_problems": 300, "tokenizer_problems": 200, "vocab_size": 300, "steps": 12, "batch_size": 8,
                  "warmup_steps": 4, "num_threads": 1, "eval_max_new_tokens": 16,
                  "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1}},
}


def write_params(folder: Path, **override) -> Path:
    params = json.loads(json.dumps(PARAMS))
    for section, keys in override.items():
        params.setdefault(section, {}).update(keys)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_argv(stage: str, d: Path, src: Path, policy: Path, params: Path, out: Path | None = None) -> list[str]:
    """Arguments of ``stages/<stage>.py``: inputs from the iteration folder ``src``, output in ``d``."""
    out = out or d / OUTPUTS[stage][1]
    metrics = ["--metrics", str(d / "metrics" / f"{stage}.json")]
    p = ["--params", str(params)]
    prompts = ["--prompts", str(src / "prompts.parquet")]
    if stage == "prepare":
        return p + ["--out", str(out)] + metrics
    if stage == "warmstart":
        return p + prompts + ["--out", str(out), "--no-progress"] + metrics
    if stage == "generate":
        return p + prompts + ["--policy", str(policy), "--iteration", "0", "--out", str(out), "--no-progress"] + metrics
    if stage == "verify":
        return p + prompts + ["--rollouts", str(src / "rollouts"), "--out", str(out), "--no-progress"] + metrics
    if stage == "critique":
        return p + prompts + ["--rollouts", str(src / "rollouts"), "--verdicts", str(src / "verdicts.parquet"),
                              "--policy", str(policy), "--out", str(out)] + metrics
    if stage == "score":
        return p + ["--rollouts", str(src / "rollouts"), "--critiques", str(src / "critiques"), "--policy", str(policy),
                    "--out", str(out), "--no-progress"] + metrics
    if stage == "advantages":
        return p + ["--rollouts", str(src / "rollouts"), "--verdicts", str(src / "verdicts.parquet"),
                    "--scores", str(src / "scores"), "--critiques", str(src / "critiques"), "--out", str(out)] + metrics
    raise KeyError(stage)


_MAINS: dict[str, object] = {}


def stage_main(stage: str):
    if stage not in _MAINS:
        spec = importlib.util.spec_from_file_location(f"_stage_{stage}", REPO / "stages" / f"{stage}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MAINS[stage] = mod.main
    return _MAINS[stage]


def run_stage(stage: str, argv: list[str]) -> int:
    """The stage's ``main`` in this process; its exit status."""
    return stage_main(stage)(argv)


def build_iteration(d: Path, policy: Path, params: Path, stages=STAGES) -> Path:
    """Run ``stages`` in order, each reading the previous ones' outputs from ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    for s in stages:
        rc = run_stage(s, stage_argv(s, d, d, policy, params))
        assert rc == 0, f"{s} failed with {rc}"
    return d


# ----------------------------------------------------------------------------- watching and killing


def _child(stage: str, argv: list[str]) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    rc = 1
    try:
        rc = stage_main(stage)(argv)
    finally:
        sys.stdout.flush()
        os._exit(rc if isinstance(rc, int) else 1)


def final_files(out: Path) -> list[Path]:
    """The files a reader may see under final names: a file output, or a folder's parts and manifest."""
    if out.is_dir():
        return sorted(q for q in out.iterdir() if not q.name.startswith("."))
    return [out] if out.is_file() else []


def check_complete_files(out: Path, name: str) -> None:
    """Every visible final-named file is whole: a valid Parquet of ``name`` or a JSON manifest (or,
    for a checkpoint, a folder holding every file of one)."""
    if name == "checkpoint":
        if out.is_dir():
            from safetensors import safe_open

            have = {q.name for q in out.iterdir()}
            missing = {"config.json", "model.safetensors", "tokenizer.json"} - have
            assert not missing, f"partial checkpoint visible under its final name: {out} lacks {missing}"
            with safe_open(str(out / "model.safetensors"), "np") as f:
                assert list(f.keys())
        return
    for q in final_files(out):
        try:
            if q.suffix == ".json":
                json.loads(q.read_text())
            else:
                validate(pq.read_table(q), name, source=str(q))
        except FileNotFoundError:
            continue  # replaced or removed between listing and reading
        except Exception as exc:  # noqa: BLE001 -- any failure here is the defect under test
            raise AssertionError(f"partial file visible under a final name: {q}: {exc}") from None


def start(stage: str, argv: list[str]) -> mp.Process:
    proc = mp.get_context("fork").Process(target=_child, args=(stage, argv))
    proc.start()
    return proc


def run_and_kill(stage: str, argv: list[str], out: Path, after_parts: int, delay_s: float,
                 timeout_s: float = 120.0) -> bool:
    """Run the stage in a child; SIGKILL it ``delay_s`` after ``after_parts`` parts are visible.

    Meanwhile every visible final-named file is read and validated (none may be partial). Returns
    whether the kill happened (False: the child finished first, with status 0).
    """
    name = OUTPUTS[stage][0]
    proc = start(stage, argv)
    fire_at = None
    deadline = time.monotonic() + timeout_s
    try:
        while proc.is_alive():
            check_complete_files(out, name)
            n = len([q for q in final_files(out) if q.name.startswith("part-")]) if out.is_dir() else 0
            now = time.monotonic()
            if fire_at is None and n >= after_parts:
                fire_at = now + delay_s
            if fire_at is not None and now >= fire_at:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(30)
                return True
            if now > deadline:
                raise AssertionError(f"{stage} did not finish or get killed within {timeout_s} s")
            time.sleep(0.003)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
    assert proc.exitcode == 0, f"{stage} exited {proc.exitcode} before the kill"
    check_complete_files(out, name)
    return False


def _limited_child(stage: str, argv: list[str], fsize: int, err_path: str) -> None:
    import resource

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    sys.stderr = open(err_path, "w", buffering=1)  # noqa: SIM115 -- lives until os._exit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    rc = 1
    try:
        rc = stage_main(stage)(argv)
    finally:
        os._exit(rc if isinstance(rc, int) else 1)


def run_with_file_limit(stage: str, argv: list[str], fsize: int, err_path: Path) -> tuple[int, str]:
    """Run the stage in a child whose files may not grow past ``fsize`` bytes (a full disk)."""
    proc = mp.get_context("fork").Process(target=_limited_child, args=(stage, argv, fsize, str(err_path)))
    proc.start()
    proc.join(120)
    return proc.exitcode, err_path.read_text()


def timed_run(stage: str, argv: list[str]) -> float:
    """Seconds a forked child takes to run the stage to completion (status 0)."""
    t = time.monotonic()
    proc = start(stage, argv)
    proc.join(120)
    assert proc.exitcode == 0, f"{stage} exited {proc.exitcode}"
    return time.monotonic() - t


def snapshot(out: Path) -> dict[str, bytes]:
    """Name -> bytes of an output's final files (the folder's parts and manifest, or the file)."""
    return {q.name: q.read_bytes() for q in final_files(out) if q.is_file()}


def identities(out: Path) -> dict[str, tuple[int, int]]:
    """Name -> (inode, mtime_ns) of finished parts: unchanged means not recomputed."""
    return {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in final_files(out) if q.name.startswith("part-")}


def temporaries(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*.tmp"))


def kill_points(stage: str, n: int, max_parts: int, min_delay_s: float, max_delay_s: float) -> list[tuple[int, float]]:
    """``n`` seeded (after_parts, delay) kill points for ``stage``."""
    rng = random.Random(f"kill/{stage}")
    return [(rng.randrange(0, max_parts), rng.uniform(min_delay_s, max_delay_s)) for _ in range(n)]
