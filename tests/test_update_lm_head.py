"""One lm head (tcrlsd/lm_head.py) for the score stage, the update's trained forward and its KL
reference: for policies of several architectures -- each with its logit post-processing turned up
so that skipping it shows -- the update's first mini-batch reproduces the stored scores (ratio 1)
and the KL to the same checkpoint is 0.

Tiny random checkpoints built from transformers configs and saved as safetensors with the test
tokenizer; the scores come from the score stage's CLI (which runs the head check at load), the
update from ``run_update`` (which runs it too). (Named after test_update.py so that, like it, it runs
after the tests that fork: a verify worker forked from this process after these updates failed to
start, SystemError inside re.compile.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from test_update import FAST, make_iteration  # noqa: E402

from tcrlsd.update.params import UpdateParams  # noqa: E402

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=128, initializer_range=0.5)
# architecture -> (config class, what makes its forward differ from hidden @ W.T)
ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),  # the plain head: the control
    "Gemma2ForCausalLM": ("Gemma2Config", {"final_logit_softcapping": 0.5, "head_dim": 16}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 4.0}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.25}),
    "PhiForCausalLM": ("PhiConfig", {}),  # an lm head with a bias
}


def _policy(arch: str, tok, folder):
    from tcrlsd.policy import save_policy

    config_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                **SHAPE, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, arch)(config).eval()
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            torch.nn.init.normal_(head.bias, std=2.0)  # a bias that matters (it is initialised to 0)
    return model, save_policy(model, tok, folder)


@pytest.fixture(scope="module")
def tok(tiny_policy):
    from tcrlsd.policy import load_tokenizer

    return load_tokenizer(tiny_policy)


@pytest.mark.parametrize("arch", list(ARCHS))
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
