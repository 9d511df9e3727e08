"""THE lm head: decoder hidden states -> fp32 logits -> log-probs (and entropy), written once.

Three places need the log-prob of a response token, and they must agree to the last bit that
float arithmetic allows: the score stage (the old log-probs of PPO and the Δ signal), the update's
trained forward (its first ratio must be 1) and the update's KL reference. All three run the
model's decoder once, gather the hidden states at the response positions only, and send them
through the head here, in chunks:

- :func:`split_model`: the decoder (``model.base_model``) and the output embedding; a model that
  cannot be split is refused by name.
- The projection runs in fp32 (hidden states and head weight cast up; then the head's bias): bf16
  logits cast afterwards would carry rounding errors of ~2^-8 of their size (0.05 nats at a logit of
  12), the order of the Δ-gap itself.
- Then the architecture's logit post-processing, from its config: :data:`LOGIT_POSTPROCESS`
  (Gemma-2/3 soft-cap, Granite ``logits_scaling``, Cohere ``logit_scale``). A causal LM's forward
  applies these after its lm head, so skipping one would give other numbers than
  ``model(ids).logits``; :func:`check_head_path` compares the two paths on one short sequence at
  load (both stages run it on the policy, the score stage on its teacher and the update on its
  reference) and refuses, naming the architecture, a model whose forward does anything else.
- :func:`token_logprobs` (log-softmax at the target) and :func:`logprobs_entropy` (plus the
  full-vocabulary entropy, differentiable: the update calls it under activation checkpointing).

torch is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tcrlsd.errors import TcrlsdError

__all__ = ["LOGIT_POSTPROCESS", "LmHeadError", "split_model", "postprocess_of", "head_logits", "token_logprobs",
           "logprobs_entropy", "FrozenHead", "check_head_path", "architecture"]

# What a causal LM's forward does to the lm head's output, by config attribute: name -> fn(logits, value),
# applied in this order to every attribute the (text) config sets to a value other than None / 0.
LOGIT_POSTPROCESS: dict[str, Callable] = {
    "final_logit_softcapping": lambda logits, cap: (logits / cap).tanh() * cap,  # Gemma-2/3
    "logits_scaling": lambda logits, scale: logits / scale,  # Granite
    "logit_scale": lambda logits, scale: logits * scale,  # Cohere
}

Post = tuple[tuple[str, float], ...]  # (config attribute, value) pairs in LOGIT_POSTPROCESS order


class LmHeadError(TcrlsdError, ValueError):
    """A model whose logits the project cannot reproduce from its decoder and head (names the architecture)."""


def architecture(model) -> str:
    """``ClassName`` or ``ClassName (config architecture)``, for messages."""
    names = getattr(model.config, "architectures", None) or []
    name = type(model).__name__
    return name if not names or names[0] == name else f"{name} ({names[0]})"


def split_model(model):
    """(decoder, head): ``model.base_model`` (returns ``last_hidden_state``) and its output embedding."""
    decoder, head = model.base_model, model.get_output_embeddings()
    if decoder is model or head is None or getattr(head, "weight", None) is None:
        raise LmHeadError(f"{architecture(model)}: cannot split the model into decoder and lm head")
    return decoder, head


def postprocess_of(model) -> Post:
    """The logit post-processing ``model``'s config asks for, as (attribute, value) pairs."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return tuple((key, getattr(config, key)) for key in LOGIT_POSTPROCESS if getattr(config, key, None) not in (None, 0))


def head_logits(hidden, weight, bias=None, post: Post = ()):
    """fp32 logits ``(n, V)`` of hidden states ``(n, H)`` (any dtype); differentiable in all tensors."""
    logits = hidden.float() @ weight.float().T  # (n, V) fp32
    if bias is not None:
        logits = logits + bias.float()
    for key, value in post:
        logits = LOGIT_POSTPROCESS[key](logits, value)
    return logits


def token_logprobs(logits, targets):
    """log p(targets) ``(n,)`` from fp32 logits ``(n, V)`` and target ids ``(n,)``."""
    import torch

    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def logprobs_entropy(hidden, weight, bias, targets, post: Post = ()):
    """(log p(targets) ``(n,)``, full-vocabulary entropy ``(n,)``) at hidden states ``(n, H)``.

    The update's trained forward, one chunk at a time (each chunk under activation checkpointing:
    only one chunk's ``(n, V)`` logits is ever alive, forward and backward).
    """
    import torch

    logits = head_logits(hidden, weight, bias, post)  # (n, V) fp32
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # (n,)
    probs = torch.softmax(logits, dim=-1)  # (n, V)
    entropy = lse - (probs * logits).sum(-1)  # (n,)  H = -sum p log p = lse - sum p * logit
    return logp, entropy


class FrozenHead:
    """A model's decoder and head for inference (score stage, KL reference): the head weight cast to
    fp32 once (no copy when it already is; V x H x 4 bytes, 1.6 GB for Llama-3.2-3B, while this lives)."""

    def __init__(self, model):
        self.decoder, head = split_model(model)
        self.weight = head.weight.detach().float()  # (V, H) fp32
        bias = getattr(head, "bias", None)
        self.bias = bias.detach().float() if bias is not None else None  # (V,)
        self.post = postprocess_of(model)

    @property
    def device(self):
        return self.weight.device

    def logits(self, h):
        """fp32 logits ``(n, V)`` of hidden states ``h`` ``(n, H)``."""
        return head_logits(h, self.weight, self.bias, self.post)

    def logprobs_at(self, input_ids, rows, cols, targets, chunk_tokens: int, **decoder_kwargs):
        """log p(targets[i]) from the logits at (rows[i], cols[i]) of ``input_ids`` ``(B, T)``: ``(N,)`` fp32.

        One decoder pass; only the gathered positions go through the head, ``chunk_tokens`` at a time.
        ``decoder_kwargs`` go to the decoder (the update's packed micro-batches: position ids and
        sequence bounds). Call under ``torch.inference_mode()``.
        """
        import torch

        hidden = self.decoder(input_ids=input_ids, use_cache=False, **decoder_kwargs).last_hidden_state  # (B, T, H)
        h = hidden[rows, cols]  # (N, H): only the response positions reach the lm head
        del hidden
        out = torch.empty(len(targets), dtype=torch.float32, device=h.device)  # (N,)
        for s in range(0, len(targets), chunk_tokens):
            out[s : s + chunk_tokens] = token_logprobs(self.logits(h[s : s + chunk_tokens]), targets[s : s + chunk_tokens])
        return out


def check_head_path(model, ids: Sequence[int]) -> None:
    """Raise :class:`LmHeadError`, naming the architecture, unless this module's head path reproduces
    ``model(ids).logits`` on ``ids`` (one short sequence).

    Tolerance per position: (2 eps(dtype) + 1e-4) x max |logit| + 1e-4, i.e. the rounding of the
    model's own logits in its dtype; a logit scale or soft-cap the path does not apply is far off.
    """
    import torch

    head = FrozenHead(model)
    x = torch.tensor([list(ids)], dtype=torch.long, device=head.device)  # (1, T)
    with torch.inference_mode():
        want = model(input_ids=x, use_cache=False).logits[0].float()  # (T, V)
        got = head.logits(head.decoder(input_ids=x, use_cache=False).last_hidden_state[0])  # (T, V)
    dtype = model.get_output_embeddings().weight.dtype
    scale = want.abs().amax(dim=-1, keepdim=True)  # (T, 1)
    tol = (2 * torch.finfo(dtype).eps + 1e-4) * scale + 1e-4  # (T, 1)
    err = (got - want).abs()  # (T, V)
    if bool((err > tol).any()):
        applied = ", ".join(f"{key}={value}" for key, value in head.post) or "none"
        raise LmHeadError(
            f"{architecture(model)}: the project's log-prob head (decoder hidden states x lm head in fp32, "
            f"post-processing applied: {applied}) and the model's forward logits differ by up to "
            f"{float(err.max()):.4g} (tolerance {float(tol.max()):.3g}) on a {x.shape[1]}-token check sequence; "
            "this architecture transforms its logits in a way the project does not reproduce (a logit scale or "
            "soft-cap?): add it to tcrlsd.lm_head.LOGIT_POSTPROCESS"
        )
