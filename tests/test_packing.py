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


def _per_token(policy, seqs, plan, packed, bounds=True):
    """{sequence index: (logp, entropy)} through the update's trained forward (TokenLogprobs), and the
    gradient of sum(logp) w.r.t. the embeddings."""
    from tcrlsd.policy import load_policy
    from tcrlsd.update.engine import TokenLogprobs
    from tcrlsd.update.packed_attention import enable_packed_attention

    model, _ = load_policy(policy, dtype="float32")
    if packed:
        enable_packed_attention(model)
    module = TokenLogprobs(model, 16).train()
    out = {}
    for batch in plan:
        mb = collate([seqs[i] for i in batch], "cpu", packed=packed)
        logp, ent = module(mb.input_ids, mb.rows, mb.cols, mb.targets, **(mb.decoder_kwargs() if bounds else {}))
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
