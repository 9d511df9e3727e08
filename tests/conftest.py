"""Shared fixtures: a tiny random policy checkpoint (no training), built once per test session."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def _fresh_process_threads() -> int:
    """The torch CPU thread count a fresh process (a stage run as a subprocess) starts with."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.fixture(autouse=True)
def _torch_threads_restored(_fresh_process_threads):
    """Give every test the thread count of a fresh process and take back what a test changed.

    Stages called in-process set ``torch.set_num_threads(params.num_threads)`` for the whole
    process; the thread count changes float rounding in the last bit, so a later test comparing an
    in-process run with a subprocess run would see other bytes."""
    torch.set_num_threads(_fresh_process_threads)
    yield
    torch.set_num_threads(_fresh_process_threads)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """Path of a small random-weight Llama checkpoint whose tokenizer knows the synthetic task text.

    Random weights: it produces garbage, which is exactly what generate/score/critique tests need
    (real token ids, real forward passes) without minutes of training.
    """
    from fixtures import tiny_policy as build

    return build(tmp_path_factory.mktemp("policy") / "tiny")


@pytest.fixture(scope="session")
def reliability_iteration(tiny_policy, tmp_path_factory):
    """A finished 16-rollout iteration (prepare .. advantages, reference critic) of tests/harness.py,
    with a copy of the tiny policy in ``policy/``: the kill, bad-input and fault tests start from it."""
    import shutil

    from harness import build_iteration, write_params

    d = tmp_path_factory.mktemp("iteration")
    shutil.copytree(tiny_policy, d / "policy")
    build_iteration(d, d / "policy", write_params(d))
    return d
