"""Decoding with one copy of each prompt's keys and values for its whole group (CPU).

A group's ``n`` samples share their prompt. The stock cache repeats the prompt's keys and values
``n`` times after prefill, and every decode step then streams all ``R = B * n`` copies from memory:
on a CPU, where a decode step of a small model is bound by memory traffic, that copy is most of the
attention's cost (the prompt is ~2/3 of the keys at the default shape). Here the cache keeps

- the prefix: each prompt's keys/values once, ``(G, kv_heads, L, d)`` (left padded, with its mask);
- the responses: each row's own keys/values, ``(R, kv_heads, T, d)``, written in place;

and the attention of a decode step is computed in two parts merged by their log-sum-exp (the
cascade/shared-prefix attention of inference engines): every row of a group attends to the group's
prefix in one kernel call with ``n`` queries, and to its own response keys in another, with no mask
(response positions are never padding). Same math as attention over the concatenated keys; floating
point sums differ at ~1e-7 relative (``tests/test_generate.py`` compares it with the plain cache).

Used by the transformers backend on CPU when the attention kernel that returns the log-sum-exp is
there (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``) and the model's attention
goes through transformers' attention interface (``set_attn_implementation``); otherwise the
backend keeps the stock path. Prefill and any call with more than one query per row fall back to
transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

ATTENTION_NAME = "tcrlsd_shared_prefix"

# The cache of the generate call in progress: the attention function reads its layers.
_ACTIVE: ContextVar = ContextVar("tcrlsd_shared_prefix_cache", default=None)
_LAYER_CLASS: list = []
_REGISTERED: list = []


def _flash_cpu():
    import torch

    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: a decode step over a :class:`SharedPrefixLayer`, else SDPA.

    ``query`` ``(r, h, q, d)``; for a decode step ``key``/``value`` are the rows' response keys
    ``(r, kv_heads, t, d)`` (the layer returned them) and the prefix comes from the layer.
    Returns ``((r, q, h, d), None)`` like transformers' attention functions."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = _ACTIVE.get()
    layer = None if cache is None else cache.layers[module.layer_idx]
    if layer is None or query.shape[2] != 1 or not layer.decoding or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    flash = _flash_cpu()
    r, h, _, d = query.shape
    kvh = key.shape[1]
    g = h // kvh  # query heads per key/value head (GQA): they become extra queries of that head
    n, G = layer.group_size, layer.prefix_k.shape[0]
    scale = scaling if scaling is not None else d ** -0.5
    q_rows = query.reshape(r, kvh, g, d)  # (r, kvh, g, d)
    # Prefix: the rows in their group's slots (scattered there once rows have been dropped), n * g
    # queries per group and head.
    if layer.slot is None:
        q_slots = q_rows
    else:
        q_slots = query.new_zeros((G * n, kvh, g, d))
        q_slots[layer.slot] = q_rows
    q_prefix = q_slots.view(G, n, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(G, kvh, n * g, d)
    out_p, lse_p = flash(q_prefix, layer.prefix_k, layer.prefix_v, attn_mask=layer.prefix_mask, scale=scale)
    # (G, kvh, n*g, d), (G, kvh, n*g) -> back to the rows: (r, kvh, g, d), (r, kvh, g)
    out_p = out_p.view(G, kvh, n, g, d).permute(0, 2, 1, 3, 4).reshape(G * n, kvh, g, d)
    lse_p = lse_p.view(G, kvh, n, g).permute(0, 2, 1, 3).reshape(G * n, kvh, g)
    if layer.slot is not None:
        out_p, lse_p = out_p[layer.slot], lse_p[layer.slot]
    # Responses: each row's own keys, all real positions (no mask).
    out_r, lse_r = flash(q_rows, key, value, scale=scale)  # (r, kvh, g, d), (r, kvh, g)
    lse = torch.logaddexp(lse_p, lse_r)  # softmax over both parts = each part's, reweighted
    out = (out_p * (lse_p - lse).exp().unsqueeze(-1).to(out_p.dtype)
           + out_r * (lse_r - lse).exp().unsqueeze(-1).to(out_r.dtype))
    return out.reshape(r, 1, h, d), None


def write_in_place(k_buf, v_buf, start: int, keys, values, what: str) -> int:
    """Write ``keys``/``values`` ``(b, h, t, d)`` into preallocated buffers ``(b, h, capacity, d)`` at
    positions ``start..start+t``; returns the new filled length (a RuntimeError past the capacity)."""
    end = start + keys.shape[-2]
    if end > k_buf.shape[2]:
        raise RuntimeError(f"{what} of {k_buf.shape[2]} positions overflowed ({end})")
    k_buf[:, :, start:end] = keys
    v_buf[:, :, start:end] = values
    return end


def layer_class():
    """The cache layer class (built on first use: it subclasses transformers' DynamicLayer)."""
    if _LAYER_CLASS:
        return _LAYER_CLASS[0]
    import torch
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """Prefill stores the prompts once; decode steps append to per-row response buffers."""

        def __init__(self, max_new_tokens: int):
            super().__init__()
            self.capacity = max_new_tokens
            self.group_size = 1
            self.prefix_k = self.prefix_v = self.prefix_mask = None
            self.resp_k = self.resp_v = None
            self.resp_len = 0
            # (r,) each live row's index in the (group, sample) grid of the prefix; None: row i is slot i
            self.slot = None

        def set_prefix_mask(self, mask_2d) -> None:
            """The prompts' 2-D padding mask ``(B, L)``, 1 = real token; kept additive (0 / -inf) in
            the keys' dtype ``(B, 1, 1, L)``, the form the CPU kernel takes."""
            if bool(mask_2d.all()):
                self.prefix_mask = None
                return
            additive = torch.zeros(mask_2d.shape, dtype=self.prefix_k.dtype, device=self.device)
            self.prefix_mask = additive.masked_fill(mask_2d == 0, float("-inf"))[:, None, None, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:  # prefill: the prompts, once
                self.device = key_states.device
                self.prefix_k, self.prefix_v = key_states, value_states
                self.is_initialized = True
                self.keys, self.values = key_states, value_states
                return key_states, value_states
            if self.resp_k is None:
                r, kvh, _, d = key_states.shape
                self.resp_k = key_states.new_zeros((r, kvh, self.capacity, d))
                self.resp_v = value_states.new_zeros((r, kvh, self.capacity, value_states.shape[-1]))
            self.resp_len = write_in_place(self.resp_k, self.resp_v, self.resp_len, key_states, value_states,
                                           "response cache")
            return self.resp_k[:, :, :self.resp_len], self.resp_v[:, :, :self.resp_len]

        @property
        def decoding(self) -> bool:
            """A decode step has written its keys (the response buffers exist)."""
            return self.resp_k is not None

        def get_seq_length(self) -> int:
            return 0 if not self.is_initialized else self.prefix_k.shape[-2] + self.resp_len

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.resp_k is not None:
                raise RuntimeError("the shared-prefix cache repeats its rows only right after prefill")
            if self.is_initialized:
                self.group_size = repeats

        def batch_select_indices(self, indices) -> None:
            if not self.is_initialized:
                return
            if self.resp_k is not None:
                self.resp_k, self.resp_v = self.resp_k[indices], self.resp_v[indices]
            slot = indices if self.slot is None else self.slot[indices]
            groups = slot // self.group_size
            live = torch.unique(groups)  # sorted
            if live.numel() < self.prefix_k.shape[0]:  # whole groups done: drop their prompts
                self.prefix_k, self.prefix_v = self.prefix_k[live], self.prefix_v[live]
                if self.prefix_mask is not None:
                    self.prefix_mask = self.prefix_mask[live]
                slot = torch.searchsorted(live, groups) * self.group_size + slot % self.group_size
            self.slot = slot

    _LAYER_CLASS.append(SharedPrefixLayer)
    return SharedPrefixLayer


def usable(model) -> bool:
    """Whether the shared-prefix path can run for ``model``: on CPU, with the kernel that returns
    the log-sum-exp, for a model whose attention layers go through transformers' interface."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    if device.type != "cpu" or _flash_cpu() is None:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":  # prefill falls back to SDPA
        return False
    if not hasattr(model, "set_attn_implementation"):
        return False
    return _register()


def _register() -> bool:
    """Register the attention and mask functions with transformers once per process."""
    if _REGISTERED:
        return _REGISTERED[0]
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        _REGISTERED.append(False)
        return False
    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _REGISTERED.append(True)
    return True


@contextlib.contextmanager
def activated(model, cache):
    """Route ``model``'s attention through :func:`shared_prefix_attention` for ``cache``; restore
    the model's own implementation after."""
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(before)
