"""The transformers backend against references: the sampler's distribution, the nucleus support,
the stop-token contract, and rows leaving the batch as they finish compared with HF ``generate``."""

from __future__ import annotations

import math

import pytest

from tcrlsd.generation import Completion, SamplingConfig, check_completions

torch = pytest.importorskip("torch")


def _draw(logits_row, sampling: SamplingConfig, rows: int, seed: int = 0):
    """Token frequencies of ``rows`` independent draws from one logits row (one call, R = rows)."""
    from tcrlsd.generate.transformers_backend import sample_next

    logits = torch.tensor(logits_row, dtype=torch.float32).expand(rows, -1).contiguous()  # (R, V)
    gen = torch.Generator().manual_seed(seed)
    ids, _ = sample_next(logits, sampling, gen)  # (R,)
    return torch.bincount(ids, minlength=len(logits_row)).double() / rows  # (V,)


def _assert_frequencies(freq, probs, rows: int):
    """Each token's frequency within 5 binomial standard deviations of its probability."""
    for v, (f, p) in enumerate(zip(freq.tolist(), probs.tolist())):
        sd = math.sqrt(max(p * (1 - p), 1e-12) / rows)
        assert abs(f - p) <= 5 * sd + 1e-9, f"token {v}: frequency {f:.4f}, expected {p:.4f} (sd {sd:.4f})"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampler_frequencies_match_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    freq = _draw(logits.tolist(), SamplingConfig(temperature=temperature, top_p=1.0), rows)
    _assert_frequencies(freq, torch.softmax(logits.double() / temperature, -1), rows)
    # Teeth: at these sample sizes softmax(l) (temperature ignored) is rejected for T != 1.
    if temperature != 1.0:
        with pytest.raises(AssertionError):
            _assert_frequencies(freq, torch.softmax(logits.double(), -1), rows)


@pytest.mark.parametrize("temperature,top_p,expected", [
    # probs (0.4, 0.3, 0.2, 0.06, 0.04). T = 1, top_p 1: the raw log-softmax, log p_v.
    (1.0, 1.0, [math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.06), math.log(0.04)]),
    # T = 1, top_p 0.6: the nucleus is {0.4, 0.3} (0.4 < 0.6, 0.4 + 0.3 >= 0.6), renormalised by 0.7.
    (1.0, 0.6, [math.log(0.4 / 0.7), math.log(0.3 / 0.7)]),
    # T = 2, top_p 1: p_v^(1/2) / sum_u p_u^(1/2).
    (2.0, 1.0, [0.5 * math.log(q) - math.log(sum(u ** 0.5 for u in (0.4, 0.3, 0.2, 0.06, 0.04)))
                for q in (0.4, 0.3, 0.2, 0.06, 0.04)]),
    # greedy: the argmax (token 0) with its raw log-softmax.
    (0.0, 1.0, [math.log(0.4)]),
])
def test_sampler_logprob_is_that_of_the_distribution_drawn_from(temperature, top_p, expected):
    """The second output of sample_next is log q(drawn id) where q is the distribution the id was
    drawn from (after temperature and nucleus), what rollouts store as sampler_logprobs."""
    from tcrlsd.generate.transformers_backend import sample_next

    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])).expand(2000, -1).contiguous()
    ids, lp = sample_next(logits, SamplingConfig(temperature=temperature, top_p=top_p), torch.Generator().manual_seed(3))
    assert lp.dtype == torch.float32 and lp.shape == ids.shape
    seen = set(ids.tolist())
    assert seen == set(range(len(expected)))  # every token of the support drawn, none outside
    for v in seen:
        assert torch.allclose(lp[ids == v], torch.tensor(expected[v]), atol=1e-5), (v, lp[ids == v][:3], expected[v])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.6), (2.0, 0.6), (0.7, 0.9)])
def test_top_p_support_and_renormalised_frequencies_match_hf_warpers(temperature, top_p):
    """The nucleus is the smallest set of most likely tokens whose mass reaches top_p (after the
    temperature), as transformers' TemperatureLogitsWarper + TopPLogitsWarper keep it; inside it
    the draw follows the renormalised probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))[0]
    support = torch.isfinite(warped)
    assert 1 < int(support.sum()) < len(logits)  # a non-trivial nucleus: some kept, some dropped
    rows = 40_000
    freq = _draw(logits.tolist(), SamplingConfig(temperature=temperature, top_p=top_p), rows, seed=1)
    assert torch.equal(freq > 0, support), (freq, support)  # nothing outside the nucleus, all of it drawn
    probs = torch.softmax(logits.double() / temperature, -1) * support
    _assert_frequencies(freq, probs / probs.sum(), rows)


def test_check_completions_enforces_the_stop_token_contract():
    eos = 2
    ok = [[Completion((5, 6, eos), "ab", "stop"), Completion((5, 6, 7), "abc", "length")],
          [Completion((eos,), "", "stop")]]
    check_completions(ok, [eos], max_new_tokens=3)
    bad = {
        "do not end with a stop id": Completion((5, 6), "ab", "stop"),  # EOS cut off (the old contract)
        "before the end": Completion((eos, 5, eos), "a", "stop"),
        "needs 1..3 ids": Completion((5, 6, 7, 8), "abcd", "length"),
        "needs 1..3 ids and": Completion((), "", "length"),
        "with a stop id": Completion((5, 6, eos), "ab", "length"),
        "expected 'stop', 'length' or 'prompt_too_long'": Completion((5,), "a", "abort"),
    }
    for message, c in bad.items():
        with pytest.raises(RuntimeError, match=message):
            check_completions([[c]], [eos], max_new_tokens=3, backend="vllm")


@pytest.fixture(scope="module")
def eos_biased(tiny_policy):
    """The tiny policy with a bias on the EOS logit such that greedy rows stop at different steps.

    The bias is searched on a grid against HF ``generate`` (the reference), so the test does not
    depend on one set of random weights: it needs >= 3 distinct stop steps and at least one row that
    runs to ``max_new_tokens``.
    """
    from tcrlsd.policy import encode_prompt, load_policy
    from tcrlsd.synthetic import make_problems

    model, tok = load_policy(tiny_policy, dtype="float32")
    prompts = [encode_prompt(tok, p.problem) for p in make_problems(7, seed=11)]
    eos, T = tok.eos_token_id, 12
    for b in [0.8 + 0.02 * k for k in range(16)]:
        bias = torch.zeros(model.lm_head.out_features)
        bias[eos] = b
        model.lm_head.bias = torch.nn.Parameter(bias)
        refs = [_hf_greedy(model, tok, p, T) for p in prompts]
        stops = [len(r) for r in refs if r[-1] == eos]
        if len(set(stops)) >= 3 and len(stops) < len(refs):
            return model, tok, prompts, refs, T
    pytest.fail("no EOS bias on the grid makes greedy rows stop at different steps")


def _hf_greedy(model, tok, prompt, max_new_tokens):
    """HF greedy decoding of one unpadded prompt; the ids up to and including the first EOS."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def _spy_on_row_drops(backend):
    """Record, per row drop the decoding loop makes, (rows kept, shared-prefix cache in use, prompts
    the shared-prefix cache still holds after it or None)."""
    dropped = []
    make_cache = backend._new_cache

    def new_cache(*args):
        cache, shared = make_cache(*args)
        real_select = cache.batch_select_indices

        def select(indices):
            real_select(indices)
            prefix = getattr(cache.layers[0], "prefix_k", None)
            dropped.append((len(indices), shared, None if prefix is None else prefix.shape[0]))

        cache.batch_select_indices = select
        return cache, shared

    backend._new_cache = new_cache
    return dropped


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_finished_rows_leave_the_batch_and_match_hf_generate(eos_biased, shared_prefix):
    from tcrlsd.generate.transformers_backend import TransformersBackend

    model, tok, prompts, refs, T = eos_biased
    eos = tok.eos_token_id
    n = 2  # greedy: both samples of a group must equal the reference
    rows = len(prompts) * n
    early = sum(n for r in refs if r[-1] == eos and len(r) < max(len(q) for q in refs))
    assert 4 * early >= rows  # a quarter of the rows finish early: the batch really drops rows
    backend = TransformersBackend(model, tok, batch_size=64, shared_prefix=shared_prefix)
    dropped = _spy_on_row_drops(backend)
    out = backend.generate(prompts, n, SamplingConfig(temperature=0.0, max_new_tokens=T, seed=0))
    check_completions(out, backend.stop_ids, T, "transformers")
    assert dropped, "no row ever left the batch"
    assert {shared for _, shared, _ in dropped} == {shared_prefix}  # the cache asked for was the one used
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back
    for p, ref, group in zip(prompts, refs, out):
        for c in group:
            assert list(c.token_ids) == ref
            if ref[-1] == eos:  # the stop token is part of the response, the text is not
                assert c.finish_reason == "stop"
                assert c.text == tok.decode(ref[:-1], skip_special_tokens=True)
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == T and eos not in c.token_ids


def test_shared_prefix_decoding_equals_the_plain_cache(tiny_policy):
    """One copy of each prompt's keys for its group (tcrlsd/generate/shared_prefix.py) against the
    stock repeated cache: hot sampling (rows of a group finish at different steps, so groups become
    ragged and whole groups leave), several batches, and grouped-query attention (2 key/value heads
    for 4 query heads). Same tokens, log-probs within 1e-5."""
    from tcrlsd.generate.transformers_backend import TransformersBackend
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, encode_prompt, load_policy
    from tcrlsd.synthetic import make_problems

    model, tok = load_policy(tiny_policy, dtype="float32")
    gqa = build_tiny_llama(tok, TinyLlamaConfig(num_key_value_heads=2), seed=3).eval()
    prompts = [encode_prompt(tok, p.problem) for p in make_problems(7, seed=11)]
    assert len({len(p) for p in prompts}) > 2  # left padding in the prefix
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=4)
    for m in (model, gqa):
        bias = torch.zeros(m.lm_head.out_features)
        bias[tok.eos_token_id] = 3.0  # EOS likely enough that rows stop at many different steps
        m.lm_head.bias = torch.nn.Parameter(bias)
        runs = {}
        for shared in (False, True):
            backend = TransformersBackend(m, tok, batch_size=12, shared_prefix=shared)
            dropped = _spy_on_row_drops(backend)
            runs[shared] = backend.generate(prompts, 4, sampling)
            assert {s for _, s, _ in dropped} == {shared}
            assert any(kept % 4 for kept, _, _ in dropped), "no group was ever cut in the middle"
            if shared:  # whole groups left too, and their prompts with them
                assert any(groups is not None and groups < 3 for _, _, groups in dropped), dropped
        plain, shared = runs[False], runs[True]
        assert [[c.token_ids for c in g] for g in plain] == [[c.token_ids for c in g] for g in shared]
        assert [[c.finish_reason for c in g] for g in plain] == [[c.finish_reason for c in g] for g in shared]
        for gp, gs in zip(plain, shared):
            for a, b in zip(gp, gs):
                assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert {c.finish_reason for g in shared for c in g} == {"stop", "length"}
        assert m.config._attn_implementation == "sdpa"
