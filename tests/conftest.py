"""Shared fixtures: a tiny random policy checkpoint (no training), built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """Path of a small random-weight Llama checkpoint whose tokenizer knows the synthetic task text.

    Random weights: it produces garbage, which is exactly what generate/score/critique tests need
    (real token ids, real forward passes) without minutes of training.
    """
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer
    from tcrlsd.synthetic import make_problems

    texts = [p.problem + "\n" + p.solution for p in make_problems(500, seed=123)]
    texts += ["Let's think step by step and output the final answer within \\boxed{}.",
              "Feedback: the second step is wrong. Check the subtraction."]
    tok = train_tokenizer(texts, vocab_size=320)
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model = build_tiny_llama(tok, cfg, seed=0)
    return save_policy(model, tok, tmp_path_factory.mktemp("policy") / "tiny")


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
