"""The ``transformers`` generation backend (CPU or GPU, any Hugging Face causal LM)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from tcrlsd.generate import shared_prefix
from tcrlsd.generate.backend_base import check_sampling, derive_seed, plan_batches, resolve_stop_ids
from tcrlsd.generation import Completion, SamplingConfig

# --------------------------------------------------------------------------------------------------
# transformers


def sample_next(logits, sampling: SamplingConfig, generator):
    """Next token per row from last-position logits ``(R, V)``, and its log-probability under the
    distribution it was drawn from (after temperature and top_p; greedy: the raw log-softmax), the
    sampler log-prob of :mod:`tcrlsd.generation`. Returns ``((R,) ids, (R,) float32 log-probs)``."""
    import torch

    if sampling.temperature == 0:
        nxt = logits.argmax(dim=-1)  # (R,)
        return nxt, _chosen_logprob(logits.float(), nxt)
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
    nxt = (probs / noise).argmax(dim=-1)  # (R,)
    return nxt, _chosen_logprob(logits, nxt)


def _chosen_logprob(logits, chosen):
    """log softmax(logits)[chosen] per row, in fp32: ``(R, V), (R,) -> (R,)``."""
    return (logits.gather(1, chosen[:, None]).squeeze(1) - logits.logsumexp(dim=-1)).float()


class TransformersBackend:
    """Batched sampling with a KV cache over any Hugging Face causal LM (see the module notes)."""

    def __init__(self, model, tokenizer, batch_size: int = 256, max_batch_tokens: int = 65536,
                 shared_prefix: bool = True):
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        # One copy of a prompt's keys/values for its group while decoding (tcrlsd/generate/shared_prefix.py).
        self.shared_prefix = bool(shared_prefix)
        self.stop_ids = resolve_stop_ids(tokenizer, model.config, getattr(model, "generation_config", None))
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

        check_sampling(sampling, samples_per_prompt)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one (BOS) token")
        out: list[list[Completion]] = [[] for _ in prompts]
        batches = plan_batches([len(p) for p in prompts], samples_per_prompt, sampling.max_new_tokens,
                               self.batch_size, self.max_batch_tokens)
        shared = self.shared_prefix and samples_per_prompt > 1 and shared_prefix.usable(self.model)
        with torch.inference_mode():
            for b, idxs in enumerate(batches):
                gen = torch.Generator(device=self.device).manual_seed(derive_seed(sampling.seed, b))
                rows = self._generate_batch([prompts[i] for i in idxs], samples_per_prompt, sampling, gen, shared)
                for k, i in enumerate(idxs):
                    out[i] = [self._completion(ids, reason, lps)
                              for ids, reason, lps in rows[k * samples_per_prompt:(k + 1) * samples_per_prompt]]
        return out

    def _completion(self, ids: list[int], reason: str, logprobs: list[float]) -> Completion:
        # The stop id is a token of the response (scored, trained) but not part of its text.
        body = ids[:-1] if reason == "stop" else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Completion(token_ids=tuple(ids), text=text, finish_reason=reason, logprobs=tuple(logprobs))

    def _new_cache(self, prompt_len: int, max_new_tokens: int, shared: bool):
        """A DynamicCache whose layers are preallocated (or, with ``shared``, keep the prompts once
        per group: :mod:`tcrlsd.generate.shared_prefix`); the stock one where that cannot be done.
        Returns ``(cache, shared)``: whether the shared-prefix layers are in use."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache(), False
        layers = getattr(cache, "layers", None)
        prealloc = _preallocated_layer_class()
        if prealloc is None or not layers or not all(type(x) is prealloc.__mro__[1] for x in layers):
            return cache, False
        if shared:
            cls = shared_prefix.layer_class()
            cache.layers = [cls(max_new_tokens) for _ in layers]
        else:
            cache.layers = [prealloc(prompt_len + max_new_tokens) for _ in layers]
        return cache, shared

    def _generate_batch(self, prompts, n: int, sampling: SamplingConfig, gen,
                        shared: bool = False) -> list[tuple[list[int], str, list[float]]]:
        """Sample ``n`` continuations of each prompt: (ids, finish reason, sampler log-probs) per row,
        rows ordered (prompt, sample)."""
        cache, shared = self._new_cache(max(len(p) for p in prompts), sampling.max_new_tokens, shared)
        if not shared:
            return self._decode(prompts, n, sampling, gen, cache)
        with shared_prefix.activated(self.model, cache):
            return self._decode(prompts, n, sampling, gen, cache)

    def _decode(self, prompts, n: int, sampling: SamplingConfig, gen, cache) -> list[tuple[list[int], str, list[float]]]:
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
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                            use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1, :]  # (B, V)
        for layer in getattr(cache, "layers", ()):
            if hasattr(layer, "set_prefix_mask"):
                layer.set_prefix_mask(mask)
        if n > 1:  # one prefill per prompt, then the group shares it
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)  # (R, V), R = B * n
            mask = mask.repeat_interleave(n, dim=0)  # (R, L)
            position = position.repeat_interleave(n, dim=0)
        R = B * n
        next_pos = position[:, -1:] + 1  # (R, 1)
        stop = torch.tensor(self.stop_ids, device=dev)
        tokens = torch.full((R, T), self.pad_id, dtype=torch.long, device=dev)  # (R, T)
        token_logprobs = torch.zeros((R, T), dtype=torch.float32, device=dev)  # (R, T) sampler log-probs
        lengths = torch.full((R,), T, dtype=torch.long, device=dev)  # response ids, the stop id included
        stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        alive = torch.arange(R, device=dev)  # rows of `tokens` still in the batch
        finished = torch.zeros(R, dtype=torch.bool, device=dev)  # per row of the batch: EOS seen
        for t in range(T):
            nxt, nxt_logprob = sample_next(logits, sampling, gen)  # (r,), (r,)
            tokens[alive, t] = nxt  # rows already finished write past their length: ignored
            token_logprobs[alive, t] = nxt_logprob
            ended = torch.isin(nxt, stop) & ~finished  # (r,)
            if bool(ended.any()):
                lengths[alive[ended]] = t + 1  # the stop id is the response's last token
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
        tokens, token_logprobs, lengths, stopped = tokens.cpu(), token_logprobs.cpu(), lengths.tolist(), stopped.tolist()
        return [(tokens[r, :lengths[r]].tolist(), "stop" if stopped[r] else "length",
                 token_logprobs[r, :lengths[r]].tolist()) for r in range(R)]


_PREALLOC = []


def _preallocated_layer_class():
    """A DynamicLayer that writes into a buffer sized for the whole batch instead of growing it.

    DynamicLayer appends each step's keys/values with torch.cat, copying the whole cache every
    step (O(T^2) memory traffic; on CPU the biggest cost of a large batch). This layer allocates
    (rows, heads, prompt + max_new_tokens, head_dim) once and hands attention a view of the filled
    prefix. Used only where the cache is made of plain DynamicLayers (transformers >= 4.57, whose
    DynamicLayer has ``is_initialized``); otherwise the stock cache is kept.
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
            self.length = shared_prefix.write_in_place(self._k, self._v, self.length, key_states, value_states, "KV cache")
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


def make_transformers(
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
