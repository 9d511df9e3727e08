"""Packed micro-batches of the update: the plan and the layout by hand, and per-token equality
with the padded layout on the tiny policy (the loss modes through the trainer are in test_update.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tcrlsd.batching import plan_packed_batches  # noqa: E402
from tcrlsd.update.batching import TrainSequence, plan_micro_batches  # noqa: E402
from tcrlsd.update.microbatch import collate  # noqa: E402


def _seq(prompt, response, base=0.0):
    r = len(response)
    return TrainSequence("r", list(prompt), list(response), np.full(r, -1.0 - base, np.float32),
                         np.full(r, 1.0, np.float32))


def test_plan_packed_batches_first_fit_decreasing_by_hand():
    # lengths 5 3 8 2 4, budget 8; longest first: 8 (i2) fills batch 0; 5 (i0) opens batch 1 (room 3);
    # 4 (i4) fits neither -> batch 2 (room 4); 3 (i1) -> batch 1 (room 0); 2 (i3) -> batch 2 (room 2)
    assert plan_packed_batches([5, 3, 8, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    # a sequence over the budget runs alone; ties keep index order
    assert plan_packed_batches([9, 2, 2], 4) == [[0], [1, 2]]
    assert plan_packed_batches([], 8) == []


def test_packed_layout_by_hand():
    # sequence 0: prompt [1, 2], response [3, 4]; sequence 1: prompt [5], response [6]
    mb = collate([_seq([1, 2], [3, 4]), _seq([5], [6], base=1.0)], "cpu", packed=True)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]  # restart at 0 for every sequence
    assert mb.cu_seqlens.tolist() == [0, 4, 6] and mb.cu_seqlens.dtype == torch.int32 and mb.max_len == 4
    # logits at position p predict token p + 1: 3 from col 1, 4 from col 2, 6 from col 4 (5's position)
    assert mb.rows.tolist() == [0, 0, 0] and mb.cols.tolist() == [1, 2, 4] and mb.targets.tolist() == [3, 4, 6]
    assert mb.seq.tolist() == [0, 0, 1] and mb.seq_len.tolist() == [2, 2, 1] and mb.tokens == 6
    assert mb.old_logprobs.tolist() == [-1.0, -1.0, -2.0]
    kw = mb.decoder_kwargs()
    assert kw["cu_seq_lens_q"] is mb.cu_seqlens and kw["max_length_k"] == 4 and kw["position_ids"] is mb.position_ids
    padded = collate([_seq([1, 2], [3, 4]), _seq([5], [6], base=1.0)], "cpu")
    assert padded.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]] and padded.decoder_kwargs() == {}
    assert padded.rows.tolist() == [0, 0, 1] and padded.cols.tolist() == [1, 2, 0] and padded.seq.tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def sequences(tiny_policy):
    """24 sequences of the synthetic task's prompts with random responses (lengths 2..40)."""
    import random

    from tcrlsd.policy import encode_prompt, load_tokenizer
    from tcrlsd.synthetic import make_problems

    tok = load_tokenizer(tiny_policy)
    rng = random.Random(3)
    seqs = []
    for p in make_problems(24, seed=3):
        resp = [rng.randrange(3, len(tok)) for _ in range(rng.randint(2, 40))]
        seqs.append(_seq(encode_prompt(tok, p.problem), resp))
    return seqs


def _per_token(policy, seqs, plan, packed, bounds=True, share=False, impl=None, siblings=False):
    """{sequence index: (logp, entropy)} through the update's trained forward (TokenLogprobs), and the
    gradient of sum(logp) w.r.t. the embeddings. ``share``: prompts written once per micro-batch;
    ``siblings``: that row with every response also seeing the siblings before it (a wrong mask)."""
    from tcrlsd.policy import load_policy
    from tcrlsd.update.engine import TokenLogprobs
    from tcrlsd.update.packed_attention import enable_packed_attention

    model, _ = load_policy(policy, dtype="float32")
    if impl:
        model.set_attn_implementation(impl)
    if packed:
        enable_packed_attention(model, share_prompts=share)
    module = TokenLogprobs(model, 16).train()
    out = {}
    for batch in plan:
        mb = collate([seqs[i] for i in batch], "cpu", packed=packed, share_prompts=share)
        kwargs = mb.decoder_kwargs() if bounds else {}
        if siblings:  # one "response" per group: all of them, end to end, after the prompt
            kwargs["tcrlsd_prefix_groups"] = tuple((s, p, ((r[0][0], sum(n for _, n in r)),)) for s, p, r in
                                                   mb.prefix_groups)
        logp, ent = module(mb.input_ids, mb.rows, mb.cols, mb.targets, **kwargs)
        (logp.sum() + 1e-3 * ent.sum()).backward()
        for k, i in enumerate(batch):
            sel = mb.seq == k
            out[i] = (logp[sel].detach(), ent[sel].detach())
    grad = model.get_input_embeddings().weight.grad.clone()
    return out, grad


def test_packed_forward_equals_padded_per_token(tiny_policy, sequences):
    lengths = [s.length for s in sequences]
    padded, g_pad = _per_token(tiny_policy, sequences, plan_micro_batches(lengths, 256), packed=False)
    packed, g_pack = _per_token(tiny_policy, sequences, plan_packed_batches(lengths, 256), packed=True)
    assert len(plan_packed_batches(lengths, 256)) > 1  # several micro-batches, several sequences in each
    for i in padded:
        torch.testing.assert_close(packed[i][0], padded[i][0], rtol=0, atol=1e-6)  # log-probs
        torch.testing.assert_close(packed[i][1], padded[i][1], rtol=0, atol=1e-6)  # entropies
    torch.testing.assert_close(g_pack, g_pad, rtol=1e-4, atol=1e-6)  # gradients (summed over micro-batches)
    # teeth: the same packed row without its positions and bounds is one long sequence (later ones see earlier ones)
    leaky, _ = _per_token(tiny_policy, sequences, plan_packed_batches(lengths, 256), packed=True, bounds=False)
    assert max(float((leaky[i][0] - padded[i][0]).abs().max()) for i in padded) > 1e-2


def test_packing_refuses_an_attention_it_cannot_split(tiny_policy):
    from tcrlsd.policy import load_policy
    from tcrlsd.update.packed_attention import enable_packed_attention
    from tcrlsd.update.params import UpdateError

    model, _ = load_policy(tiny_policy, dtype="float32")
    model.config._attn_implementation_internal = "flex_attention"  # not one PACKED_ATTENTION runs per sequence
    with pytest.raises(UpdateError, match=r"LlamaForCausalLM.*flex_attention.*pack_tokens: 0"):
        enable_packed_attention(model)


def test_shared_prompt_layout_by_hand():
    # two responses of prompt [1, 2] and one of prompt [5]: each prompt written once
    seqs = [_seq([1, 2], [3, 4]), _seq([5], [6], base=1.0), _seq([1, 2], [7])]
    mb = collate(seqs, "cpu", packed=True, share_prompts=True)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 7, 5, 6]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]  # a response continues from its prompt
    assert mb.prefix_groups == ((0, 2, ((2, 2), (4, 1))), (5, 1, ((6, 1),)))
    # tokens in the sequences' order: 3 and 7 are both predicted by the prompt's last position (col 1)
    assert mb.cols.tolist() == [1, 2, 5, 1] and mb.targets.tolist() == [3, 4, 6, 7]
    assert mb.seq.tolist() == [0, 0, 1, 2] and mb.seq_len.tolist() == [2, 2, 1, 1] and mb.tokens == 7
    assert mb.decoder_kwargs() == {"position_ids": mb.position_ids, "tcrlsd_prefix_groups": mb.prefix_groups}


def test_plan_shared_batches_by_hand():
    from tcrlsd.update.batching import plan_shared_batches

    # prompts a (len 4) x3 responses of 3, b (len 2) x2 responses of 5; budget 12
    # a: 4+3+3 = 10, the third response opens a chunk: 4+3 = 7; b: 2+5+5 = 12
    keys, plens, rlens = ["a", "b", "a", "b", "a"], [4, 2, 4, 2, 4], [3, 5, 3, 5, 3]
    assert plan_shared_batches(keys, plens, rlens, 12) == [[1, 3], [0, 2], [4]]
    assert plan_shared_batches(keys, plens, rlens, 100) == [[0, 2, 4, 1, 3]]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prompts_equal_padded_per_token(tiny_policy, sequences, impl):
    from tcrlsd.update.batching import plan_shared_batches

    # groups of 4 responses per prompt, as GRPO groups: the same prompt ids, different responses
    import random

    rng = random.Random(5)
    groups = []
    for s in sequences[:6]:
        for _ in range(4):
            groups.append(_seq(s.prompt_ids, [rng.randrange(3, 200) for _ in range(rng.randint(2, 30))]))
    lengths = [s.length for s in groups]
    padded, g_pad = _per_token(tiny_policy, groups, plan_micro_batches(lengths, 256), packed=False, impl=impl)
    plan = plan_shared_batches([tuple(s.prompt_ids) for s in groups], [len(s.prompt_ids) for s in groups],
                               [len(s.response_ids) for s in groups], 200)
    assert len(plan) > 1 and all(len(b) > 4 for b in plan)  # several micro-batches of several groups
    shared, g_shared = _per_token(tiny_policy, groups, plan, packed=True, share=True, impl=impl)
    for i in padded:
        torch.testing.assert_close(shared[i][0], padded[i][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(shared[i][1], padded[i][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(g_shared, g_pad, rtol=1e-4, atol=1e-6)
    # teeth: the same row with plain packing bounds (each response after all its siblings) differs
    leaky, _ = _per_token(tiny_policy, groups, plan, packed=True, share=True, impl=impl, siblings=True)
    assert max(float((leaky[i][0] - padded[i][0]).abs().max()) for i in padded) > 1e-2
