"""Critic backends: one registry, name -> factory, every factory returning a :class:`Critic`.

A critic turns :class:`CritiqueRequest` records (a rendered critic prompt plus the structured row it
came from) into :class:`CriticReply` records (feedback text, or the reason there is none). Backends:

- ``reference``: the embedded default for the synthetic task. No model: it parses the rollout's step
  lines (``a op b = r``) and the gold step-by-step solution (:mod:`tcrlsd.synthetic` format) and
  names the FIRST wrong step in plain words. Deterministic. It reads the structured row, not the
  rendered prompt. Leakage policy: it states the right result of a wrong intermediate step (that is
  what a good critic does), but never the right result of the LAST step nor the value to box, since
  both are the gold final answer -- unless ``reference_reveal_final_answer`` is on. An intermediate
  result can still equal the final answer by coincidence; the leakage metric counts those honestly.
- ``transformers`` / ``vllm``: any chat model path, through the generation backends of
  :mod:`tcrlsd.generate.backends`; the prompt is rendered with the critic tokenizer's chat template
  when it has one. ``self`` mode uses the same class with the policy checkpoint.
- ``openai``: any OpenAI-compatible server (``/chat/completions``, or ``/completions`` for models without
  a chat template; ``endpoint``), e.g. vLLM's: a thread pool
  of ``max_concurrency`` requests, a per-request socket timeout, retries with exponential backoff and
  jitter seeded from (seed, rollout_id, attempt). The API key is read from the environment variable
  named by ``api_key_env`` at call time, sent only in the Authorization header, and scrubbed from
  any error text; it is never stored on the object, in a file, a log or an error.

Replies from model critics are cleaned: a ``<think>...</think>`` block (reasoning models) is
dropped, whitespace is stripped, and the text is cut to ``max_feedback_chars``.

torch, transformers and vllm are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from tcrlsd.critique.openai_critic import make_openai
from tcrlsd.critique.protocol import Critic, CritiqueRequest, OnReply, clean_feedback
from tcrlsd.errors import InputError
from tcrlsd.generation import PROMPT_TOO_LONG, Completion, SamplingConfig
from tcrlsd.reference_critic import REFERENCE_CRITIC_ID, CriticReply, noise_draw, reference_critique
from tcrlsd.templates import render_chat  # noqa: F401  (re-exported: tcrlsd.critique.render_chat)

if TYPE_CHECKING:  # the params module imports this registry: annotation only
    from tcrlsd.critique.params import CritiqueParams


class ReferenceCritic:
    label = "reference"
    journaled = False  # instant and deterministic: nothing to lose
    template_id = REFERENCE_CRITIC_ID

    def __init__(self, reveal_final_answer: bool = False, noise: float = 0.0, seed: int = 0):
        self.reveal_final_answer = reveal_final_answer
        self.noise = noise  # critique.reference_noise: share of critiques made wrong (noise_draw)
        self.seed = seed

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        for i, r in enumerate(requests):
            kind, rng = noise_draw(self.noise, self.seed, r.rollout_id)
            on_reply(i, reference_critique(r.response_text, r.gold_solution, self.reveal_final_answer, kind, rng))


def _make_reference(params: "CritiqueParams", model: str) -> Critic:
    return ReferenceCritic(params.reference_reveal_final_answer, params.reference_noise, params.seed)


# --------------------------------------------------------------------------------------------------
# transformers / vllm (and self mode): through the generation backends


class GenerationCritic:
    """A chat model (or the policy itself, in ``self`` mode) run through a generation backend.

    A backend that streams (``vllm``: ``stream``) gets all of a part's requests in one call, each seeded
    from (seed, rollout_id), and every reply is reported (so journalled) as soon as its request
    finishes: a resumed part regenerates exactly the rows that were not answered, with the same seeds.
    Other backends get fixed chunks of ``chunk_rows`` requests, each chunk's replies reported when it
    finishes, so the journal keeps whole chunks and a resumed part regenerates whole chunks of the
    same composition (the transformers backend's samples depend on batch composition).

    A prompt that does not fit the model's context is a per-row error, not a failed part.
    """

    journaled = True
    template_id = None

    def __init__(self, backend: str, model_path: str, options: dict, sampling: SamplingConfig,
                 max_feedback_chars: int, chunk_rows: int = 64, chat_template_kwargs: dict | None = None,
                 label: str | None = None):
        self.backend_name = backend
        self.model_path = model_path
        self.options = dict(options)
        self.sampling = sampling
        self.max_feedback_chars = max_feedback_chars
        self.chunk_rows = max(1, chunk_rows)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.label = label or f"{backend}:{model_path}"
        self._backend = None
        self._tokenizer = None

    def _load(self):
        if self._backend is None:
            from tcrlsd.generate.backends import make_backend
            from tcrlsd.policy import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path, self.options.get("trust_remote_code", False))
            self._backend = make_backend(self.backend_name, self.model_path, **self.options)
        return self._backend, self._tokenizer

    def _reply(self, completion: Completion, prompt_len: int, backend) -> CriticReply:
        if completion.finish_reason == PROMPT_TOO_LONG:
            return CriticReply(None, f"critic prompt too long: {prompt_len} tokens, the model's context is "
                                     f"{getattr(backend, 'max_model_len', '?')}")
        return clean_feedback(completion.text, self.max_feedback_chars)

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        if not requests:
            return
        from tcrlsd.generate.backend_base import derive_seed
        from tcrlsd.policy import encode_prompt

        backend, tok = self._load()
        ids = [encode_prompt(tok, render_chat(tok, r.prompt, self.chat_template_kwargs)) for r in requests]
        if hasattr(backend, "stream"):
            seeds = [derive_seed(self.sampling.seed, r.rollout_id) & 0x7FFFFFFF for r in requests]
            for i, group in backend.stream(ids, 1, self.sampling, seeds=seeds):
                on_reply(i, self._reply(group[0], len(ids[i]), backend))
            return
        for start in range(0, len(requests), self.chunk_rows):
            chunk = ids[start:start + self.chunk_rows]
            outs = backend.generate(chunk, 1, self.sampling)
            for j, group in enumerate(outs):
                on_reply(start + j, self._reply(group[0], len(chunk[j]), backend))


def _make_generation(backend: str):
    def factory(params: "CritiqueParams", model: str) -> Critic:
        if not model:
            raise InputError(f"critic {backend!r} needs a model: set critique.critic_model to a model path")
        return GenerationCritic(backend, model, params.engine.options(), params.sampling_config(),
                                params.max_feedback_chars, params.chunk_rows, params.chat_template_kwargs)

    return factory


# --------------------------------------------------------------------------------------------------

CRITICS: dict[str, Callable[["CritiqueParams", str], Critic]] = {
    "reference": _make_reference,
    "transformers": _make_generation("transformers"),
    "vllm": _make_generation("vllm"),
    "openai": make_openai,
}


def make_critic(name: str, params: "CritiqueParams", model: str) -> Critic:
    try:
        factory = CRITICS[name]
    except KeyError:
        raise ValueError(f"unknown critic backend {name!r}; choose one of {', '.join(CRITICS)}") from None
    return factory(params, model)
