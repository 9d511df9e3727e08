"""tcrlsd.offpolicy: truncated importance weights and the sampler/scorer mismatch metrics, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tcrlsd.offpolicy import ROLLOUT_IS, MismatchSums, rollout_is_weights

LN2, LN3 = math.log(2.0), math.log(3.0)
# One sequence whose scorer-minus-sampler log-ratios are l = (0, ln 3, -ln 2): ratios r = (1, 3, 0.5).
SAMPLER = np.array([-1.0, -2.0 - LN3, -0.5 + LN2])
SCORER = np.array([-1.0, -2.0, -0.5])


@pytest.mark.parametrize("mode,cap,expected", [
    ("none", 2.0, [1.0, 1.0, 1.0]),
    # token: min(r_t, C): the 3 is truncated to the cap, 1 and 0.5 pass (never raised to a floor).
    ("token", 2.0, [1.0, 2.0, 0.5]),
    ("token", 4.0, [1.0, 3.0, 0.5]),
    # sequence: min(exp(0 + ln 3 - ln 2), C) = min(1.5, C) on every token.
    ("sequence", 2.0, [1.5, 1.5, 1.5]),
    ("sequence", 1.2, [1.2, 1.2, 1.2]),
])
def test_rollout_is_weights_hand_table(mode, cap, expected):
    w = rollout_is_weights(SCORER, SAMPLER, mode, cap)
    assert w.dtype == np.float32 and w.shape == (3,)
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_rollout_is_weights_clamp_and_errors():
    # A log-ratio of 50 is clamped to 20 before exp: the weight is the cap, never inf / overflow.
    assert rollout_is_weights([0.0], [-50.0], "token", 2.0).tolist() == [2.0]
    assert rollout_is_weights([0.0] * 3, [-30.0] * 3, "sequence", 2.0).tolist() == [2.0] * 3
    # A very unlikely scorer token: weight exp(-20) (clamped), not 0 or a NaN.
    assert rollout_is_weights([-50.0], [0.0], "token", 2.0)[0] == pytest.approx(math.exp(-20), rel=1e-5)
    assert rollout_is_weights([], [], "sequence", 2.0).shape == (0,)  # an empty response: no weights
    with pytest.raises(ValueError, match="unknown rollout_is mode 'tis'; known: none, token, sequence"):
        rollout_is_weights(SCORER, SAMPLER, "tis", 2.0)
    with pytest.raises(ValueError, match="rollout_is_cap must be > 0"):
        rollout_is_weights(SCORER, SAMPLER, "token", 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        rollout_is_weights(SCORER, SAMPLER[:2], "token", 2.0)
    assert set(ROLLOUT_IS) == {"none", "token", "sequence"}


def test_mismatch_metrics_hand_computed_and_independent_of_the_split():
    # Two sequences: l = (0, ln 3) and (-ln 2); ratios 1, 3, 0.5.
    expected = {
        "sequences": 2,
        "tokens": 3,
        "mean_abs_log_ratio": (0 + LN3 + LN2) / 3,
        "kl_k1": (0 - LN3 + LN2) / 3,  # mean of log mu - log pi
        "kl_k3": ((1 - 1 - 0) + (3 - 1 - LN3) + (0.5 - 1 + LN2)) / 3,  # mean of r - 1 - log r
        "max_ratio": 3.0,
        "min_ratio": 0.5,
        "max_abs_seq_log_ratio": LN3,  # |0 + ln 3| vs |-ln 2|
    }
    whole = MismatchSums()
    whole.add(SCORER, SAMPLER, [2, 1])
    split = MismatchSums()
    split.add(SCORER[:2], SAMPLER[:2], [2])
    split.add(SCORER[2:], SAMPLER[2:], [1])
    for sums in (whole, split):
        got = sums.result()
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # Identical numbers (the CPU default's fp32 sampler and scorer): every measure is 0, ratios 1.
    same = MismatchSums()
    same.add(SCORER, SCORER, [3])
    r = same.result()
    assert r["mean_abs_log_ratio"] == r["kl_k3"] == r["kl_k1"] == 0.0 and r["max_ratio"] == r["min_ratio"] == 1.0
    assert MismatchSums().result()["mean_abs_log_ratio"] is None
    with pytest.raises(ValueError, match="lengths sum to 2 but 3 tokens"):
        MismatchSums().add(SCORER, SAMPLER, [2])
