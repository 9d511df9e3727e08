"""The score stage's lm-head path: fp32 projection in bf16 models, and the load-time check that it
reproduces ``model(ids).logits`` (logit scales, soft-caps) or refuses the architecture by name."""

from __future__ import annotations

import numpy as np
import pytest

from tcrlsd.lm_head import LmHeadError, check_head_path
from tcrlsd.score import response_logprobs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5)
# Each architecture with its logit post-processing turned up so that skipping it shows.
ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 4.0}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.25}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"final_logit_softcapping": 0.5, "head_dim": 16}),
}


def _tiny(arch: str, dtype=torch.float32):
    config_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**TINY, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, arch)(config)
    return model.to(dtype).eval()


def _ids(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_head_path_reproduces_model_logits_for_known_postprocessing(arch):
    model = _tiny(arch)
    ids = _ids()
    check_head_path(model, ids)  # no error: the stage reproduces this architecture's logits
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
        raw = model.get_output_embeddings()(model.base_model(torch.tensor([ids])).last_hidden_state)[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(3, len(ids) - 1), torch.tensor(ids[4:])].numpy()
    (got,) = response_logprobs(model, [ids[:4]], [ids[4:]], max_tokens_per_batch=64)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    if arch != "LlamaForCausalLM":  # teeth: the bare lm head is far from this model's logits
        assert (raw - logits).abs().max() > 0.1


def test_unknown_logit_postprocessing_is_refused_naming_the_architecture():
    class ScaledLlamaForCausalLM(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    config = transformers.LlamaConfig(**TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ScaledLlamaForCausalLM(config).eval()
    with pytest.raises(LmHeadError, match=r"ScaledLlamaForCausalLM.*differ"):
        check_head_path(model, _ids())


def test_bf16_model_logprobs_use_an_fp32_head_projection():
    """In a bf16 model the log-probs equal an fp64 projection of the same bf16 hidden states
    (hidden states and head weight cast up), not bf16 logits cast afterwards."""
    model = _tiny("LlamaForCausalLM", dtype=torch.bfloat16)
    ids = _ids(40, seed=1)
    ctx, resp = ids[:8], ids[8:]
    check_head_path(model, ids)  # bf16 logits of model.forward agree within bf16 rounding
    with torch.no_grad():
        h = model.base_model(torch.tensor([ids])).last_hidden_state[0, 7:-1]  # (R, H) bf16
        w = model.get_output_embeddings().weight  # (V, H) bf16
        exact = torch.log_softmax(h.double() @ w.double().T, -1)[torch.arange(len(resp)), torch.tensor(resp)]
        bf16_logits = torch.log_softmax((h @ w.T).float(), -1)[torch.arange(len(resp)), torch.tensor(resp)]
    (got,) = response_logprobs(model, [ctx], [resp], max_tokens_per_batch=64, logits_chunk_tokens=7)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact.numpy(), atol=2e-5, rtol=0)
    # teeth: rounding the logits to bf16 first is off by far more than that
    assert float((bf16_logits.double() - exact).abs().max()) > 1e-3
