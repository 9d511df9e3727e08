"""The ``vllm`` generation backend (GPU, optional extra ``tcrlsd[gpu]``)."""

from __future__ import annotations

from collections.abc import Sequence

from tcrlsd.generate.backend_base import VLLM_MISSING, _check_sampling, _stop_ids, derive_seed
from tcrlsd.generation import Completion, SamplingConfig

# --------------------------------------------------------------------------------------------------
# vllm


def _vllm_dtype(dtype: str) -> str:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return aliases.get(dtype, dtype)


class VLLMBackend:
    """``vllm.LLM`` over token-id prompts; one request per prompt with ``SamplingParams(n=...)``.

    Each request carries its own seed, derived from (sampling.seed, prompt index), so a prompt's
    samples do not depend on what else the engine batched with it.
    """

    def __init__(self, llm, tokenizer, generation_config=None):
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(tokenizer, None, generation_config)

    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        _check_sampling(sampling, samples_per_prompt)
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        params = [
            SamplingParams(
                n=samples_per_prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=derive_seed(sampling.seed, i) & 0x7FFFFFFF,
                stop_token_ids=list(self.stop_ids),
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        results = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        out: list[list[Completion]] = []
        for res in results:
            group = []
            for c in sorted(res.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                # vLLM keeps the EOS / stop id as the last output id; the contract excludes it.
                if ids and ids[-1] in self.stop_ids and c.finish_reason == "stop":
                    ids = ids[:-1]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vllm finished prompt {res.request_id!r} sample {c.index} with "
                                       f"finish_reason {c.finish_reason!r}; expected 'stop' or 'length'")
                reason = c.finish_reason
                text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                group.append(Completion(token_ids=tuple(ids), text=text, finish_reason=reason))
            out.append(group)
        return out


def _make_vllm(
    model_path: str,
    *,
    device: str = "cuda",  # vLLM places the model itself
    dtype: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 256,  # transformers only
    max_batch_tokens: int = 65536,  # transformers only
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
) -> VLLMBackend:
    try:
        from vllm import LLM
    except ImportError as exc:
        raise ImportError(f"{VLLM_MISSING} (import failed: {exc})") from None
    from tcrlsd.policy import load_generation_config, load_tokenizer

    llm = LLM(
        model=str(model_path),
        tokenizer=str(model_path),
        tensor_parallel_size=tensor_parallel_size,
        dtype=_vllm_dtype(dtype),
        seed=seed,
        trust_remote_code=trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    return VLLMBackend(llm, load_tokenizer(model_path, trust_remote_code), load_generation_config(model_path))
