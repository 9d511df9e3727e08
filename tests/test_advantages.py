"""Advantages: hand-computed tables, estimator properties, loop vs vectorised, the stage and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fixtures import Row, iteration_tables, write_iteration
from tcrlsd.advantages import (
    ESTIMATORS,
    READS_CONTRAST,
    AdvantagesParams,
    IterationInputs,
    Settings,
    compare_estimators,
    compute_advantages,
    group_advantages,
    lam_schedule,
    outcome_advantages,
    reference_token_advantages,
    settings_for,
    token_advantages,
)
from tcrlsd.artifacts import read_artifact
from tcrlsd.params import ParamsError, from_mapping
from tcrlsd.schemas import SchemaError, schema_for

ADDITIVE = ("rlsd_add", "rlsd_hybrid")
PLAIN = [e for e in ESTIMATORS if e not in READS_CONTRAST]  # the estimators that read Δ_t only
STAGE = Path(__file__).resolve().parents[1] / "stages" / "advantages.py"


# ---------------------------------------------------------------------------------------------
# Synthetic iterations


def random_rows(seed: int, n_groups: int, max_group: int, max_len: int, big_delta: bool = False) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        size = int(rng.integers(1, max_group + 1))
        binary = rng.random() < 0.8
        for _ in range(size):
            n = int(rng.integers(0, max_len + 1))
            student = (-rng.exponential(2.0, n)).astype(np.float32)
            fb = bool(rng.random() < 0.5)
            scale = 1000.0 if big_delta else 1.0
            teacher = (student + rng.normal(0, 1, n) * scale).astype(np.float32) if fb else student
            reward = float(rng.integers(0, 2)) if binary else float(np.float32(rng.random()))
            rows.append(Row(f"p{g:03d}", reward, student.tolist(), teacher.tolist(), fb))
    return rows


def _group_ref(rs: list[float], x: float, norm_by_std: bool) -> float:
    """GRPO A of reward ``x`` in a group with rewards ``rs``, from the definition."""
    mean = sum(rs) / len(rs)
    if len(rs) < 2 or min(rs) == max(rs):
        return 0.0
    if norm_by_std:
        std = math.sqrt(sum((v - mean) ** 2 for v in rs) / (len(rs) - 1))
        return (x - mean) / (std + 1e-6)
    return x - mean


def _rloo_ref(rs: list[float], x: float) -> float:
    """r minus the mean of the other rewards of the group (0 for a group of one or all equal)."""
    if len(rs) < 2 or min(rs) == max(rs):
        return 0.0
    others = list(rs)
    others.remove(x)
    return x - sum(others) / len(others)


def _whiten_ref(xs: list[float], lengths: list[int]) -> list[float]:
    """Each x repeated over its tokens; (x − mean) / sqrt(unbiased var + 1e-8) over all tokens."""
    toks = [x for x, n in zip(xs, lengths) for _ in range(n)]
    if len(toks) < 2:
        return [0.0] * len(xs)
    mean = sum(toks) / len(toks)
    var = sum((t - mean) ** 2 for t in toks) / (len(toks) - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


def reference_outcomes(name: str, rows: list[Row], norm_by_std: bool) -> list[float]:
    """A per row for estimator ``name``, a Python loop over the definitions (docs/ARCHITECTURE.md)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.prompt_id, []).append(float(np.float32(r.reward)))
    xs = [float(np.float32(r.reward)) for r in rows]
    lengths = [len(r.student) for r in rows]
    group_a = [_group_ref(groups[r.prompt_id], x, norm_by_std) for r, x in zip(rows, xs)]
    centred = [0.0 if a == 0.0 else x - sum(groups[r.prompt_id]) / len(groups[r.prompt_id])
               for r, x, a in zip(rows, xs, [_group_ref(groups[r.prompt_id], x, False) for r, x in zip(rows, xs)])]
    return {
        "grpo": group_a, "rlsd": group_a, "rlsd_add": group_a, "rlsd_hybrid": group_a, "rlcsd": group_a,
        "rloo": [_rloo_ref(groups[r.prompt_id], x) for r, x in zip(rows, xs)],
        "reinforce_pp": _whiten_ref(xs, lengths),
        "reinforce_pp_baseline": _whiten_ref(centred, lengths),
    }[name]


def reference_iteration(rows: list[Row], params: AdvantagesParams, iteration: int = 0) -> dict[str, tuple[float, list]]:
    """Per-row Python loop: outcome advantages from the definition, then reference_token_advantages."""
    s = settings_for(params, iteration)
    outcome = reference_outcomes(params.estimator, rows, params.norm_by_std)
    out, idx = {}, {}
    for r, a in zip(rows, outcome):
        i = idx.get(r.prompt_id, 0)
        idx[r.prompt_id] = i + 1
        out[f"{r.prompt_id}#{i}"] = (a, reference_token_advantages(params.estimator, a, r.student, r.teacher, s,
                                                                    r.wrong or ()))
    return out


# ---------------------------------------------------------------------------------------------
# Hand-computed tables


def test_group_advantage_hand_table():
    # group 0: r = [1, 0, 0, 1]: mean 0.5, squared deviations 4 × 0.25 = 1, unbiased var 1/3,
    #   std = 0.5773503, A = ±0.5 / (0.5773503 + 1e-6) = ±0.8660239
    # group 1: r = [1, 0, 0]: mean 1/3, deviations 2/3, −1/3, −1/3; ss = 4/9 + 1/9 + 1/9 = 2/3,
    #   var = (2/3)/2 = 1/3, std 0.5773503 -> A = 1.1547005·(1 − 1.732e-6), −0.5773503·(1 − 1.732e-6)
    # group 2: r = [1] (singleton) -> 0;  group 3: r = [0, 0] (saturated) -> 0
    group = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
    r = np.array([1, 0, 0, 1, 1, 0, 0, 1, 0, 0], dtype=np.float32)
    got = group_advantages(group, r, norm_by_std=True)
    s = 1 / math.sqrt(3) + 1e-6
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, (2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0, 0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[:4], [0.8660239, -0.8660239, -0.8660239, 0.8660239], atol=1e-7)
    # norm_by_std=false: A = r − mean: [.5, −.5, −.5, .5, 2/3, −1/3, −1/3, 0, 0, 0]
    got = group_advantages(group, r, norm_by_std=False)
    np.testing.assert_allclose(got, [0.5, -0.5, -0.5, 0.5, 2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rtol=1e-12)


def test_group_advantage_saturated_non_binary_rewards_are_exactly_zero():
    r = np.full(3, 0.1, dtype=np.float32)  # mean of three 0.1 may round; A must still be exactly 0
    assert group_advantages(np.zeros(3, int), r, True).tolist() == [0.0, 0.0, 0.0]


def test_lam_schedule_hand_values():
    # λ(k) = 0.5 · max(0, 1 − k/50): k=0 -> .5, k=10 -> .4, k=25 -> .25, k=50 -> 0, k=80 -> 0
    assert [lam_schedule(0.5, 50, k) for k in (0, 10, 25, 50, 80)] == pytest.approx([0.5, 0.4, 0.25, 0.0, 0.0])
    p = AdvantagesParams()  # params.yaml's lam0 0.5, lam_decay_steps 12: k=3 -> 0.5 · (1 − 3/12) = .375
    assert settings_for(p, 3).lam == pytest.approx(0.375)
    assert settings_for(p, 10, lam=0.9).lam == 0.9  # --lam sets λ directly


# Δ = [0, 0.1, −0.5, 2.0], λ = 0.5, ε_w = 0.2, α = 0.7, β = 0.3.
# A = +1: w = exp(Δ) = [1, 1.1051709, 0.6065307, 7.3890561] -> clip [0.8, 1.2] -> [1, 1.1051709, 0.8, 1.2]
#         m = 0.5 + 0.5·clip = [1, 1.0525855, 0.9, 1.1]
#         rlsd = A·m; rlsd_add = 0.5·A + 0.5·Δ = [.5, .55, .25, 1.5]
#         hybrid = 0.7·m + 0.3·Δ = [.7, .7368098 + .03, .63 − .15, .77 + .6] = [.7, .7668098, .48, 1.37]
# A = −2: w = exp(−Δ) = [1, 0.9048374, 1.6487213, 0.1353353] -> clip -> [1, 0.9048374, 1.2, 0.8]
#         m = [1, 0.9524187, 1.1, 0.9]; rlsd = −2·m = [−2, −1.9048374, −2.2, −1.8]
#         rlsd_add = −1 + 0.5·Δ = [−1, −.95, −1.25, 0]
#         hybrid = −1.4·m + 0.3·Δ = [−1.4, −1.3333862 + .03, −1.54 − .15, −1.26 + .6] = [−1.4, −1.3033862, −1.69, −.66]
# A = 0:  grpo, rlsd = 0; rlsd_add = 0.5·Δ = [0, .05, −.25, 1]; hybrid = 0.3·Δ = [0, .03, −.15, .6]
# rloo, reinforce_pp, reinforce_pp_baseline: Â_t = A whatever Δ (their difference is in A, below).
OUTCOME_ONLY = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
HAND = {
    1.0: {"rlsd": [1, 1.0525855, 0.9, 1.1], "rlsd_add": [0.5, 0.55, 0.25, 1.5],
          "rlsd_hybrid": [0.7, 0.7668098, 0.48, 1.37], **{k: [1, 1, 1, 1] for k in OUTCOME_ONLY}},
    -2.0: {"rlsd": [-2, -1.9048374, -2.2, -1.8], "rlsd_add": [-1, -0.95, -1.25, 0],
           "rlsd_hybrid": [-1.4, -1.3033862, -1.69, -0.66], **{k: [-2, -2, -2, -2] for k in OUTCOME_ONLY}},
    0.0: {"rlsd": [0, 0, 0, 0], "rlsd_add": [0, 0.05, -0.25, 1.0],
          "rlsd_hybrid": [0, 0.03, -0.15, 0.6], **{k: [0, 0, 0, 0] for k in OUTCOME_ONLY}},
}


# Outcome advantages A on one batch of 10 rollouts in 4 groups:
#   group   rewards        lengths (tokens)
#   g0      [1, 0, 0, 1]   [2, 3, 1, 2]
#   g1      [1, 0, 0]      [1, 1, 2]
#   g2      [1]            [3]          (a group of one)
#   g3      [0, 0]         [1, 1]       (saturated)
# grpo family: test_group_advantage_hand_table (±0.8660239 in g0, ...).
# rloo: A_i = r_i − mean of the others = n/(n−1)·(r_i − mean): g0 mean .5, 4/3·±.5 = ±2/3;
#   g1 mean 1/3: 3/2·(2/3) = 1, 3/2·(−1/3) = −.5; g2, g3: 0.
# reinforce_pp: r whitened over the 17 tokens: 8 tokens have r = 1, 9 have r = 0; mean 8/17;
#   Σ(x−m)² = 8·(9/17)² + 9·(8/17)² = 72/17; unbiased var = (72/17)/16 = 9/34;
#   A(r=1) = (9/17)/sqrt(9/34 + 1e-8) = 1.0289915, A(r=0) = −(8/17)/sqrt(9/34 + 1e-8) = −0.9146591.
# reinforce_pp_baseline: x = r − group mean (0 in g2, g3) = [.5, −.5, −.5, .5, 2/3, −1/3, −1/3, 0, 0, 0];
#   token-weighted Σ w·x = (1 − 1.5 − .5 + 1) + (2/3 − 1/3 − 2/3) = −1/3, mean m = −1/51;
#   Σ w·x² = .25·8 + 4/9 + 1/9 + 2/9 = 25/9; Σ w·(x−m)² = 25/9 − 17·m² = 424/153;
#   unbiased var = (424/153)/16 = 53/306; A = (x + 1/51)/sqrt(53/306 + 1e-8).
_G = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
_R = np.array([1, 0, 0, 1, 1, 0, 0, 1, 0, 0], dtype=np.float32)
_L = np.array([2, 3, 1, 2, 1, 1, 2, 3, 1, 1])
_S = 1 / math.sqrt(3) + 1e-6
_GRPO = [0.5 / _S, -0.5 / _S, -0.5 / _S, 0.5 / _S, (2 / 3) / _S, -(1 / 3) / _S, -(1 / 3) / _S, 0, 0, 0]
_RPP = [x / math.sqrt(9 / 34 + 1e-8) for x in (9 / 17, -8 / 17)]
_X = [0.5, -0.5, -0.5, 0.5, 2 / 3, -1 / 3, -1 / 3, 0, 0, 0]
OUTCOME_HAND = {
    **{k: _GRPO for k in ("grpo", "rlsd", "rlsd_add", "rlsd_hybrid", "rlcsd")},
    "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1, -0.5, -0.5, 0, 0, 0],
    "reinforce_pp": [_RPP[0] if r else _RPP[1] for r in _R],
    "reinforce_pp_baseline": [(x + 1 / 51) / math.sqrt(53 / 306 + 1e-8) for x in _X],
}


def test_every_estimator_has_a_hand_table():
    assert set(OUTCOME_HAND) == set(ESTIMATORS) and all(set(t) == set(PLAIN) for t in HAND.values())
    assert READS_CONTRAST == {"rlcsd"}  # its token table reads e_t, not Δ_t: RLCSD_HAND below


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_outcome_advantages_hand_table(estimator):
    s = Settings(lam=0.5, eps_w=0.2, alpha=0.7, beta=0.3)
    got = outcome_advantages(estimator, _G, _R, _L, s)
    np.testing.assert_allclose(got, OUTCOME_HAND[estimator], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(OUTCOME_HAND["reinforce_pp"][:2], [1.0289915, -0.9146591], atol=1e-7)
    rows = [Row(f"g{g}", float(r), [0.0] * n, [0.0] * n) for g, r, n in zip(_G, _R, _L)]
    np.testing.assert_allclose(reference_outcomes(estimator, rows, True), OUTCOME_HAND[estimator], rtol=1e-12,
                               atol=1e-15)


@pytest.mark.parametrize("estimator", PLAIN)
def test_token_advantages_hand_table(estimator):
    s = Settings(lam=0.5, eps_w=0.2, alpha=0.7, beta=0.3)
    delta = np.array([0.0, 0.1, -0.5, 2.0], dtype=np.float32)
    for a, table in HAND.items():
        got = token_advantages(estimator, np.array([a]), np.array([0, 4]), np.zeros(4, np.float32), delta, s)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, table[estimator], atol=2e-7, err_msg=f"A={a}")
        ref = reference_token_advantages(estimator, a, [0.0] * 4, delta.tolist(), s)
        np.testing.assert_allclose(ref, table[estimator], atol=2e-7)


def test_delta_clip_applies_to_the_additive_term_only():
    # Δ = [3, −3], A = 1, λ = 0.5, c = 1: additive Δ -> [1, −1]; m uses the raw Δ: clip(e^3)=1.2, clip(e^−3)=0.8
    # rlsd_add = 0.5 + 0.5·[1, −1] = [1, 0]; hybrid = 0.7·[1.1, 0.9] + 0.3·[1, −1] = [1.07, 0.33]
    s = Settings(lam=0.5, eps_w=0.2, alpha=0.7, beta=0.3, delta_clip=1.0)
    args = (np.array([1.0]), np.array([0, 2]), np.zeros(2, np.float32), np.array([3.0, -3.0], np.float32), s)
    np.testing.assert_allclose(token_advantages("rlsd_add", *args), [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(token_advantages("rlsd_hybrid", *args), [1.07, 0.33], atol=1e-7)
    np.testing.assert_allclose(token_advantages("rlsd", *args), [1.1, 0.9], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Properties


def _random_flat(seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, size=20)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    adv = rng.normal(0, 1, 20) * (rng.random(20) < 0.8)  # some exact zeros
    student = (-rng.exponential(2, offsets[-1])).astype(np.float32)
    teacher = (student + rng.normal(0, 2, offsets[-1])).astype(np.float32)
    return adv, offsets, student, teacher, rng


@pytest.mark.parametrize("seed", range(5))
def test_estimator_properties(seed):
    adv, offsets, student, teacher, rng = _random_flat(seed)
    lam, eps = float(rng.uniform(0, 1)), float(rng.uniform(0, 0.9))
    alpha, beta = float(rng.uniform(0.1, 2)), float(rng.uniform(0.1, 2))
    s = Settings(lam=lam, eps_w=eps, alpha=alpha, beta=beta)
    ta = lambda name, st: token_advantages(name, adv, offsets, student, teacher, st)  # noqa: E731
    a_tok = np.repeat(adv, np.diff(offsets)).astype(np.float32)
    delta = teacher.astype(np.float64) - student
    # β = 0 (α = 1) gives rlsd; β = 0 in general gives α·rlsd
    np.testing.assert_array_equal(ta("rlsd_hybrid", dataclasses.replace(s, alpha=1.0, beta=0.0)), ta("rlsd", s))
    np.testing.assert_allclose(ta("rlsd_hybrid", dataclasses.replace(s, beta=0.0)), alpha * ta("rlsd", s), rtol=1e-6)
    # α = 0 gives β·Δ, whatever λ; and with λ = 0 too
    for lam_ in (lam, 0.0):
        np.testing.assert_allclose(ta("rlsd_hybrid", dataclasses.replace(s, alpha=0.0, lam=lam_)),
                                   (beta * delta).astype(np.float32), rtol=1e-6, atol=1e-7)
    # λ = 0 gives GRPO for rlsd (exactly), and for rlsd_add
    s0 = dataclasses.replace(s, lam=0.0)
    np.testing.assert_array_equal(ta("rlsd", s0), a_tok)
    np.testing.assert_array_equal(ta("rlsd_add", s0), a_tok)
    np.testing.assert_array_equal(ta("grpo", s), a_tok)
    # rlsd never flips the sign of A (and keeps exact zeros)
    np.testing.assert_array_equal(np.sign(ta("rlsd", s)), np.sign(a_tok))
    # and its magnitude stays within the clip band: |Â| / |A| ∈ [1 − λε, 1 + λε]
    nz = a_tok != 0
    ratio = ta("rlsd", s)[nz] / a_tok[nz]
    assert ratio.min() >= 1 - lam * eps - 1e-6 and ratio.max() <= 1 + lam * eps + 1e-6


def test_saturated_group_only_additive_forms_keep_a_signal():
    group = np.zeros(4, int)
    for rewards in ([1, 1, 1, 1], [0, 0, 0, 0]):
        a = group_advantages(group, np.array(rewards, np.float32), True)
        assert a.tolist() == [0.0] * 4
        offsets = np.array([0, 3, 6, 9, 12])
        delta = np.array([0.3, -0.2, 0.0] * 4, np.float32)
        s = Settings(lam=0.5, eps_w=0.2, alpha=0.7, beta=0.3)
        for name in ESTIMATORS:
            extra = np.zeros((1, 12), np.float32) if name in READS_CONTRAST else None  # e_t = Δ_t here
            got = token_advantages(name, a, offsets, np.zeros(12, np.float32), delta, s, extra)
            if name in ADDITIVE:
                assert (got != 0).sum() == 8, name  # every token with Δ ≠ 0
            else:
                assert not got.any(), name


def test_large_delta_does_not_overflow():
    s = Settings(lam=1.0, eps_w=0.2, alpha=0.7, beta=0.3)
    got = token_advantages("rlsd", np.array([1.0, -1.0]), np.array([0, 1, 2]), np.zeros(2, np.float32),
                           np.array([1000.0, 1000.0], np.float32), s)
    np.testing.assert_allclose(got, [1.2, -0.8], rtol=1e-6)


# rlcsd, τ = 0.5, β_c = 1, λ = 0.5, δ = 0.1, c = 0.4. Correct-hint Q and two wrong hints per token:
#   t0: Q = .5,  wrong .5, .5 -> mean .5, e = 0                       -> r = 0
#   t1: Q = .6,  wrong .2, .4 -> mean .3, e = ln 2; e/τ = ln 4, tanh = 15/17; .5·15/17 = .4411765 -> clip .4
#   t2: Q = .3,  wrong .3, .5 -> mean .4, e = ln .75; e/τ = ln .5625, tanh = (.31640625 − 1)/(.31640625 + 1)
#       = −.5192878                                                    -> r = −.2596439
#   t3: Q = .22, wrong .2, .2 -> e = ln 1.1; e/τ = ln 1.21, tanh = .4641/2.4641 = .1883446; r = .0941723 <= δ -> 0
# A = +1:   A + r = [1, 1.4, .7403561, 1]       (all > 0: kept)
# A = −0.3: A + r = [−.3, .1, −.5596439, −.3]   -> min(·, 0) = [−.3, 0, −.5596439, −.3] (the verifier's sign kept)
# A = 0:    0 everywhere (a saturated group gets no signal from the contrast)
RLCSD_Q = [0.5, 0.6, 0.3, 0.22]
RLCSD_WRONG = [[0.5, 0.2, 0.3, 0.2], [0.5, 0.4, 0.5, 0.2]]
RLCSD_HAND = {1.0: [1.0, 1.4, 0.7403561, 1.0], -0.3: [-0.3, 0.0, -0.5596439, -0.3], 0.0: [0.0] * 4}


def test_rlcsd_hand_table():
    s = Settings(lam=0.5, eps_w=0.2, alpha=0.7, beta=0.3, contrast_temperature=0.5, contrast_weight=1.0,
                 contrast_threshold=0.1, contrast_clip=0.4)
    q = np.log(np.array(RLCSD_Q, np.float32))
    wrong = np.log(np.array(RLCSD_WRONG, np.float32))  # (K' = 2, N = 4)
    student = np.full(4, -3.0, np.float32)  # rlcsd never reads the student
    for a, want in RLCSD_HAND.items():
        got = token_advantages("rlcsd", np.array([a]), np.array([0, 4]), student, q, s, wrong)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"A={a}")
        ref = reference_token_advantages("rlcsd", a, student.tolist(), q.tolist(), s, wrong.tolist())
        np.testing.assert_allclose(ref, want, atol=2e-6)
    with pytest.raises(ValueError, match="wrong-hint"):
        token_advantages("rlcsd", np.array([1.0]), np.array([0, 4]), student, q, s)


def test_contrast_gap_one_context_and_identical_contexts():
    from tcrlsd.advantages import contrast_gap

    q = np.array([-1.0, -2.5, -0.1], np.float32)
    w = np.array([-2.0, -2.0, -0.3], np.float32)
    np.testing.assert_allclose(contrast_gap(q, w[None]), q - w, atol=1e-7)  # K' = 1: log Q − log Q_w
    # a row without feedback scores every context as the student: the gap is exactly 0
    assert not contrast_gap(q, np.stack([q, q, q])).any()


def contrast_rows(seed: int, k: int) -> list[Row]:
    """random_rows plus k wrong-hint contexts per row (= the student where the row has no feedback)."""
    rng = np.random.default_rng(seed + 100)
    out = []
    for r in random_rows(seed, 8, 6, 12):
        st = np.array(r.student, np.float32)
        wrong = [(st + rng.normal(0, 1, len(st))).astype(np.float32).tolist() if r.feedback else r.student
                 for _ in range(k)]
        out.append(dataclasses.replace(r, wrong=wrong))
    return out


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2), (2, 3)])
def test_rlcsd_streamed_equals_per_row_loop(tmp_path, seed, k):
    rows = contrast_rows(seed, k)
    folder = write_iteration(tmp_path / "it", rows, iteration=3, scores_parts=seed % 3)
    rng = random.Random(seed)
    params = AdvantagesParams(estimator="rlcsd", lam0=rng.uniform(0.2, 1), contrast_temperature=rng.uniform(0.05, 1),
                              contrast_weight=rng.uniform(0.5, 2), contrast_threshold=rng.uniform(0, 0.1),
                              contrast_clip=rng.uniform(0.1, 1))
    m = compute_advantages(IterationInputs.find(folder), params, tmp_path / "a.parquet", batch_rows=rng.choice([1, 5, 99]))
    got, want = _read_out(tmp_path / "a.parquet"), reference_iteration(rows, params, 3)
    assert list(got) == list(want)
    for rid, (a, toks) in want.items():
        np.testing.assert_allclose(got[rid][1], toks, rtol=2e-6, atol=2e-6, err_msg=rid)
    for r, (a, toks) in zip(rows, want.values()):
        if not r.feedback:  # every context is the student: Â = A exactly
            assert toks == [a] * len(r.student) or a == 0
    assert m["teacher_contexts"] == 1 + k and m["contrast_gap"] is not None
    # the other estimators read the same scores and ignore the extra contexts
    plain = compute_advantages(IterationInputs.find(folder), dataclasses.replace(params, estimator="rlsd"))
    assert plain["teacher_contexts"] == 1 + k and plain["estimator"] == "rlsd"


def test_rlcsd_needs_contexts_and_checks_them(tmp_path):
    rows = random_rows(3, 4, 4, 6)
    folder = write_iteration(tmp_path / "plain", rows)
    with pytest.raises(SchemaError, match=r"no extra_teacher_logprobs; set critique.wrong_hints >= 1"):
        compute_advantages(IterationInputs.find(folder), AdvantagesParams(estimator="rlcsd"))
    assert "teacher_contexts" not in compute_advantages(IterationInputs.find(folder), AdvantagesParams())  # K = 1 keys
    rows = contrast_rows(4, 2)
    long = next(i for i, r in enumerate(rows) if r.student)
    bad = [dataclasses.replace(r, wrong=r.wrong[:1]) if i == 1 else r for i, r in enumerate(rows)]
    rid = iteration_tables(bad)["scores"].column("rollout_id")[1].as_py()
    folder = write_iteration(tmp_path / "count", rows)
    _write_raw(iteration_tables(bad)["scores"], folder / "scores.parquet")  # (the artifact writer refuses it)
    with pytest.raises(SchemaError, match=rf"rollout_id '{re.escape(rid)}' has 1 extra teacher contexts, expected 2"):
        compute_advantages(IterationInputs.find(folder), AdvantagesParams(estimator="rlcsd"), batch_rows=1)
    t = iteration_tables(rows)["scores"]
    cut = [[w[:-1] if i == long else w for w in r.wrong] for i, r in enumerate(rows)]
    folder = write_iteration(tmp_path / "len", rows)
    _write_raw(t.set_column(4, "extra_teacher_logprobs", pa.array(cut, pa.list_(pa.list_(pa.float32())))),
               folder / "scores.parquet")
    with pytest.raises(SchemaError, match=rf"rollout_id '{re.escape(t.column('rollout_id')[long].as_py())}': an "
                                          r"extra_teacher_logprobs entry has \d+ values but the response has"):
        compute_advantages(IterationInputs.find(folder), AdvantagesParams(estimator="rlcsd"))


def test_params_checks():
    assert from_mapping(AdvantagesParams, {"estimator": "grpo", "delta_clip": None}, "advantages").estimator == "grpo"
    with pytest.raises(ParamsError, match="valid keys"):
        from_mapping(AdvantagesParams, {"lambda": 0.5}, "advantages")
    with pytest.raises(ParamsError, match="not one of"):
        from_mapping(AdvantagesParams, {"estimator": "ppo"}, "advantages")
    for bad in ({"lam0": 1.5}, {"lam_decay_steps": 0}, {"eps_w": -0.1}, {"delta_clip": -1.0},
                {"contrast_temperature": 0.0}, {"contrast_clip": -1.0}, {"contrast_threshold": -0.1}):
        with pytest.raises(ParamsError):
            from_mapping(AdvantagesParams, bad, "advantages")


# ---------------------------------------------------------------------------------------------
# Streaming pass on Parquet: loop vs vectorised, metrics, determinism


def _read_out(path) -> dict[str, tuple[float, list]]:
    t = read_artifact(path, "advantages")
    assert t.schema == schema_for("advantages")
    return {r["rollout_id"]: (r["group_advantage"], r["advantages"], r["estimator"]) for r in t.to_pylist()}


@pytest.mark.parametrize("seed,n_groups,max_group,max_len,big", [
    (0, 5, 8, 20, False), (1, 30, 4, 3, False), (2, 12, 1, 10, False), (3, 8, 8, 40, True), (4, 50, 6, 15, False),
])
def test_streamed_parquet_equals_per_row_loop(tmp_path, seed, n_groups, max_group, max_len, big):
    rows = random_rows(seed, n_groups, max_group, max_len, big_delta=big)
    rng = random.Random(seed)
    iteration = rng.randrange(0, 60)
    folder = write_iteration(tmp_path / "it", rows, iteration=iteration, scores_parts=seed % 3)
    inputs = IterationInputs.find(folder)
    for name in PLAIN:
        params = AdvantagesParams(estimator=name, alpha=rng.uniform(0, 1), beta=rng.uniform(0, 1),
                                  lam0=rng.uniform(0, 1), eps_w=rng.uniform(0, 0.5),
                                  norm_by_std=rng.random() < 0.7, delta_clip=rng.choice([None, 0.5, 3.0]))
        out = tmp_path / f"{name}.parquet"
        compute_advantages(inputs, params, out, batch_rows=rng.choice([1, 3, 7, 1024]))
        got = _read_out(out)
        want = reference_iteration(rows, params, iteration)
        assert list(got) == list(want)  # scores' row order
        for rid, (a, toks) in want.items():
            ga, gt, est = got[rid]
            assert est == name
            assert ga == pytest.approx(a, rel=1e-6, abs=1e-7), rid
            np.testing.assert_allclose(gt, toks, rtol=2e-6, atol=2e-6, err_msg=rid)


def test_scores_in_another_order_and_streaming_equals_whole(tmp_path):
    rows = random_rows(7, 20, 6, 12)
    folder = write_iteration(tmp_path / "it", rows)
    scores = read_artifact(folder / "scores.parquet", "scores")
    perm = np.random.default_rng(0).permutation(scores.num_rows)
    # several row groups of 4 rows, read in batches of 5 or whole
    pq.write_table(scores.take(pa.array(perm)), folder / "scores.parquet", row_group_size=4)
    assert pq.ParquetFile(folder / "scores.parquet").num_row_groups > 5
    inputs = IterationInputs.find(folder)
    p = AdvantagesParams(estimator="rlsd_hybrid")
    m_stream = compute_advantages(inputs, p, tmp_path / "a.parquet", batch_rows=5)
    m_whole = compute_advantages(inputs, p, tmp_path / "b.parquet", batch_rows=1 << 20)
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b)
    assert a.column("rollout_id").to_pylist() == scores.take(pa.array(perm)).column("rollout_id").to_pylist()
    assert m_stream.keys() == m_whole.keys()
    for k, v in m_stream.items():
        assert v == (pytest.approx(m_whole[k], rel=1e-12) if isinstance(v, float) else m_whole[k]), k


def _hand_rows() -> list[Row]:
    # p0: rewards [1, 0] (A = ±0.5/(√0.5 + 1e-6) = ±0.7071058); p1: [0, 0] all wrong; p2: [1, 1] all correct.
    # lengths 2, 3 | 0, 2 | 1, 1 = 9 tokens; feedback on p0#1 (Δ = .5, 0, −.5), p1#0 (no tokens), p1#1 (Δ = 1, 1)
    return [
        Row("p0", 1.0, [-1.0, -2.0], [-1.0, -2.0]),
        Row("p0", 0.0, [-1.0, -1.0, -1.0], [-0.5, -1.0, -1.5], feedback=True),
        Row("p1", 0.0, [], [], feedback=True),
        Row("p1", 0.0, [-2.0, -3.0], [-1.0, -2.0], feedback=True),
        Row("p2", 1.0, [-0.5], [-0.5]),
        Row("p2", 1.0, [-0.25], [-0.25]),
    ]


def test_metrics_hand_table(tmp_path):
    folder = write_iteration(tmp_path / "it", _hand_rows())
    shared, per = compare_estimators(IterationInputs.find(folder), AdvantagesParams())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    # reward mean 3/6; saturated groups p1, p2 of 3; coverage (critiques) p0#1, p1#0, p1#1 = 3/6;
    # teacher differs on p0#1, p1#1 = 2/6; Δ-gap over the 5 feedback tokens (.5 + 0 − .5 + 1 + 1)/5 = .4;
    # λ = 0.5 at iteration 0; saturated tokens: p1 (0 + 2) + p2 (1 + 1) = 4
    assert shared["reward_mean"] == 0.5
    assert shared["saturated_group_share"] == pytest.approx(2 / 3)
    assert shared["saturated_all_correct_share"] == pytest.approx(1 / 3)
    assert shared["saturated_all_wrong_share"] == pytest.approx(1 / 3)
    assert shared["critique_coverage"] == 0.5
    assert shared["teacher_differs_share"] == pytest.approx(1 / 3)
    assert shared["delta_gap"] == pytest.approx(0.4)
    assert shared["lam"] == 0.5 and shared["tokens"] == 9 and shared["groups"] == 3
    # grpo/rlsd: only p0's 5 tokens are non-zero, none in saturated groups; |Â| of grpo = 5a/9
    # rlsd_add/hybrid: also p1#1's 2 tokens (λΔ resp. βΔ) -> 7/9, saturated 2/4
    for name, share, sat in (("grpo", 5 / 9, 0.0), ("rlsd", 5 / 9, 0.0), ("rlsd_add", 7 / 9, 0.5),
                             ("rlsd_hybrid", 7 / 9, 0.5)):
        assert per[name]["adv_nonzero_token_share"] == pytest.approx(share), name
        assert per[name]["saturated_adv_nonzero_token_share"] == pytest.approx(sat), name
    assert per["grpo"]["adv_abs_mean"] == pytest.approx(5 * a / 9, rel=1e-6)
    # rlsd_add |Â|: p0#0: 2 × .5a; p0#1: |−.5a + .25|, .5a, .5a + .25; p1#1: 2 × .5  -> sum / 9
    want = (2 * 0.5 * a + abs(-0.5 * a + 0.25) + 0.5 * a + 0.5 * a + 0.25 + 1.0) / 9
    assert per["rlsd_add"]["adv_abs_mean"] == pytest.approx(want, rel=1e-6)
    # rloo: p0 = [1, 0] -> A = ±1 (2/1·±.5); p1, p2 saturated -> 0: p0's 5 tokens, |Â| 5/9
    assert per["rloo"]["adv_nonzero_token_share"] == pytest.approx(5 / 9)
    assert per["rloo"]["adv_abs_mean"] == pytest.approx(5 / 9)
    # reinforce_pp has no group baseline: saturated groups keep A ≠ 0 (all 4 of their tokens)
    assert per["reinforce_pp"]["saturated_adv_nonzero_token_share"] == 1.0
    # without critiques coverage and Δ-gap are unknown: no other "feedback" rule stands in (tcrlsd.signals)
    (folder / "critiques.parquet").unlink()
    shared, _ = compare_estimators(IterationInputs.find(folder), AdvantagesParams())
    assert shared["critique_coverage"] is None and shared["delta_gap"] is None
    assert shared["teacher_differs_share"] == pytest.approx(1 / 3)


def test_coverage_and_delta_gap_are_one_definition_across_stages(reliability_iteration):
    """critique, score and advantages report the same coverage and Δ-gap on one iteration."""
    m = {s: json.loads((reliability_iteration / "metrics" / f"{s}.json").read_text())
         for s in ("critique", "score", "advantages")}
    assert m["critique"]["coverage"] == m["score"]["critique_coverage"] == m["advantages"]["critique_coverage"]
    assert m["score"]["delta_gap"] is not None and m["score"]["delta_gap"] != 0
    assert m["advantages"]["delta_gap"] == pytest.approx(m["score"]["delta_gap"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The stage through its CLI


def _stage_argv(folder, out, metrics, params_path, critiques=True) -> list[str]:
    argv = ["--params", str(params_path), "--rollouts", str(folder / "rollouts"),
            "--verdicts", str(folder / "verdicts.parquet"), "--scores", str(folder / "scores"),
            "--out", str(out), "--metrics", str(metrics)]
    if critiques:
        argv += ["--critiques", str(folder / "critiques.parquet")]
    return argv


def _stage(*args, **kw) -> int:
    """Run the stage's main(argv) in this process (its argparse CLI, without a new interpreter)."""
    spec = importlib.util.spec_from_file_location("stage_advantages", STAGE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(_stage_argv(*args, **kw))


@pytest.fixture
def params_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("advantages:\n  estimator: rlsd_add\n  alpha: 0.7\n  beta: 0.3\n  lam0: 0.5\n"
                 "  lam_decay_steps: 50\n  eps_w: 0.2\n  norm_by_std: true\n  delta_clip: null\n")
    return p


def test_stage_cli_writes_schema_and_metrics_byte_identically(tmp_path, params_file):
    rows = random_rows(11, 10, 8, 25)
    folder = write_iteration(tmp_path / "it", rows, iteration=10, scores_parts=3)
    outs = []
    for i in range(2):
        out, met = tmp_path / f"run{i}" / "advantages.parquet", tmp_path / f"run{i}" / "metrics" / "advantages.json"
        cmd = [sys.executable, str(STAGE), *_stage_argv(folder, out, met, params_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append((out.read_bytes(), met.read_bytes()))
    assert outs[0] == outs[1]
    t = read_artifact(tmp_path / "run0" / "advantages.parquet", "advantages")
    assert t.schema == schema_for("advantages")
    rollouts = read_artifact(folder / "rollouts.parquet", "rollouts")
    assert t.column("rollout_id").to_pylist() == rollouts.column("rollout_id").to_pylist()
    assert [len(x) for x in t.column("advantages").to_pylist()] == \
        [len(x) for x in rollouts.column("response_token_ids").to_pylist()]
    assert set(t.column("estimator").to_pylist()) == {"rlsd_add"}
    m = json.loads((tmp_path / "run0" / "metrics" / "advantages.json").read_text())
    assert m["lam"] == pytest.approx(0.4) and m["iteration"] == 10 and m["estimator"] == "rlsd_add"
    assert set(m["settings"]) == {"alpha", "beta", "lam0", "lam_decay_steps", "eps_w", "norm_by_std", "delta_clip",
                                  "contrast_temperature", "contrast_weight", "contrast_threshold", "contrast_clip"}
    assert [q.name for q in (tmp_path / "run0").iterdir()] != [] and not list((tmp_path / "run0").glob(".*.tmp"))


def _write_raw(table, path):
    pq.write_table(table, path)  # bypasses validation, to plant bad inputs


@pytest.mark.parametrize("case,match", [
    ("missing_column", r"scores\.parquet: scores is missing column\(s\) teacher_logprobs"),
    ("length_mismatch", r"rollout_id 'p0#0': len\(student_logprobs\) = 2 but len\(response_token_ids\) = 3"),
    ("nan", r"'teacher_logprobs' has NaN or inf for rollout_id 'p0#1' \(token 1\)"),
    ("missing_verdict", r"verdicts has no row for 1 rollout\(s\), e.g. rollout_id 'p0#1'"),
    ("missing_score", r"scores has no row for 1 rollout\(s\), e.g. rollout_id 'p0#1'"),
    ("unknown_score", r"scores has a row for rollout_id 'zzz#0', which is not in the rollouts"),
    ("mixed_iterations", r"rollouts hold several iterations \(0, 1\)"),
    ("duplicate_score", r"scores: rollout_id 'p0#0' appears more than once"),
    ("null_logprobs", r"column 'student_logprobs' is null for rollout_id 'p0#1'"),
])
def test_bad_inputs_give_clear_errors(tmp_path, params_file, capsys, case, match):
    rows = [Row("p0", 1.0, [-1.0, -2.0, -3.0], [-1.0, -1.0, -3.0]), Row("p0", 0.0, [-1.0, -2.0], [-1.0, -2.0])]
    folder = write_iteration(tmp_path / "it", rows)
    t = iteration_tables(rows)
    s = t["scores"]
    f32 = pa.list_(pa.float32())
    if case == "missing_column":
        _write_raw(s.drop_columns(["teacher_logprobs"]), folder / "scores.parquet")
    elif case == "length_mismatch":
        s = s.set_column(1, "student_logprobs", pa.array([[-1.0, -2.0], [-1.0, -2.0]], f32))
        s = s.set_column(2, "teacher_logprobs", pa.array([[-1.0, -2.0], [-1.0, -2.0]], f32))
        _write_raw(s, folder / "scores.parquet")
    elif case == "nan":
        _write_raw(s.set_column(2, "teacher_logprobs", pa.array([[-1.0, -1.0, -3.0], [-1.0, float("nan")]], f32)),
                   folder / "scores.parquet")
    elif case == "null_logprobs":
        _write_raw(s.set_column(1, "student_logprobs", pa.array([[-1.0, -1.0, -3.0], None], f32)),
                   folder / "scores.parquet")
    elif case == "missing_verdict":
        _write_raw(t["verdicts"].slice(0, 1), folder / "verdicts.parquet")
    elif case == "missing_score":
        _write_raw(s.slice(0, 1), folder / "scores.parquet")
    elif case == "unknown_score":
        extra = iteration_tables([Row("zzz", 1.0, [-1.0], [-1.0])])["scores"]
        _write_raw(pa.concat_tables([s, extra]), folder / "scores.parquet")
    elif case == "duplicate_score":
        _write_raw(pa.concat_tables([s, s.slice(0, 1)]), folder / "scores.parquet")
    elif case == "mixed_iterations":
        r = t["rollouts"]
        _write_raw(r.set_column(3, "iteration", pa.array([0, 1], pa.int32())), folder / "rollouts.parquet")
    out = tmp_path / "adv.parquet"
    assert _stage(folder, out, tmp_path / "m.json", params_file) == 2
    err = capsys.readouterr().err
    assert err.startswith("advantages: error:")
    assert re.search(match, err), err
    assert not out.exists() and not list(tmp_path.glob(".adv.parquet.*"))  # nothing half-written


# ---------------------------------------------------------------------------------------------
# recompute and compare through the tcrlsd CLI


def test_recompute_cli(tmp_path, params_file, monkeypatch):
    from tcrlsd.cli import app

    monkeypatch.chdir(tmp_path)  # outside any project: the built-in defaults (= params.yaml's)
    folder = write_iteration(tmp_path / "it", _hand_rows(), iteration=3)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    out = tmp_path / "re" / "adv.parquet"
    runner = CliRunner()
    res = runner.invoke(app, ["recompute", str(folder), "--estimator", "rlsd", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    # λ(3) = 0.5 · (1 − 3/12) = .375 (lam0, lam_decay_steps of params.yaml)
    assert m["estimator"] == "rlsd" and m["lam"] == pytest.approx(0.375) and m["lam_source"] == "schedule"
    assert "recompute: params: none" in res.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before  # touched nothing
    t = read_artifact(out, "advantages")
    assert t.num_rows == 6 and set(t.column("estimator").to_pylist()) == {"rlsd"}
    # --lam sets λ directly; --params supplies the defaults; flags override it
    res = runner.invoke(app, ["recompute", str(folder), "--params", str(params_file), "--lam", "0", "--json"])
    m = json.loads(res.stdout)
    assert m["estimator"] == "rlsd_add" and m["lam"] == 0 and m["lam_source"] == "given"
    assert m["saturated_adv_nonzero_token_share"] == 0.0  # λ = 0: rlsd_add is GRPO
    res = runner.invoke(app, ["recompute", str(folder), "-e", "rlsd_hybrid", "--alpha", "0", "--beta", "1",
                              "--no-norm-by-std", "--eps-w", "0.1", "--json"])
    m = json.loads(res.stdout)
    assert m["settings"]["alpha"] == 0 and m["settings"]["norm_by_std"] is False and m["settings"]["eps_w"] == 0.1
    assert m["adv_nonzero_token_share"] == pytest.approx(4 / 9)  # only Δ ≠ 0 tokens (p0#1: 2, p1#1: 2)
    # the human table
    res = runner.invoke(app, ["recompute", str(folder), "-e", "grpo"])
    assert res.exit_code == 0 and "saturated_group_share" in res.stdout and "0.6667" in res.stdout
    # errors are one line, exit code 2
    # rlcsd: the recompute of an iteration scored with wrong-hint contexts
    ctx = write_iteration(tmp_path / "ctx", contrast_rows(5, 2), iteration=2)
    res = runner.invoke(app, ["recompute", str(ctx), "-e", "rlcsd", "--out", str(tmp_path / "c.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["estimator"] == "rlcsd" and m["teacher_contexts"] == 3 and m["settings"]["contrast_temperature"] == 0.02
    assert read_artifact(tmp_path / "c.parquet", "advantages").column("estimator").unique().to_pylist() == ["rlcsd"]
    res = runner.invoke(app, ["recompute", str(folder), "-e", "rlcsd"])
    assert res.exit_code == 2 and "critique.wrong_hints" in res.stderr
    res = runner.invoke(app, ["recompute", str(folder), "-e", "ppo"])
    assert res.exit_code == 2 and "not one of" in res.stderr
    res = runner.invoke(app, ["recompute", str(tmp_path / "nope"), "-e", "grpo"])
    assert res.exit_code == 2 and "not an iteration folder" in res.stderr
    res = runner.invoke(app, ["recompute", str(folder), "-e", "grpo", "--out", str(folder / "scores.parquet")])
    assert res.exit_code == 2 and "would overwrite the input" in res.stderr


def test_compare_cli(tmp_path):
    from tcrlsd.cli import app

    folder = write_iteration(tmp_path / "it", _hand_rows())
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(folder), "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "metric," + ",".join(PLAIN)  # no wrong-hint contexts here: rlcsd left out
    rows = {line.split(",")[0]: line.split(",")[1:] for line in lines[1:]}
    assert rows["saturated_adv_nonzero_token_share"][:5] == ["0", "0", "0.5", "0.5", "0"]
    assert rows["reward_mean"] == ["0.5"] * len(PLAIN)
    res = runner.invoke(app, ["compare", str(folder), "--format", "markdown", "--lam", "0.2"])
    assert res.exit_code == 0 and res.stdout.startswith("| metric | " + " | ".join(PLAIN) + " |")
    assert "λ=0.2 (given)" in res.stdout
    res = runner.invoke(app, ["compare", str(folder)])
    assert res.exit_code == 0 and "rlsd_hybrid" in res.stdout and "saturated_adv_nonzero_token_share" in res.stdout
    res = runner.invoke(app, ["compare", str(folder), "--json"])
    assert set(json.loads(res.stdout)["estimators"]) == set(PLAIN)
    ctx = write_iteration(tmp_path / "ctx", contrast_rows(6, 2))  # scored with wrong hints: every estimator
    res = runner.invoke(app, ["compare", str(ctx), "--json"])
    assert res.exit_code == 0 and set(json.loads(res.stdout)["estimators"]) == set(ESTIMATORS)
    res = runner.invoke(app, ["compare", str(folder), "--format", "html"])
    assert res.exit_code == 2


def test_duplicate_score_rows_across_batches(tmp_path):
    rows = [Row("p0", 1.0, [-1.0], [-1.0]), Row("p0", 0.0, [-1.0], [-0.5])]
    folder = write_iteration(tmp_path / "it", rows)
    s = iteration_tables(rows)["scores"]
    _write_raw(pa.concat_tables([s, s.slice(1, 1)]), folder / "scores.parquet")
    with pytest.raises(SchemaError, match=r"rollout_id 'p0#1' appears more than once"):
        compute_advantages(IterationInputs.find(folder), AdvantagesParams(), tmp_path / "a.parquet", batch_rows=1)
    assert not (tmp_path / "a.parquet").exists() and not list(tmp_path.glob(".a.parquet.*"))
