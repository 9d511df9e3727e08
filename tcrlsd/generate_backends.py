"""Generation backends: one registry, name -> factory, every factory returning a GenerationBackend.

``transformers`` (the default, CPU or one GPU) runs its own batched sampling loop over a Hugging Face
causal LM with a KV cache; ``vllm`` (GPUs, tensor parallel) hands token-id prompts to ``vllm.LLM``.
Both return :class:`tcrlsd.generation.Completion` records: the sampled ids with the EOS cut off,
the decoded text, and ``finish_reason`` "stop" or "length".

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

import hashlib
import inspect
from collections.abc import Callable, Sequence

from tcrlsd.generation import Completion, GenerationBackend, SamplingConfig

__all__ = [
    "BACKENDS",
    "VLLM_MISSING",
    "TransformersBackend",
    "VLLMBackend",
    "derive_seed",
    "make_backend",
    "plan_batches",
]

VLLM_MISSING = "the vllm backend needs `pip install tcrlsd[gpu]` on a CUDA machine"


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


def _stop_ids(tokenizer, model_config=None, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS plus the generation config's EOS list
    (Llama-3 instruct ends turns with <|eot_id|>, not its tokenizer EOS)."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), getattr(model_config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(int(x) for x in (source if isinstance(source, (list, tuple)) else [source]))
    if not ids:
        raise ValueError("the tokenizer and model config name no EOS token; cannot tell when a response ends")
    return tuple(sorted(ids))


def _check_sampling(sampling: SamplingConfig, samples_per_prompt: int) -> None:
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")


# --------------------------------------------------------------------------------------------------
# transformers


def _sample_next(logits, sampling: SamplingConfig, generator):
    """Next token per row from last-position logits ``(R, V)``; greedy when temperature == 0."""
    import torch

    if sampling.temperature == 0:
        return logits.argmax(dim=-1)  # (R,)
    logits = logits.float() / sampling.temperature  # (R, V)
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (R, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p  # (R, V)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (R, V)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)  # (R, V)
    return (probs / noise).argmax(dim=-1)  # (R,)


class TransformersBackend:
    """Batched sampling with a KV cache over any Hugging Face causal LM (see the module notes)."""

    def __init__(self, model, tokenizer, batch_size: int = 256, max_batch_tokens: int = 65536):
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.stop_ids = _stop_ids(tokenizer, model.config, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        # transformers 5 renamed the forward argument past_key_values -> cache.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        import torch

        _check_sampling(sampling, samples_per_prompt)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one (BOS) token")
        out: list[list[Completion]] = [[] for _ in prompts]
        batches = plan_batches([len(p) for p in prompts], samples_per_prompt, sampling.max_new_tokens,
                               self.batch_size, self.max_batch_tokens)
        with torch.inference_mode():
            for b, idxs in enumerate(batches):
                gen = torch.Generator(device=self.device).manual_seed(derive_seed(sampling.seed, b))
                rows = self._generate_batch([prompts[i] for i in idxs], samples_per_prompt, sampling, gen)
                for k, i in enumerate(idxs):
                    out[i] = [self._completion(ids, reason)
                              for ids, reason in rows[k * samples_per_prompt:(k + 1) * samples_per_prompt]]
        return out

    def _completion(self, ids: list[int], reason: str) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Completion(token_ids=tuple(ids), text=text, finish_reason=reason)

    def _new_cache(self, capacity: int):
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()
        layers = getattr(cache, "layers", None)
        prealloc = _preallocated_layer_class()
        if prealloc is not None and layers and all(type(x) is prealloc.__mro__[1] for x in layers):
            cache.layers = [prealloc(capacity) for _ in layers]
        return cache

    def _generate_batch(self, prompts, n: int, sampling: SamplingConfig, gen) -> list[tuple[list[int], str]]:
        """Sample ``n`` continuations of each prompt; rows ordered (prompt, sample)."""
        import torch

        dev = self.device
        B, L, T = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # (B, L) left padded
        mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
        for i, p in enumerate(prompts):
            input_ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, L - len(p):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) real tokens count from 0
        cache = self._new_cache(L + T)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                            use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1, :]  # (B, V)
        if n > 1:  # one prefill per prompt, then the group shares it
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)  # (R, V), R = B * n
            mask = mask.repeat_interleave(n, dim=0)  # (R, L)
            position = position.repeat_interleave(n, dim=0)
        R = B * n
        next_pos = position[:, -1:] + 1  # (R, 1)
        stop = torch.tensor(self.stop_ids, device=dev)
        tokens = torch.full((R, T), self.pad_id, dtype=torch.long, device=dev)  # (R, T)
        lengths = torch.full((R,), T, dtype=torch.long, device=dev)  # generated ids before EOS
        stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        alive = torch.arange(R, device=dev)  # rows of `tokens` still in the batch
        finished = torch.zeros(R, dtype=torch.bool, device=dev)  # per row of the batch: EOS seen
        for t in range(T):
            nxt = _sample_next(logits, sampling, gen)  # (r,)
            tokens[alive, t] = nxt  # rows already finished write past their length: ignored
            ended = torch.isin(nxt, stop) & ~finished  # (r,)
            if bool(ended.any()):
                lengths[alive[ended]] = t
                stopped[alive[ended]] = True
                finished |= ended
                n_finished = int(finished.sum())
                if n_finished == finished.numel():
                    break
                # Dropping rows copies the whole KV cache, so wait until a quarter of them are done.
                if 4 * n_finished >= finished.numel():
                    keep = (~finished).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    alive, nxt, mask, next_pos = alive[keep], nxt[keep], mask[keep], next_pos[keep]
                    finished = finished[keep]
            if t == T - 1:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)  # (r, L + t + 1)
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                                use_cache=True, **{self._cache_arg: cache}).logits[:, -1, :]  # (r, V)
            next_pos = next_pos + 1
        tokens, lengths, stopped = tokens.cpu(), lengths.tolist(), stopped.tolist()
        return [(tokens[r, :lengths[r]].tolist(), "stop" if stopped[r] else "length") for r in range(R)]


_PREALLOC = []


def _preallocated_layer_class():
    """A DynamicLayer that writes into a buffer sized for the whole batch instead of growing it.

    DynamicLayer appends each step's keys/values with torch.cat, copying the whole cache every
    step (O(T^2) memory traffic; on CPU the biggest cost of a large batch). This layer allocates
    (rows, heads, prompt + max_new_tokens, head_dim) once and hands attention a view of the filled
    prefix. Used only where the cache is made of plain DynamicLayers (transformers >= 4.56);
    otherwise the stock cache is kept.
    """
    if _PREALLOC:
        return _PREALLOC[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        _PREALLOC.append(None)
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_zeros((b, h, self.capacity, d))
            self._v = value_states.new_zeros((b, h, self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def _views(self):
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache of {self.capacity} positions overflowed ({end})")
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

    _PREALLOC.append(PreallocatedLayer)
    return PreallocatedLayer


def _make_transformers(
    model_path: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 256,
    max_batch_tokens: int = 65536,
    tensor_parallel_size: int = 1,  # vllm only; accepted so one options dict fits every backend
    gpu_memory_utilization: float = 0.9,  # vllm only
    seed: int = 0,  # vllm only (engine seed); sampling seeds come with each call
) -> TransformersBackend:
    from tcrlsd.policy import load_policy

    model, tokenizer = load_policy(model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return TransformersBackend(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)


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
    from tcrlsd.policy import load_tokenizer

    llm = LLM(
        model=str(model_path),
        tokenizer=str(model_path),
        tensor_parallel_size=tensor_parallel_size,
        dtype=_vllm_dtype(dtype),
        seed=seed,
        trust_remote_code=trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    try:
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(str(model_path))
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    return VLLMBackend(llm, load_tokenizer(model_path, trust_remote_code), generation_config)


BACKENDS: dict[str, Callable[..., GenerationBackend]] = {
    "transformers": _make_transformers,
    "vllm": _make_vllm,
}


def make_backend(name: str, model_path: str, **options) -> GenerationBackend:
    """Build backend ``name`` for the model at ``model_path``.

    Options (each backend accepts all, using those that apply): device, dtype, trust_remote_code,
    batch_size, max_batch_tokens (transformers); tensor_parallel_size, gpu_memory_utilization, seed
    (vllm).
    """
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    try:
        inspect.signature(factory).bind(model_path, **options)
    except TypeError:
        valid = [p for p in inspect.signature(factory).parameters if p != "model_path"]
        unknown = sorted(set(options) - set(valid))
        raise TypeError(
            f"generation backend {name!r}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        ) from None
    return factory(model_path, **options)
