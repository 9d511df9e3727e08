"""Shared fixtures: a tiny random policy checkpoint (no training), built once per test session."""

from __future__ import annotations

import pytest


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
