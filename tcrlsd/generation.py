"""The generation interface shared by rollouts (generate stage) and self-critique (critique stage).

A backend turns prompt token ids into sampled completions. Backends live in one registry
(``tcrlsd.generate.backends.BACKENDS``, name -> factory); all return the same :class:`Completion`
records, so the stages never know which engine ran.

The stop-token contract (every backend keeps it; :func:`check_completions` enforces it):

- ``finish_reason == "stop"``: the response ended because a stop id was sampled (one of the
  backend's ``stop_ids``: the tokenizer's EOS plus the generation config's EOS list, e.g. Llama-3's
  ``<|eot_id|>``). ``token_ids`` END WITH that stop id: "stop here" is an action the policy took,
  so the score, advantages and update stages cover it like any other token (verl and TRL keep the
  first EOS inside the response mask; without it the policy could never learn when to end).
  Nothing after the first stop id is kept. No stop strings are used, so "stop" always means a stop id.
- ``finish_reason == "length"``: ``max_new_tokens`` ids were sampled and none was a stop id (fewer
  only where the prompt and the response filled the model's context, e.g. vLLM's ``max_model_len``);
  the last id is not a stop id.
- ``text`` is the decoded ids WITHOUT the trailing stop id, special tokens skipped (what verify and
  the critic read).
- ``logprobs`` (one per id, or empty where a backend does not give them) is the sampler's log-probability
  of each sampled id under the distribution it was drawn from: the model's logits divided by the
  temperature, then nucleus-filtered (top_p) and renormalised -- vLLM's ``processed_logprobs``. This is
  the behaviour policy mu that truncated importance sampling divides by (``tcrlsd.offpolicy``). At
  temperature 1 and top_p 1 it is the model's own log-softmax, so against the score stage's
  log-probs it measures numerics alone (dtype, kernels). Greedy rows (temperature 0) get the raw
  log-softmax (the distribution at temperature 1; vLLM does the same for greedy requests).

The params every model-running section shares (generate, evaluate, and critique's transformers /
vllm critics and self mode) are two nested dataclasses, one definition each: ``SECTION.sampling``
(:class:`SamplingParams`) and ``SECTION.engine`` (:class:`EngineParams`: device, dtype and the
backends' load and batching options). The backend name and the seed stay in the section: the
seed also drives what the section samples from, and critique picks its backend by ``critic``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

__all__ = ["PROMPT_TOO_LONG", "SamplingConfig", "SamplingParams", "EngineParams", "Completion", "GenerationBackend",
           "check_completions"]

# finish_reason of a row whose prompt alone fills the model's context (vllm backend): no ids, no text.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


@dataclass(frozen=True)
class SamplingParams:
    """``SECTION.sampling`` of params.yaml (generate, evaluate, critique): how responses are sampled.

    Each section's default is its own params.yaml value (a field default such as
    ``SamplingParams(temperature=0.6)``); a partial mapping keeps the section's other values.
    """

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 = off
    max_new_tokens: int = 96  # response cap in tokens

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def config(self, seed: int) -> SamplingConfig:
        """What a backend's ``generate`` takes, with this call's seed."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              seed=seed)


@dataclass(frozen=True)
class EngineParams:
    """``SECTION.engine`` of params.yaml (generate, evaluate, critique): how a generation backend
    (``tcrlsd.generate.backends.BACKENDS``) loads and runs the model. Every backend gets the whole
    set and takes the options its factory knows (``make_backend``)."""

    device: str = "cpu"  # transformers: cpu | cuda | cuda:N (vllm places the model itself)
    dtype: str = "auto"  # auto (tcrlsd.policy.resolve_dtype: float32 on CPU, bfloat16 on CUDA) | float32 | ...
    trust_remote_code: bool = False  # allow model code shipped with a checkpoint
    batch_size: int = 256  # transformers: most sequences per batch
    max_batch_tokens: int = 65536  # transformers: most sequences x (longest prompt + max_new_tokens) per batch
    tensor_parallel_size: int = 1  # vllm: GPUs per model replica
    gpu_memory_utilization: float = 0.9  # vllm: share of GPU memory the engine may take
    max_model_len: int = 0  # vllm: context positions; 0 = the model's own
    engine_args: dict = field(default_factory=dict)  # vllm: further vllm.LLM arguments, passed as is

    def __post_init__(self) -> None:
        from tcrlsd.policy import DTYPES

        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"engine.device must be cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("batch_size", "max_batch_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 0:
            raise ValueError(f"engine.max_model_len must be >= 0 (0 = the model's own), got {self.max_model_len}")
        if not isinstance(self.engine_args, dict):
            raise ValueError(f"engine.engine_args must be a mapping of vllm.LLM arguments, got {self.engine_args!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def options(self, seed: int | None = None) -> dict:
        """The backend options (``make_backend(name, path, **options)``); ``seed``: vllm's engine seed."""
        out = {"device": self.device, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code,
               "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
               "tensor_parallel_size": self.tensor_parallel_size,
               "gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len,
               "engine_args": dict(self.engine_args)}
        if seed is not None:
            out["seed"] = seed
        return out


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # the sampled ids, never re-tokenised text; a "stop" one ends with its stop id
    text: str  # decoded token_ids without the trailing stop id, special tokens skipped
    finish_reason: str  # "stop" (a stop id was sampled, and is the last id) or "length" (max_new_tokens ids)
    logprobs: tuple[float, ...] = ()  # sampler log-prob of each id (module notes); () = not given


class GenerationBackend(Protocol):
    stop_ids: tuple[int, ...]  # every id that ends a response (see the module's stop-token contract)

    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """For each prompt (token ids), ``samples_per_prompt`` completions, in order.

        Deterministic: the same prompts, sampling config (seed included) and weights give the same
        completions on CPU.
        """
        ...


def check_completions(groups: Sequence[Sequence[Completion]], stop_ids: Sequence[int], max_new_tokens: int,
                      backend: str = "generation backend") -> None:
    """Raise if ``groups`` break the stop-token contract (module docstring); the error names the row.

    Every "stop" completion ends with a stop id and holds no other; every "length" completion has
    1..``max_new_tokens`` ids (fewer only when the context filled up), none of them a stop id.
    """
    stops = {int(t) for t in stop_ids}
    for i, group in enumerate(groups):
        for j, c in enumerate(group):
            where = f"{backend}: prompt {i} sample {j}"
            ids = c.token_ids
            if c.logprobs and len(c.logprobs) != len(ids):
                raise RuntimeError(f"{where}: {len(c.logprobs)} sampler log-probs for {len(ids)} ids; one per id")
            if c.finish_reason == "stop":
                if not ids or ids[-1] not in stops:
                    raise RuntimeError(f"{where}: finish_reason 'stop' but the ids do not end with a stop id "
                                       f"{sorted(stops)} (last id {ids[-1] if ids else None}); the stop id must "
                                       "be the response's last token")
                if any(t in stops for t in ids[:-1]):
                    raise RuntimeError(f"{where}: a stop id occurs before the end of the response")
            elif c.finish_reason == "length":
                if not 0 < len(ids) <= max_new_tokens or any(t in stops for t in ids):
                    raise RuntimeError(f"{where}: finish_reason 'length' needs 1..{max_new_tokens} ids and no stop id; "
                                       f"got {len(ids)} ids" + (" with a stop id" if any(t in stops for t in ids)
                                                                else ""))
            elif c.finish_reason == PROMPT_TOO_LONG:  # the vllm backend's row error: no response at all
                if ids or c.text:
                    raise RuntimeError(f"{where}: finish_reason {PROMPT_TOO_LONG!r} must have no ids and no text")
            else:
                raise RuntimeError(f"{where}: finish_reason {c.finish_reason!r}; expected 'stop', 'length' or "
                                   f"{PROMPT_TOO_LONG!r}")
