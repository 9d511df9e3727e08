"""Update stage: loss terms by hand, first ratio 1, learning direction, state across iterations,
multi-process equality, the CLI end to end.

The inputs are made with the project's own code on the tiny random policy (``tiny_policy``):
student log-probs by the score stage (its CLI, in process), advantages by the advantages stage
for the end-to-end run, or written by hand where a test needs known signs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from fixtures import critiques_table, rollouts_table, verdicts_table  # noqa: E402
from tcrlsd.artifacts import write_artifact, write_table  # noqa: E402
from tcrlsd.update.params import UpdateError, UpdateParams  # noqa: E402
from tcrlsd.optim import learning_rate  # noqa: E402
from tcrlsd.params import ParamsError, from_mapping  # noqa: E402
from tcrlsd.update.losses import (AGGREGATIONS, POLICY_LOSSES, AggregationCounts, ClipSettings,  # noqa: E402
                                  aggregate, gspo_loss, k3_kl, ppo_clip_loss)

REPO = Path(__file__).resolve().parents[1]
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    """The in-process updates join one process group of one (no launcher); it and the variables it
    set are gone after this module, and torch's thread count is restored."""
    import torch.distributed as dist

    env = {k: os.environ.get(k) for k in _DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- pure loss terms


def _agg_full(values, seq_len, mode, n_seqs, norm=4):
    counts = AggregationCounts(tokens=len(values), sequences=n_seqs, norm_tokens=norm)
    return float(aggregate(torch.tensor(values), torch.tensor(seq_len), mode, counts))


def test_aggregation_modes_hand_computed():
    # Two sequences: s0 has per-token losses [1, 2, 3] (T=3), s1 has [4] (T=1); L (norm) = 4.
    # token-mean:               (1 + 2 + 3 + 4) / 4                       = 2.5
    # seq-mean-token-mean:      ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2 = 3.0
    # seq-mean-token-sum-norm:  ((1 + 2 + 3) / 4 + 4 / 4) / 2 = (1.5 + 1) / 2 = 1.25
    vals, seq_len = [1.0, 2.0, 3.0, 4.0], [3, 3, 3, 1]
    assert _agg_full(vals, seq_len, "token-mean", 2) == pytest.approx(2.5)
    assert _agg_full(vals, seq_len, "seq-mean-token-mean", 2) == pytest.approx(3.0)
    assert _agg_full(vals, seq_len, "seq-mean-token-sum-norm", 2) == pytest.approx(1.25)
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    # Linearity: splitting the tokens into two micro-batches with the whole batch's counts sums back.
    for mode in AGGREGATIONS:
        counts = AggregationCounts(4, 2, 4)
        a = aggregate(torch.tensor(vals[:2]), torch.tensor(seq_len[:2]), mode, counts)
        b = aggregate(torch.tensor(vals[2:]), torch.tensor(seq_len[2:]), mode, counts)
        assert float(a + b) == pytest.approx(_agg_full(vals, seq_len, mode, 2))


def test_ppo_clip_hand_table():
    # c = 0.2. Token: (A, r) -> loss = max(-A r, -A clip(r, 0.8, 1.2)), clipped?
    #   ( 1, 1.0) -> max(-1, -1)       = -1    no
    #   ( 1, 1.5) -> max(-1.5, -1.2)   = -1.2  yes (no gain beyond 1.2)
    #   ( 1, 0.5) -> max(-0.5, -0.8)   = -0.5  no
    #   (-1, 1.5) -> max(1.5, 1.2)     = 1.5   no
    #   (-1, 0.5) -> max(0.5, 0.8)     = 0.8   yes
    #   (-1, 5.0) -> max(5.0, 1.2)     = 5.0; dual clip c=3: min(5, 3) = 3 (clipped)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    r = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 5.0])
    old = torch.zeros(6)
    seq = torch.arange(6)
    loss, clipped = ppo_clip_loss(torch.log(r), old, adv, seq, ClipSettings(0.2, 0.2))
    assert loss.tolist() == pytest.approx([-1.0, -1.2, -0.5, 1.5, 0.8, 5.0], rel=1e-6)
    assert clipped.tolist() == [False, True, False, False, True, False]
    loss, clipped = ppo_clip_loss(torch.log(r), old, adv, seq, ClipSettings(0.2, 0.2, 3.0))
    assert loss.tolist() == pytest.approx([-1.0, -1.2, -0.5, 1.5, 0.8, 3.0], rel=1e-6)
    assert clipped.tolist()[-1] is True
    # ratio clamp: a log-ratio of 100 is treated as 20, no overflow
    loss, _ = ppo_clip_loss(torch.tensor([100.0]), torch.zeros(1), torch.tensor([-1.0]), torch.zeros(1, dtype=torch.long),
                            ClipSettings(0.2, 0.2))
    assert float(loss) == pytest.approx(float(np.exp(20.0)), rel=1e-5)
    # k3: exp(d) - d - 1 with d = ref - logp; zero at equality, positive otherwise
    kl = k3_kl(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]))
    assert kl.tolist() == pytest.approx([0.0, float(np.exp(1.0) - 2.0)], rel=1e-6)


def test_gspo_hand_table():
    # GSPO-token (arXiv 2507.18071): one ratio per sequence s_i = exp(mean_t(logp_t − old_t)), applied to
    # each token as sg[s_i]·π/sg[π] (value s_i, d/dlogp_t = s_i), clipped like PPO (c = 0.2 here).
    #   seq  logp − old      A    s_i                      loss per token                   clipped  d loss/d logp_t
    #   0    [0.1, 0.3]      +1   e^0.2  = 1.2214028       max(−1.2214, −1.2)  = −1.2       yes      0
    #   1    [−0.6]          −1   e^−0.6 = 0.5488116       max(0.5488, 0.8)    = 0.8        yes      0
    #   2    [0.05, −0.05]   +2   e^0    = 1               −2                                no       −2·1 = −2
    #   3    [0.1, −0.02]    +1   e^0.04 = 1.0408108       −1.0408108                        no       −1.0408108
    # PPO on seq 3 would give each token its own ratio (e^0.1 = 1.1051709, e^−0.02 = 0.9801987).
    diff = torch.tensor([0.1, 0.3, -0.6, 0.05, -0.05, 0.1, -0.02], dtype=torch.float64)
    seq = torch.tensor([0, 0, 1, 2, 2, 3, 3])
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    old = torch.full((7,), -1.5, dtype=torch.float64)
    logp = (old + diff).requires_grad_()
    loss, clipped = gspo_loss(logp, old, adv, seq, ClipSettings(0.2, 0.2))
    s3 = float(np.exp(0.04))
    assert loss.tolist() == pytest.approx([-1.2, -1.2, 0.8, -2.0, -2.0, -s3, -s3], rel=1e-12)
    assert clipped.tolist() == [True, True, True, False, False, False, False]
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 0.0, -2.0, -2.0, -s3, -s3], rel=1e-12)
    # the same tokens under PPO: per-token ratios on seq 3
    ppo, _ = ppo_clip_loss(old + diff, old, adv, seq, ClipSettings(0.2, 0.2))
    assert ppo[5:].tolist() == pytest.approx([-float(np.exp(0.1)), -float(np.exp(-0.02))], rel=1e-12)
    # a sequence's ratio is one number: order of its tokens and the other sequences do not matter
    perm = torch.tensor([6, 2, 0, 4, 1, 3, 5])
    loss_p, _ = gspo_loss((old + diff)[perm], old[perm], adv[perm], seq[perm], ClipSettings(0.2, 0.2))
    assert loss_p.tolist() == pytest.approx(loss.detach()[perm].tolist(), rel=1e-12)
    assert set(POLICY_LOSSES) == {"ppo", "gspo"}


def test_policy_loss_param_is_a_registry_choice():
    assert from_mapping(UpdateParams, {"policy_loss": "gspo"}, "update").policy_loss == "gspo"
    with pytest.raises(ParamsError, match=r"update.policy_loss: 'grpo' is not one of ppo, gspo \(the keys of POLICY_LOSSES"):
        from_mapping(UpdateParams, {"policy_loss": "grpo"}, "update")
    with pytest.raises(ParamsError, match="dual_clip applies to policy_loss ppo only"):
        from_mapping(UpdateParams, {"policy_loss": "gspo", "dual_clip": 3.0}, "update")
    with pytest.raises(ParamsError, match="not one of token-mean, seq-mean-token-mean"):
        from_mapping(UpdateParams, {"loss_agg_mode": "sum"}, "update")


def test_lr_schedule_hand_values():
    lr = lambda s, sched: learning_rate(s, 1.0, warmup_steps=2, schedule=sched, total_steps=10, min_ratio=0.1)  # noqa: E731
    assert [lr(s, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    # cosine over steps 2..10: halfway (step 6) = 0.1 + 0.9 * 0.5 = 0.55; the end and after = 0.1
    assert lr(6, "cosine") == pytest.approx(0.55)
    assert lr(10, "cosine") == pytest.approx(0.1)
    assert lr(50, "cosine") == pytest.approx(0.1)
    # constant without warm-up returns lr itself (the default run's update)
    assert learning_rate(7, 1e-4, warmup_steps=0, schedule="constant", total_steps=10, min_ratio=0.1) == 1e-4


# ----------------------------------------------------------------------------- inputs from the project's code


def _load_stage(name):
    spec = importlib.util.spec_from_file_location(f"{name}_stage_for_update_tests", REPO / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_rollouts(tok, n_prompts, samples, seed, iteration):
    """Real prompts, random response ids; `stop` rows end with the EOS id (the fidelity issue's
    contract), `length` rows do not."""
    from tcrlsd.policy import encode_prompt
    from tcrlsd.synthetic import make_problems

    rng = random.Random(seed)
    rows = []
    for pi, p in enumerate(make_problems(n_prompts, seed=seed)):
        for s in range(samples):
            resp = [rng.randrange(3, len(tok)) for _ in range(rng.randint(2, 10))]
            stop = (pi + s) % 3 != 0
            if stop:
                resp.append(tok.eos_token_id)
            rows.append(dict(rollout_id=f"it{iteration}-p{pi}#{s}", prompt_id=f"it{iteration}-p{pi}", sample_idx=s,
                             iteration=iteration, prompt_token_ids=encode_prompt(tok, p.problem),
                             response_token_ids=resp, response_text=tok.decode(resp, skip_special_tokens=True),
                             finish_reason="stop" if stop else "length"))
    return rollouts_table(rows)


def make_iteration(folder, policy, tok, *, n_prompts=4, samples=2, seed=0, iteration=0, advantages=None):
    """rollouts + critiques (no feedback) + scores (score stage CLI) + advantages.

    ``advantages``: None -> verdicts by hand and the advantages stage's CLI (grpo); a callable
    (row index, response length) -> per-token list written by hand.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rollouts = make_rollouts(tok, n_prompts, samples, seed, iteration)
    write_artifact(rollouts, folder / "rollouts.parquet", "rollouts")
    ids = rollouts.column("rollout_id").to_pylist()
    crit = critiques_table([{"rollout_id": i} for i in ids])  # no feedback
    write_artifact(crit, folder / "critiques.parquet", "critiques")
    (folder / "params.yaml").write_text(
        "score: {max_tokens_per_batch: 256, logits_chunk_tokens: 16, rows_per_part: 64, device: cpu, dtype: float32}\n"
        "advantages: {estimator: grpo}\n")
    rc = _load_stage("score").main(["--params", str(folder / "params.yaml"), "--rollouts", str(folder / "rollouts.parquet"),
                                    "--critiques", str(folder / "critiques.parquet"), "--policy", str(policy),
                                    "--out", str(folder / "scores"), "--no-progress"])
    assert rc == 0
    lens = [len(r) for r in rollouts.column("response_token_ids").to_pylist()]
    if advantages is None:
        rewards = [float((i * 7 + seed) % 3 == 0) for i in range(len(ids))]
        verdicts = verdicts_table([{"rollout_id": i, "reward": r} for i, r in zip(ids, rewards)])
        write_artifact(verdicts, folder / "verdicts.parquet", "verdicts")
        rc = _load_stage("advantages").main(["--params", str(folder / "params.yaml"),
                                             "--rollouts", str(folder / "rollouts.parquet"),
                                             "--verdicts", str(folder / "verdicts.parquet"),
                                             "--scores", str(folder / "scores"),
                                             "--out", str(folder / "advantages.parquet")])
        assert rc == 0
    else:
        adv = [advantages(i, n) for i, n in enumerate(lens)]
        table = pa.table({"rollout_id": ids, "group_advantage": pa.array([a[0] if a else 0.0 for a in adv], pa.float32()),
                          "advantages": pa.array(adv, pa.list_(pa.float32())), "estimator": ["hand"] * len(ids)})
        write_table(table, folder / "advantages.parquet", "advantages")
    return {"rollouts": folder / "rollouts.parquet", "scores": folder / "scores",
            "advantages": folder / "advantages.parquet"}


def _sign(i, n):
    return [1.0 if i % 2 == 0 else -1.0] * n


@pytest.fixture(scope="module")
def tok(tiny_policy):
    from tcrlsd.policy import load_tokenizer

    return load_tokenizer(tiny_policy)


@pytest.fixture(scope="module")
def signed(tiny_policy, tok, tmp_path_factory):
    """One iteration with A = +1 on even rows and -1 on odd rows, every token."""
    return make_iteration(tmp_path_factory.mktemp("signed"), tiny_policy, tok, n_prompts=3, samples=2, seed=1,
                          advantages=_sign)


FAST = dict(lr=1e-2, mini_batch_prompts=8, ppo_epochs=1, shuffle=False, max_tokens_per_micro_batch=48,
            logits_chunk_tokens=8, zero_stage=2, device="cpu", dtype="float32", entropy_coef=0.0, num_threads=1)


def _current_logprobs(policy, inputs):
    """Response log-probs under ``policy`` computed independently of the update (plain full logits)."""
    from tcrlsd.policy import load_policy

    model, _ = load_policy(policy, device="cpu", dtype="float32")
    seqs = inputs.read(range(len(inputs)))
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(ids).logits[0].float()
            c = len(s.prompt_ids)
            lp = torch.log_softmax(logits[c - 1 : c - 1 + len(s.response_ids)], -1)
            out.append(lp.gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1).numpy())
    return seqs, out


# ----------------------------------------------------------------------------- one update


@pytest.mark.parametrize("loss", [{"policy_loss": "ppo"},
                                  # GSPO with the paper's clip range (the first step's ratio is 1: no clip)
                                  {"policy_loss": "gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4,
                                   "loss_agg_mode": "seq-mean-token-mean"}])
def test_first_ratio_is_one_and_one_update_moves_logprobs_by_the_sign_of_A(tiny_policy, signed, tmp_path, loss):
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import run_update

    params = UpdateParams(**{**FAST, "lr": 1e-3, **loss})
    m = run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / "p1",
                   tmp_path / "s1", params)
    # The update's own forward reproduces the score stage's stored student_logprobs: ratio 1.
    assert m["first_minibatch_max_abs_log_ratio"] < 1e-5
    assert m["ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # one mini-batch: measured before the step
    assert m["optimizer_steps"] == 1 and m["skipped_steps"] == 0 and m["global_step"] == 1
    assert np.isfinite(m["grad_norm"]) and m["lr"] == pytest.approx(1e-3)
    inputs = UpdateInputs(**signed)
    seqs, after = _current_logprobs(tmp_path / "p1", inputs)
    up = [float(np.mean(a - s.old_logprobs)) for s, a in zip(seqs, after)]
    for i, (s, d) in enumerate(zip(seqs, up)):
        assert (d > 0) == (s.advantages[0] > 0), f"row {i}: A={s.advantages[0]} but mean log-prob change {d}"


def _with_sampler_logprobs(signed, folder, offset_of_row):
    """The signed iteration's rollouts with sampler_logprobs = student_logprobs - offset_of_row(i), so
    that the scorer/sampler log-ratio of every token of row i is offset_of_row(i)."""
    from tcrlsd.artifacts import read_artifact

    rollouts = read_artifact(signed["rollouts"], "rollouts")
    scores = {r["rollout_id"]: r["student_logprobs"]
              for r in read_artifact(signed["scores"], "scores").select(["rollout_id", "student_logprobs"]).to_pylist()}
    sampler = [[x - offset_of_row(i) for x in scores[rid]] for i, rid in enumerate(rollouts.column("rollout_id").to_pylist())]
    out = folder / "rollouts-sampler.parquet"
    write_artifact(rollouts.append_column("sampler_logprobs", pa.array(sampler, pa.list_(pa.float32()))), out, "rollouts")
    return {**signed, "rollouts": out}


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
def test_rollout_is_multiplies_the_first_loss_by_the_hand_computed_weights(tiny_policy, signed, tmp_path, mode):
    """A = +1 (even rows) / -1 (odd rows); log pi - log mu = ln 0.5 on even rows, 5 on odd rows. At the
    first step the ratio is 1, so the token-mean PPO loss is sum_t w_t * (-A_t) / N with
    token: w = 0.5 (even), min(e^5, 2) = 2 (odd); sequence: w = 0.5^T (even), 2 (odd); none: w = 1."""
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import run_update

    paths = _with_sampler_logprobs(signed, tmp_path, lambda i: math.log(0.5) if i % 2 == 0 else 5.0)
    params = UpdateParams(**{**FAST, "lr": 1e-3, "rollout_is": mode, "rollout_is_cap": 2.0})
    m = run_update(paths["rollouts"], paths["scores"], paths["advantages"], tiny_policy, tmp_path / "p",
                   tmp_path / "s", params)
    seqs = UpdateInputs(**paths, sampler_logprobs=True).read(range(len(UpdateInputs(**paths))))
    weight = {"none": lambda i, T: 1.0, "token": lambda i, T: 0.5 if i % 2 == 0 else 2.0,
              "sequence": lambda i, T: 0.5 ** T if i % 2 == 0 else 2.0}[mode]
    n = sum(len(s.response_ids) for s in seqs)
    want = sum(weight(i, len(s.response_ids)) * -s.advantages[0] * len(s.response_ids) for i, s in enumerate(seqs)) / n
    assert m["optimizer_steps"] == 1  # one mini-batch: the loss is the first step's
    assert m["pg_loss"] == pytest.approx(want, rel=1e-4)
    if mode == "none":
        assert m["rollout_is_weight_mean"] == 1.0 and m["rollout_is_capped_share"] == 0.0
    else:  # the odd rows' tokens sit at the cap
        odd = sum(len(s.response_ids) for i, s in enumerate(seqs) if i % 2)
        assert m["rollout_is_capped_share"] == pytest.approx(odd / n)


def test_rollout_is_needs_sampler_logprobs(tiny_policy, signed, tmp_path):
    from tcrlsd.update.stage import run_update

    with pytest.raises(UpdateError, match="lacks column.*sampler_logprobs.*update.rollout_is"):
        run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / "p",
                   tmp_path / "s", UpdateParams(**{**FAST, "rollout_is": "token"}))


def test_mask_truncated_drops_length_rows_from_loss_and_counts(tiny_policy, signed, tmp_path):
    """With mask_truncated the first loss is the token mean of -A over the `stop` rows only (the
    `length` rows count neither in the sum nor in N); without it, over every row."""
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import run_update

    inputs = UpdateInputs(**signed)
    seqs = inputs.read(range(len(inputs)))
    cut = [t for t in inputs.truncated]
    assert 0 < sum(cut) < len(cut)  # make_rollouts: every third row is a `length` row

    def loss_over(rows):
        return sum(-seqs[i].advantages[0] * len(seqs[i].response_ids) for i in rows) / sum(
            len(seqs[i].response_ids) for i in rows)

    for mask, rows in ((False, range(len(seqs))), (True, [i for i in range(len(seqs)) if not cut[i]])):
        m = run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / f"p{mask}",
                       tmp_path / f"s{mask}", UpdateParams(**{**FAST, "lr": 1e-3, "mask_truncated": mask}))
        assert m["pg_loss"] == pytest.approx(loss_over(rows), rel=1e-4)
        assert m["truncated_rollouts_masked"] == (sum(cut) if mask else 0)
        assert m["response_tokens_trained"] == sum(len(seqs[i].response_ids) for i in rows)


def test_stop_token_is_trained(tiny_policy, tok, tmp_path):
    """A = +1 on the stop token of `stop` rows, 0 everywhere else: the stop token's log-prob rises."""
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import run_update

    eos = tok.eos_token_id
    d = make_iteration(tmp_path / "iter", tiny_policy, tok, n_prompts=3, samples=2, seed=1,
                       advantages=lambda i, n: [0.0] * n)
    seqs = UpdateInputs(**d).read(range(6))
    table = pa.table({"rollout_id": [s.rollout_id for s in seqs],
                      "group_advantage": pa.array([0.0] * len(seqs), pa.float32()),
                      "advantages": pa.array([[0.0] * (len(s.response_ids) - 1) + [float(s.response_ids[-1] == eos)]
                                              for s in seqs], pa.list_(pa.float32())),
                      "estimator": ["hand"] * len(seqs)})
    write_table(table, d["advantages"], "advantages")
    m = run_update(d["rollouts"], d["scores"], d["advantages"], tiny_policy, tmp_path / "p1", tmp_path / "s1",
                   UpdateParams(**{**FAST, "lr": 1e-3}))
    assert m["grad_norm"] > 0
    seqs, after = _current_logprobs(tmp_path / "p1", UpdateInputs(**d))
    stops = [(s, a) for s, a in zip(seqs, after) if s.response_ids[-1] == eos]
    assert 0 < len(stops) < len(seqs)
    for s, a in stops:
        assert a[-1] > s.old_logprobs[-1] + 1e-3, f"{s.rollout_id}: stop token log-prob did not rise"


def test_k3_kl_to_a_reference_checkpoint(tiny_policy, signed, tmp_path):
    """kl_coef > 0 needs --reference-policy; against the starting weights the KL is 0 before the first
    step and positive once the policy has moved (two mini-batches: the second is after a step)."""
    from tcrlsd.update.stage import run_update

    params = UpdateParams(**{**FAST, "kl_coef": 0.1, "mini_batch_prompts": 2, "shuffle": False})
    with pytest.raises(UpdateError, match="reference-policy"):
        run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / "p",
                   tmp_path / "s", params)
    one = run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / "p1",
                     tmp_path / "s1", replace(params, mini_batch_prompts=8), reference=tiny_policy)
    assert one["kl_to_reference"] == pytest.approx(0.0, abs=1e-9)
    two = run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / "p2",
                     tmp_path / "s2", params, reference=tiny_policy)
    assert two["optimizer_steps"] == 2 and two["kl_to_reference"] > 1e-6


def test_nonfinite_grad_norm_skips_the_step_and_counts_it(tiny_policy, signed, tmp_path):
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import open_trainer

    trainer, _, _ = open_trainer(tiny_policy, UpdateParams(**FAST), iteration=0)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    inputs = UpdateInputs(**signed)
    real = inputs.read

    def poisoned(rows):
        seqs = real(rows)
        return [replace(seqs[0], advantages=np.full_like(seqs[0].advantages, np.inf))] + seqs[1:]

    inputs.read = poisoned
    m = trainer.train_iteration(inputs)
    assert m["skipped_steps"] == 1 and m["optimizer_steps"] == 0 and m["global_step"] == 0
    # the skipped attempt is step 1 of the run's step series, with no grad norm, and strict JSON
    (step,) = m["per_step"]
    assert step["step"] == 1 and step["skipped"] == 1 and step["grad_norm"] is None
    json.dumps(m["per_step"], allow_nan=False)
    for a, b in zip(before, trainer.engine.module.parameters()):
        assert torch.equal(a, b.detach())


# ----------------------------------------------------------------------------- state across iterations


def _weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def two_iterations(tiny_policy, tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return [make_iteration(root / f"it{k}", tiny_policy, tok, n_prompts=4, samples=2, seed=10 + k, iteration=k,
                           advantages=lambda i, n: [((i % 3) - 1) * 0.5 + 0.1 * t for t in range(n)])
            for k in (0, 1)]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_separate_iterations_equal_one_continuous_run(tiny_policy, two_iterations, tmp_path, zero_stage):
    """Iteration 1 resumes AdamW moments and the LR step: same weights as one process doing both.

    The scores of iteration 1 are the iteration-0 policy's (fixture): both runs read the same data,
    so the only thing that may differ is the carried state.
    """
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import open_trainer, run_update

    params = UpdateParams(**{**FAST, "lr": 3e-3, "mini_batch_prompts": 2, "ppo_epochs": 2, "warmup_steps": 3,
                             "shuffle": True, "zero_stage": zero_stage})
    d0, d1 = two_iterations
    run_update(d0["rollouts"], d0["scores"], d0["advantages"], tiny_policy, tmp_path / "p1", tmp_path / "s1", params)
    m = run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2", tmp_path / "s2",
                   params, state_in=tmp_path / "s1")
    assert m["state"] == "loaded" and m["global_step"] == 8

    trainer, _, _ = open_trainer(tiny_policy, params, iteration=0)
    trainer.train_iteration(UpdateInputs(**d0))
    trainer.train_iteration(UpdateInputs(**d1))
    sep = _weights(tmp_path / "p2")
    cont = {k: v.detach() for k, v in trainer.engine.module.model.state_dict().items()}
    for k, v in sep.items():
        torch.testing.assert_close(v, cont[k], rtol=1e-5, atol=1e-6, msg=k)
    # and it really trained: iteration 1 moved the weights
    assert any(not torch.equal(v, _weights(tmp_path / "p1")[k]) for k, v in sep.items())

    # Deleting the saved state: an error naming it, or an explicit restart; never a silent reset.
    import shutil

    shutil.rmtree(tmp_path / "s1")
    with pytest.raises(UpdateError, match="no saved training state"):
        run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2b",
                   tmp_path / "s2b", params, state_in=tmp_path / "s1")
    m = run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2b",
                   tmp_path / "s2b", replace(params, restart=True), state_in=tmp_path / "s1")
    assert m["state"].startswith("restart") and m["global_step"] == 4
    # a state that belongs to other weights is refused
    with pytest.raises(UpdateError, match="other weights"):
        run_update(d1["rollouts"], d1["scores"], d1["advantages"], tiny_policy, tmp_path / "p2c",
                   tmp_path / "s2c", params, state_in=tmp_path / "s2b")


@pytest.mark.parametrize("mode", ["lagged", "ema"])
def test_teacher_folder_lagged_and_ema(tiny_policy, two_iterations, tmp_path, mode):
    from tcrlsd.update.stage import run_update

    params = UpdateParams(**{**FAST, "teacher_refresh_every": 2, "teacher_ema_tau": 0.25})
    d0 = two_iterations[0]
    m = run_update(d0["rollouts"], d0["scores"], d0["advantages"], tiny_policy, tmp_path / "p1", tmp_path / "s1",
                   params, teacher_mode=mode)
    # the next teacher is kept inside the new policy's folder (where the next score stage reads it)
    t, p0, p1 = _weights(tmp_path / "p1" / "teacher"), _weights(tiny_policy), _weights(tmp_path / "p1")
    for k in t:
        want = p0[k] if mode == "lagged" else 0.75 * p0[k] + 0.25 * p1[k]  # step 1 of refresh-every-2: kept
        torch.testing.assert_close(t[k], want, rtol=1e-6, atol=1e-7)
    assert m["teacher_update"] == ("kept" if mode == "lagged" else "ema")
    assert (tmp_path / "p1" / "teacher" / "tokenizer.json").exists()
    assert not (tmp_path / "s1" / "teacher").exists() and not (tmp_path / "p1" / "teacher" / "teacher").exists()
    # the second update carries it on from p1/teacher: lagged refreshes at step 2 (a copy of p2), ema mixes again
    d1 = two_iterations[1]
    m2 = run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2", tmp_path / "s2",
                    params, state_in=tmp_path / "s1", teacher_mode=mode)
    t2, p2 = _weights(tmp_path / "p2" / "teacher"), _weights(tmp_path / "p2")
    for k in t2:
        want = p2[k] if mode == "lagged" else 0.75 * t[k] + 0.25 * p2[k]
        torch.testing.assert_close(t2[k], want, rtol=1e-6, atol=1e-7)
    assert m2["teacher_update"] == ("refreshed" if mode == "lagged" else "ema")
    assert not (tmp_path / "p2" / "teacher" / "teacher").exists()


# ----------------------------------------------------------------------------- processes


def _run_cli(args, nproc=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(env_extra or {})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(REPO / "stages" / "update.py"), *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _params_file(path, **over):
    body = {**FAST, **over}
    path.write_text("score: {teacher: current}\nupdate:\n" + "".join(
        f"  {k}: {json.dumps(v)}\n" for k, v in body.items()))
    return path


@pytest.mark.slow  # two fresh processes importing torch + DeepSpeed: ~30 s each on 2 busy cores
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_processes_match_one(tiny_policy, two_iterations, tmp_path, zero_stage):
    from tcrlsd.update.stage import run_update

    d0 = two_iterations[0]
    over = dict(zero_stage=zero_stage, mini_batch_prompts=2, lr=3e-3, entropy_coef=1e-3,
                loss_agg_mode="seq-mean-token-mean")
    run_update(d0["rollouts"], d0["scores"], d0["advantages"], tiny_policy, tmp_path / "one", tmp_path / "one-s",
               UpdateParams(**{**FAST, **over}))
    params = _params_file(tmp_path / "params.yaml", **over)
    _run_cli(["--params", str(params), "--rollouts", str(d0["rollouts"]), "--scores", str(d0["scores"]),
              "--advantages", str(d0["advantages"]), "--policy", str(tiny_policy), "--policy-out", str(tmp_path / "two"),
              "--state-out", str(tmp_path / "two-s"), "--metrics", str(tmp_path / "m.json")], nproc=2)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        # Summation order differs (gloo's reduction, other micro-batches), and Adam divides by
        # sqrt(v) + eps, so a weight whose gradient is ~eps can move by a visible fraction of its
        # (at most lr-sized) step: compare at 1% of lr, a ~100x tighter bound than any real difference.
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=0.01 * over["lr"], msg=k)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["world_size"] == 2 and m["optimizer_steps"] == 2


def test_stage_cli_end_to_end(tiny_policy, tok, tmp_path):
    """Inputs from the score and advantages stages' CLIs; the update's CLI (in process, one process,
    no launcher); the output loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    d = make_iteration(tmp_path / "iter", tiny_policy, tok, n_prompts=3, samples=2, seed=3)
    params = _params_file(tmp_path / "params.yaml", zero_stage=1)
    _load_stage("update").main(["--params", str(params), "--rollouts", str(d["rollouts"]), "--scores", str(d["scores"]),
              "--advantages", str(d["advantages"]), "--policy", str(tiny_policy), "--state-in",
              str(tmp_path / "none-state"), "--policy-out", str(tmp_path / "p1"), "--state-out", str(tmp_path / "s1"),
              "--metrics", str(tmp_path / "metrics" / "update.json")])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p1"), use_safetensors=True)
    assert model.config.vocab_size == len(tok)
    assert (tmp_path / "p1" / "tokenizer.json").exists() and (tmp_path / "s1" / "trainer_state.json").exists()
    m = json.loads((tmp_path / "metrics" / "update.json").read_text())
    for key in ("pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm", "lr", "optimizer_steps", "skipped_steps",
                "tokens_per_s"):
        assert key in m
    assert m["optimizer_steps"] == 1 and m["first_minibatch_max_abs_log_ratio"] < 1e-5


# ----------------------------------------------------------------------------- live tracking


def test_step_metrics_go_live_to_dvclive_and_match_the_metrics_json(tiny_policy, two_iterations, tmp_path):
    """Two iterations (separate runs, the second resuming the first's state), two steps each: the
    DVCLive series hold every step of both, x counted over the run (1..4), with the values of the
    metrics JSONs' per_step lists; the per-step numbers add up to the iteration's metrics; running
    iteration 1 again replaces its two rows instead of appending two more."""
    from tcrlsd.tracking import Tracker, TrackingParams, read_series
    from tcrlsd.update.stage import run_update

    live = tmp_path / "live"
    tracking = TrackingParams(dvclive=True, dir=str(live), tensorboard=False)
    params = UpdateParams(**{**FAST, "lr": 3e-3, "mini_batch_prompts": 2, "entropy_coef": 1e-3})
    d0, d1 = two_iterations
    m0 = run_update(d0["rollouts"], d0["scores"], d0["advantages"], tiny_policy, tmp_path / "p1", tmp_path / "s1",
                    params, tracking=tracking)
    m1 = run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2", tmp_path / "s2",
                    params, state_in=tmp_path / "s1", tracking=tracking)
    steps = m0["per_step"] + m1["per_step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for key in ("pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm", "lr", "tokens_per_s", "response_tokens"):
        xs, ys = read_series(live, f"update/{key}")
        assert xs == [1, 2, 3, 4], key
        assert ys == pytest.approx([s[key] for s in steps], rel=1e-12), key
    # the iteration's numbers are the steps' numbers pooled: mean loss, token-weighted clip fraction
    # and entropy, last lr (as_metrics' formulas over the whole iteration)
    for m in (m0, m1):
        per, n = m["per_step"], sum(s["response_tokens"] for s in m["per_step"])
        assert m["pg_loss"] == pytest.approx(np.mean([s["pg_loss"] for s in per]))
        assert m["pg_clipfrac"] == pytest.approx(sum(s["pg_clipfrac"] * s["response_tokens"] for s in per) / n)
        assert m["entropy"] == pytest.approx(sum(s["entropy"] * s["response_tokens"] for s in per) / n)
        assert m["lr"] == per[-1]["lr"] and n == m["response_tokens_trained"]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["update"]["pg_loss"] == pytest.approx(steps[-1]["pg_loss"]) and summary["step"] == 4

    again = run_update(d1["rollouts"], d1["scores"], d1["advantages"], tmp_path / "p1", tmp_path / "p2b",
                       tmp_path / "s2b", params, state_in=tmp_path / "s1", tracking=tracking)
    xs, ys = read_series(live, "update/pg_loss")
    assert xs == [1, 2, 3, 4] and ys[2:] == pytest.approx([s["pg_loss"] for s in again["per_step"]])
    # no tracking: no folder, and the update is unchanged
    assert not Tracker(None).enabled


# ----------------------------------------------------------------------------- one lm head, several architectures
# One lm head (tcrlsd/lm_head.py) for the score stage, the update's trained forward and its KL reference: for
# policies of several architectures -- each with its logit post-processing turned up so that skipping it shows --
# the update's first mini-batch reproduces the stored scores (ratio 1) and the KL to the same checkpoint is 0.
# Tiny random checkpoints built from transformers configs, saved as safetensors with the test tokenizer; the scores
# come from the score stage's CLI (which runs the head check at load), the update from run_update (which does too).
# (In this module: its process group is the one the other in-process updates share.)

LM_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=128, initializer_range=0.5)
# architecture -> (config class, what makes its forward differ from hidden @ W.T)
LM_ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),  # the plain head: the control
    "Gemma2ForCausalLM": ("Gemma2Config", {"final_logit_softcapping": 0.5, "head_dim": 16}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 4.0}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.25}),
    "PhiForCausalLM": ("PhiConfig", {}),  # an lm head with a bias
}


def _policy(arch: str, tok, folder):
    import transformers

    from tcrlsd.policy import save_policy

    config_name, extra = LM_ARCHS[arch]
    config = getattr(transformers, config_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                **LM_SHAPE, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, arch)(config).eval()
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            torch.nn.init.normal_(head.bias, std=2.0)  # a bias that matters (it is initialised to 0)
    return model, save_policy(model, tok, folder)


@pytest.mark.parametrize("arch", list(LM_ARCHS))
def test_first_minibatch_reproduces_the_stored_scores(arch, tok, tmp_path):
    from tcrlsd.lm_head import FrozenHead
    from tcrlsd.update.stage import run_update

    model, policy = _policy(arch, tok, tmp_path / "policy")
    # teeth: the bare projection hidden @ W.T is far from this architecture's logits (all but the control)
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits[0].float(), -1)
        h = model.base_model(ids).last_hidden_state[0]
        bare = torch.log_softmax(h @ model.get_output_embeddings().weight.T, -1)
        ours = torch.log_softmax(FrozenHead(model).logits(h), -1)
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-5)
    if arch != "LlamaForCausalLM":
        assert float((bare - want).abs().max()) > 0.1

    d = make_iteration(tmp_path / "iter", policy, tok, n_prompts=3, samples=2, seed=5,
                       advantages=lambda i, n: [1.0 if i % 2 else -1.0] * n)  # scores by the score stage's CLI
    params = UpdateParams(**{**FAST, "kl_coef": 0.5})
    m = run_update(d["rollouts"], d["scores"], d["advantages"], policy, tmp_path / "p1", tmp_path / "s1", params,
                   reference=policy)
    assert m["optimizer_steps"] == 1  # one mini-batch: every number below is measured before the step
    assert m["first_minibatch_max_abs_log_ratio"] < 1e-5, m["first_minibatch_max_abs_log_ratio"]
    assert abs(m["kl_to_reference"]) < 1e-6  # the reference path reproduces the same log-probs


# ----------------------------------------------------------------------------- packed micro-batches
# update.pack_tokens > 0: several sequences per row, attention within each (tcrlsd/update/packed_attention.py).
# Every mode the loss has, run packed and padded from the same weights on the same mini-batch: the numbers
# measured before the step (the loss, its terms, the clip share, the importance weights) agree to rounding,
# and so does the gradient norm. Several micro-batches in both layouts (FAST's 48 padded tokens, 40 packed).

PACK_MODES = {
    "ppo-token-mean": {},
    "gspo-seq-mean-token-mean": {"policy_loss": "gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4,
                                 "loss_agg_mode": "seq-mean-token-mean"},
    "dual-clip-token-sum-norm-rollout-is": {"dual_clip": 3.0, "loss_agg_mode": "seq-mean-token-sum-norm",
                                            "rollout_is": "sequence"},
    "kl-entropy-chunked": {"kl_coef": 0.5, "entropy_coef": 1e-3, "logits_chunk_tokens": 3},
}


@pytest.mark.parametrize("mode", list(PACK_MODES))
def test_packed_update_equals_padded(tiny_policy, signed, tmp_path, mode):
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.stage import open_trainer

    extra = PACK_MODES[mode]
    data = _with_sampler_logprobs(signed, tmp_path, lambda i: 0.1 * (i % 3)) if "rollout_is" in extra else signed
    inputs = UpdateInputs(**data, sampler_logprobs="rollout_is" in extra)
    got = {}
    for pack, share in ((0, False), (40, False), (40, True)):  # padded, packed, packed with shared prompts
        params = UpdateParams(**{**FAST, "lr": 1e-3, **extra, "pack_tokens": pack, "share_prompts": share})
        trainer, _, _ = open_trainer(tiny_policy, params, iteration=inputs.iteration,
                                     reference=tiny_policy if "kl_coef" in extra else None)
        got[pack, share] = trainer.train_iteration(inputs)
    padded = got[0, False]
    assert got[40, False]["forward_tokens"] == padded["forward_tokens"]  # the same real tokens
    assert got[40, True]["forward_tokens"] < padded["forward_tokens"]  # each prompt once per micro-batch
    for packed in (got[40, False], got[40, True]):
        assert padded["optimizer_steps"] == packed["optimizer_steps"] == 1  # all numbers: before the step
        for key in ("pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_to_reference", "rollout_is_weight_mean"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-6), key
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
        assert packed["first_minibatch_max_abs_log_ratio"] < 1e-5  # the score stage's (padded) log-probs: ratio 1
        if "kl_coef" in extra:
            assert abs(packed["kl_to_reference"]) < 1e-6 and packed["entropy"] > 0


def test_packed_update_is_deterministic(tiny_policy, signed, tmp_path):
    from tcrlsd.policy import WEIGHTS_DIGEST
    from tcrlsd.update.stage import run_update

    params = UpdateParams(**{**FAST, "pack_tokens": 40})
    digests = []
    for k in range(2):
        run_update(signed["rollouts"], signed["scores"], signed["advantages"], tiny_policy, tmp_path / f"p{k}",
                   tmp_path / f"s{k}", params)
        digests.append((tmp_path / f"p{k}" / WEIGHTS_DIGEST).read_text())
        assert "tcrlsd_packed" not in (tmp_path / f"p{k}" / "config.json").read_text()  # a plain HF checkpoint
    assert digests[0] == digests[1]
