"""The generate stage: prompt selection, the transformers backend, the stage through its CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from fixtures import synthetic_prompts
from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.generate import (
    GenerateParams,
    epoch_order,
    select_prompts,
    train_prompt_ids,
)
from tcrlsd.generation import EngineParams, SamplingConfig, SamplingParams, check_completions
from tcrlsd.schemas import SchemaError

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "generate.py"


# --------------------------------------------------------------------------------------------------
# helpers


PARAMS = """\
generate:
  backend: transformers
  prompts_per_step: 6
  samples_per_prompt: 3
  sampling: {temperature: 1.0, top_p: 1.0, max_new_tokens: 12}
  seed: 5
  num_parts: 3
  engine: {batch_size: 8}
"""


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_inputs")
    write_artifact(synthetic_prompts(9, 3), d / "prompts.parquet", "prompts")
    (d / "params.yaml").write_text(PARAMS)
    return d


def _stage_main():
    spec = importlib.util.spec_from_file_location("stage_generate", STAGE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _args(inputs: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return ["--params", str(inputs / "params.yaml"), "--prompts", str(inputs / "prompts.parquet"),
            "--policy", str(policy), "--iteration", "3", "--out", str(out), "--no-progress", *extra]


def _part_bytes(folder: Path) -> dict[str, bytes]:
    return {q.name: q.read_bytes() for q in sorted(folder.glob("part-*.parquet"))}


# --------------------------------------------------------------------------------------------------
# prompt selection


def test_selection_is_deterministic_and_walks_epochs():
    ids = [f"p{i:02d}" for i in range(10)]
    P = 4  # 10 % 4 != 0: steps straddle epoch boundaries
    steps = [select_prompts(ids, P, seed=1, iteration=k) for k in range(10)]  # 40 positions = 4 epochs
    assert steps == [select_prompts(ids, P, seed=1, iteration=k) for k in range(10)]
    assert steps != [select_prompts(ids, P, seed=2, iteration=k) for k in range(10)]
    flat = [pid for s in steps for pid in s]
    for e in range(4):  # every train prompt exactly once per epoch
        assert sorted(flat[e * 10:(e + 1) * 10]) == ids
    for s in steps:  # never twice in one step (rollout ids would collide)
        assert len(s) == P and len(set(s)) == P
    assert len({tuple(s) for s in steps}) > 1


def test_selection_without_straddling_is_plain_seeded_permutations():
    # n divisible by P: no boundary reordering, so epoch e is exactly the seeded permutation e.
    from tcrlsd.generate.selection import epoch_permutation

    order = epoch_order(12, 4, seed=3, epochs=3)
    assert order == epoch_permutation(12, 3, 0) + epoch_permutation(12, 3, 1) + epoch_permutation(12, 3, 2)
    assert epoch_permutation(12, 3, 0) != epoch_permutation(12, 3, 1)


def test_selection_errors_and_row_order():
    with pytest.raises(ValueError, match="prompts_per_step = 5 exceeds the 4 train prompts"):
        select_prompts(["a", "b", "c", "d"], 5, seed=0, iteration=0)
    table = synthetic_prompts(6, 2)
    shuffled = table.take(pa.array([5, 2, 7, 0, 1, 6, 4, 3]))
    assert train_prompt_ids(table) == train_prompt_ids(shuffled) == sorted(f"synthetic/train/{i}" for i in range(6))
    with pytest.raises(SchemaError, match="no rows with split == 'train'"):
        train_prompt_ids(table.filter(pa.compute.equal(table.column("split"), "val")), "x.parquet")


def test_params_are_checked():
    from tcrlsd.params import ParamsError, from_mapping

    with pytest.raises(ParamsError, match="not one of transformers, vllm"):
        from_mapping(GenerateParams, {"backend": "tgi"}, "generate")
    with pytest.raises(ParamsError, match="unknown key"):
        from_mapping(GenerateParams, {"n": 8}, "generate")
    with pytest.raises(ParamsError, match="top_p"):
        from_mapping(GenerateParams, {"top_p": 0.0}, "generate")


# --------------------------------------------------------------------------------------------------
# backends


@pytest.fixture(scope="module")
def loaded(tiny_policy):
    from tcrlsd.policy import encode_prompt, load_policy
    from tcrlsd.synthetic import make_problems

    model, tok = load_policy(tiny_policy, dtype="float32")
    # Prompts of different lengths, so batches really are left padded.
    prompts = [encode_prompt(tok, p.problem) for p in make_problems(7, seed=11)]
    assert len({len(p) for p in prompts}) > 2
    return model, tok, prompts


def test_greedy_batched_equals_unbatched_and_hf_generate(loaded):
    import torch

    from tcrlsd.generate.backends import TransformersBackend

    model, tok, prompts = loaded
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10, seed=0)
    batched = TransformersBackend(model, tok, batch_size=64).generate(prompts, 2, greedy)
    single = TransformersBackend(model, tok, batch_size=1).generate(prompts, 2, greedy)
    ids = lambda out: [[c.token_ids for c in g] for g in out]
    assert ids(batched) == ids(single)
    for g in batched:  # greedy: the group's copies agree (log-probs to rounding: with 2 threads a row's
        # numbers depend on its place in the batch, in the last bit)
        assert (g[0].token_ids, g[0].text, g[0].finish_reason) == (g[1].token_ids, g[1].text, g[1].finish_reason)
        assert g[0].logprobs == pytest.approx(g[1].logprobs, abs=1e-5)
    # Our KV-cache loop against transformers' own greedy decoding, one unpadded prompt at a time.
    for p, g in zip(prompts, batched):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in ref:  # the stop token is part of the response
            ref = ref[:ref.index(tok.eos_token_id) + 1]
        assert list(g[0].token_ids) == ref
    # top_p that keeps only the most likely token is greedy decoding.
    nucleus = SamplingConfig(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=123)
    assert ids(TransformersBackend(model, tok).generate(prompts, 2, nucleus)) == ids(batched)


def test_sampling_is_seeded_and_completions_are_consistent(loaded):
    from tcrlsd.generate.backends import TransformersBackend

    model, tok, prompts = loaded
    # A hot temperature makes EOS likely enough that both finish reasons occur.
    hot = SamplingConfig(temperature=4.0, max_new_tokens=20, seed=9)
    backend = TransformersBackend(model, tok, batch_size=8)
    a = backend.generate(prompts, 4, hot)
    assert a == backend.generate(prompts, 4, hot)
    assert a[:2] != backend.generate(prompts[:2], 4, SamplingConfig(temperature=4.0, max_new_tokens=20, seed=10))
    flat = [c for g in a for c in g]
    assert len(a) == len(prompts) and all(len(g) == 4 for g in a)
    assert len({c.token_ids for c in flat}) > len(flat) // 2  # samples differ within groups
    reasons = {c.finish_reason for c in flat}
    assert reasons == {"stop", "length"}, reasons
    check_completions(a, backend.stop_ids, 20)
    for c in flat:  # the stop-token contract: a "stop" response ends with EOS, its text does not
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in c.token_ids[:-1]
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert c.text == tok.decode(list(body), skip_special_tokens=True)


def test_make_backend_registry_and_vllm_message(tiny_policy):
    from tcrlsd.generate.backends import (
        BACKENDS,
        VLLM_MISSING,
        TransformersBackend,
        make_backend,
    )

    assert sorted(BACKENDS) == ["transformers", "vllm"]
    backend = make_backend("transformers", str(tiny_policy), device="cpu", dtype="float32", batch_size=3)
    assert isinstance(backend, TransformersBackend) and backend.batch_size == 3
    with pytest.raises(ValueError, match="unknown generation backend 'hf'"):
        make_backend("hf", str(tiny_policy))
    with pytest.raises(TypeError, match="unknown option.*num_beams"):
        make_backend("transformers", str(tiny_policy), num_beams=2)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"pip install tcrlsd\[gpu\]` on a CUDA machine"):
            make_backend("vllm", str(tiny_policy))
    assert "pip install tcrlsd[gpu]" in VLLM_MISSING


# --------------------------------------------------------------------------------------------------
# the stage through its CLI


def test_stage_cli_writes_rollouts_and_reruns_identically(stage_inputs, tiny_policy, tmp_path):
    from tcrlsd.policy import encode_prompt, load_tokenizer

    out1, metrics = tmp_path / "a" / "rollouts", tmp_path / "a" / "metrics" / "generate.json"
    proc = subprocess.run([sys.executable, str(STAGE), *_args(stage_inputs, tiny_policy, out1, "--metrics",
                                                              str(metrics))],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = read_artifact(out1, "rollouts")
    params = GenerateParams(prompts_per_step=6, samples_per_prompt=3, sampling=SamplingParams(max_new_tokens=12),
                            seed=5, num_parts=3, engine=EngineParams(batch_size=8))
    prompts = read_artifact(stage_inputs / "prompts.parquet", "prompts")
    chosen = select_prompts(train_prompt_ids(prompts), 6, seed=5, iteration=3)
    assert table.num_rows == 18 and len(_part_bytes(out1)) == 3
    assert table.column("prompt_id").to_pylist() == [pid for pid in chosen for _ in range(3)]
    assert table.column("sample_idx").to_pylist() == [0, 1, 2] * 6
    assert table.column("rollout_id").to_pylist() == [f"{pid}#{j}" for pid in chosen for j in range(3)]
    assert set(table.column("iteration").to_pylist()) == {3}
    tok = load_tokenizer(tiny_policy)
    text = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    for row in table.to_pylist():
        assert row["prompt_token_ids"] == encode_prompt(tok, text[row["prompt_id"]])
        ids, stop = row["response_token_ids"], row["finish_reason"] == "stop"
        assert row["response_text"] == tok.decode(ids[:-1] if stop else ids, skip_special_tokens=True)
        assert stop == (ids[-1] == tok.eos_token_id) and tok.eos_token_id not in ids[:-1]
        assert stop or len(ids) == params.sampling.max_new_tokens
    import json

    m = json.loads(metrics.read_text())
    assert m["rollouts"] == 18 and m["prompts"] == 6 and m["complete"] and m["iteration"] == 3
    assert 0.0 <= m["share_finish_length"] <= 1.0 and m["tokens_per_second"] > 0
    assert m["share_finish_stop"] + m["share_finish_length"] == pytest.approx(1.0)

    # A fresh folder gives byte-identical parts.
    out2 = tmp_path / "b" / "rollouts"
    assert _stage_main()(_args(stage_inputs, tiny_policy, out2)) == 0
    assert _part_bytes(out2) == _part_bytes(out1)

    # Two workers (--shard 0/2 then 1/2) together write the single worker's bytes.
    out3 = tmp_path / "c" / "rollouts"
    m3 = tmp_path / "c" / "generate.json"
    assert _stage_main()(_args(stage_inputs, tiny_policy, out3, "--shard", "0/2", "--metrics", str(m3))) == 0
    assert sorted(_part_bytes(out3)) == ["part-00000.parquet", "part-00002.parquet"]
    assert not m3.exists()  # incomplete: metrics wait for the last worker
    with pytest.raises(SchemaError, match="incomplete rollouts artifact"):
        read_artifact(out3, "rollouts")
    assert _stage_main()(_args(stage_inputs, tiny_policy, out3, "--shard", "1/2", "--metrics", str(m3))) == 0
    assert _part_bytes(out3) == _part_bytes(out1) and m3.exists()

    # Resume: a lost part is regenerated, identically; the others are not touched.
    before = {q.name: q.stat().st_mtime_ns for q in out2.glob("part-*.parquet")}
    (out2 / "part-00001.parquet").unlink()
    assert _stage_main()(_args(stage_inputs, tiny_policy, out2)) == 0
    after = {q.name: q.stat().st_mtime_ns for q in out2.glob("part-*.parquet")}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    assert _part_bytes(out2) == _part_bytes(out1)

    # Changed params make the finished parts stale: an error that deletes nothing, until --restart.
    other = tmp_path / "params2.yaml"
    other.write_text(PARAMS.replace("seed: 5", "seed: 6"))
    args = _args(stage_inputs, tiny_policy, out2)
    args[1] = str(other)
    assert _stage_main()(args) == 2
    assert _part_bytes(out2) == _part_bytes(out1)
    assert _stage_main()(args + ["--restart"]) == 0
    assert _part_bytes(out2) != _part_bytes(out1)
    assert read_artifact(out2, "rollouts").num_rows == 18


def test_fanout_script_runs_the_real_stage_as_parallel_shards(stage_inputs, tiny_policy, tmp_path):
    """configs/gpu/fanout.sh (dvc.yaml's gpu_fanout) with the real generate stage, 2 workers at once on
    this CPU: together they write the single worker's bytes, then the plain run writes the metrics."""
    import json
    import os
    import subprocess
    import sys

    single = tmp_path / "one" / "rollouts"
    assert _stage_main()(_args(stage_inputs, tiny_policy, single)) == 0
    out, metrics = tmp_path / "two" / "rollouts", tmp_path / "two" / "generate.json"
    cmd = ["bash", str(ROOT / "configs" / "gpu" / "fanout.sh"), "2", sys.executable, str(STAGE),
           *_args(stage_inputs, tiny_policy, out, "--metrics", str(metrics))]
    env = {k: v for k, v in os.environ.items() if k != "GPU_LIST"}  # workers get CUDA_VISIBLE_DEVICES 0 and 1
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _part_bytes(out) == _part_bytes(single)
    assert json.loads(metrics.read_text())["complete"]


def test_stage_rejects_bad_shard(stage_inputs, tiny_policy, tmp_path, capsys):
    assert _stage_main()(_args(stage_inputs, tiny_policy, tmp_path / "r", "--shard", "2/2")) == 2
    assert "--shard must look like i/N" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "part-00000.parquet")


def test_train_levels_restrict_the_prompts_a_step_samples():
    from tcrlsd.generate.selection import train_prompt_ids

    table = synthetic_prompts(40, 8)
    level = dict(zip(table.column("prompt_id").to_pylist(), table.column("level").to_pylist()))
    every = train_prompt_ids(table)
    ones = train_prompt_ids(table, levels=(1,))
    assert ones and set(ones) < set(every) and all(level[p] == 1 for p in ones)
    assert sorted(p for p in every if level[p] == 1) == ones
    with pytest.raises(SchemaError, match="generate.train_levels"):
        train_prompt_ids(table, levels=(9,))


# --------------------------------------------------------------------------------------------------
# dynamic sampling (tcrlsd/generate/dynamic.py)

# A hand-made iteration of five groups of two (rewards; finish reasons):
#   mixed    (1, 0)                 A = (+0.707, -0.707) (unbiased std of {1, 0} = 0.707)
#   allwrong (0, 0) stop            A = 0; both wrong -> both get feedback in mode critique
#   allright (1, 1)                 A = 0; which auto (= incorrect): no feedback
#   cutwrong (0, 0) length          A = 0; wrong but cut by the token limit: feedback only without skip_truncated
#   penalised (-0.5, 0) wrong       overlong penalty on one: rewards differ, A != 0
_GROUPS = {"mixed": ([1.0, 0.0], [True, False], ["stop", "stop"]),
           "allwrong": ([0.0, 0.0], [False, False], ["stop", "stop"]),
           "allright": ([1.0, 1.0], [True, True], ["stop", "stop"]),
           "cutwrong": ([0.0, 0.0], [False, False], ["length", "length"]),
           "penalised": ([-0.5, 0.0], [False, False], ["length", "stop"])}


def _signal(estimator, lam=0.5, beta=0.3, mode="critique", skip_truncated=True):
    from tcrlsd.advantages.estimators import Settings
    from tcrlsd.generate.dynamic import GroupFilter, groups_with_signal

    flt = GroupFilter(estimator, Settings(lam=lam, eps_w=0.2, alpha=0.7, beta=beta), True, mode, "auto", skip_truncated)
    ids = [g for g in _GROUPS for _ in range(2)]
    cols = [sum((list(v[k]) for v in _GROUPS.values()), []) for k in range(3)]
    return groups_with_signal(ids, *cols, flt)


@pytest.mark.parametrize("estimator,kwargs,kept", [
    # reward variance only: grpo and rlsd (A * m_t dies when A = 0)
    ("grpo", {}, {"mixed", "penalised"}),
    ("rlsd", {}, {"mixed", "penalised"}),
    # lambda * Delta carries the all-wrong group that gets feedback; not the truncated one (skipped)
    ("rlsd_add", {}, {"mixed", "penalised", "allwrong"}),
    ("rlsd_hybrid", {}, {"mixed", "penalised", "allwrong"}),
    # without skip_truncated the cut group gets feedback too (the penalised one already had signal)
    ("rlsd_add", {"skip_truncated": False}, {"mixed", "penalised", "allwrong", "cutwrong"}),
    # lambda decayed to 0: rlsd_add is A alone; beta = 0: rlsd_hybrid is rlsd
    ("rlsd_add", {"lam": 0.0}, {"mixed", "penalised"}),
    ("rlsd_hybrid", {"beta": 0.0}, {"mixed", "penalised"}),
    # lambda = 1: rlsd_add is Delta alone, so a mixed group carries signal only through its feedback row
    ("rlsd_add", {"lam": 1.0}, {"mixed", "penalised", "allwrong"}),
    # no feedback at all (mode none): back to reward variance
    ("rlsd_add", {"mode": "none"}, {"mixed", "penalised"}),
    # mode gold gives every rollout feedback (which auto = all), even the all-correct and the cut group
    ("rlsd_add", {"mode": "gold"}, set(_GROUPS)),
])
def test_groups_with_signal_follow_the_estimator(estimator, kwargs, kept):
    got = _signal(estimator, **kwargs)
    assert list(got) == list(_GROUPS)  # one answer per group, in first-seen order
    assert {g for g, keep in got.items() if keep} == kept


def test_dynamic_sampling_drops_zero_advantage_groups_and_draws_more(stage_inputs, tiny_policy, tmp_path):
    """The random tiny policy answers nothing right and never stops within 12 tokens: every reward is
    0. grpo: every group is dropped, each part draws its reserve (9 train prompts, 6 chosen: one
    reserve prompt per part) and is written empty. rlsd_add with feedback on the cut responses:
    every group carries Delta, round 0 fills every part, and the bytes equal a run without dynamic
    sampling."""
    import json

    base = (PARAMS + "  dynamic_sampling: true\n  max_draw_rounds: 3\nverify: {workers: 1}\n"
            "critique: {mode: critique, which: auto, skip_truncated: SKIP}\nadvantages: {estimator: EST}\n")
    runs = {}
    for name, est, skip in (("grpo", "grpo", "true"), ("add", "rlsd_add", "false"), ("off", "grpo", "true")):
        params = tmp_path / f"{name}.yaml"
        text = base.replace("EST", est).replace("SKIP", skip)
        params.write_text(text.replace("dynamic_sampling: true", "dynamic_sampling: false") if name == "off" else text)
        out, metrics = tmp_path / name / "rollouts", tmp_path / name / "generate.json"
        args = _args(stage_inputs, tiny_policy, out, "--metrics", str(metrics))
        args[1] = str(params)
        assert _stage_main()(args) == 0
        runs[name] = (out, json.loads(metrics.read_text()))
    out, m = runs["grpo"]
    assert read_artifact(out, "rollouts").num_rows == 0 and m["complete"]
    assert m["dynamic_sampling"] == {"quota": 6, "drawn": 9, "kept": 0, "dropped": 9, "surplus": 0, "extra_rounds": 3,
                                     "short": 6, "most_extra_rounds_of_a_part": 1}
    assert m["prompts_drawn"] == 9
    out, m = runs["add"]
    assert _part_bytes(out) == _part_bytes(runs["off"][0])
    assert m["dynamic_sampling"]["kept"] == m["dynamic_sampling"]["drawn"] == m["prompts_drawn"] == 6
    assert runs["off"][1]["prompts_drawn"] == 6 and runs["off"][1]["dynamic_sampling"] is None
