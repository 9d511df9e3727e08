"""Attention kept within each sequence of a packed row: the update's packed micro-batches.

A packed micro-batch is one row holding several sequences end to end, position ids restarting at
0 for each (:mod:`tcrlsd.update.microbatch`). The decoder then needs an attention that never looks
across a sequence boundary. Two ways, by the model's attention implementation:

- ``flash_attention_2`` / ``flash_attention_3`` (GPU, when the policy is loaded with it):
  flash-attention's varlen kernel, through transformers' own support for the ``cu_seq_lens_*`` /
  ``max_length_*`` keyword arguments the micro-batch passes. Nothing is switched.
- ``sdpa`` (the default on CPU and GPU) and ``eager``: the model is switched to an attention
  function registered here (:data:`PACKED_ATTENTION`) that runs the model's own implementation on
  each sequence's slice of the row, causal within it (SDPA with ``is_causal``; eager with a causal
  additive mask, sliding window and soft-cap as the model sets them). Per sequence, not one call
  with a block-diagonal (T, T) mask (what transformers builds by itself for SDPA when it sees
  restarting position ids): the attention work stays sum_i L_i^2, not (sum_i L_i)^2, and no
  (T, T) mask is built (a 4096-token row of 40 sequences would do ~40x the attention work of its parts).

A call without ``cu_seq_lens_q`` (the load-time head check, an unpacked batch) treats each row as
one sequence: right-padded rows stay correct, since real tokens never attend to later positions.

Shared prompts (``update.share_prompts``, the micro-batch's ``tcrlsd_prefix_groups``): a prompt is
in the row once, followed by its responses. The prompt attends causally to itself; each response's
queries attend to the prompt's keys and causally to their own (a (L, P + L) mask, bottom-right
aligned), never to a sibling's: per response the same attention as in a row of its own, with the
prompt's keys and values computed once for the group.

torch and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import sys
from typing import Callable

from tcrlsd.update.params import UpdateError

__all__ = ["PACKED_ATTENTION", "NATIVE_VARLEN", "enable_packed_attention"]

_PREFIX = "tcrlsd_packed_"
# implementations whose transformers integration already reads cu_seq_lens_* (flash-attention varlen)
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3")
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _sdpa_one(module, q, k, v, mask_unused, kwargs):
    """transformers' own SDPA on one sequence, no mask: it then runs SDPA with is_causal (as unpacked)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]


def _eager_one(module, q, k, v, mask, kwargs):
    """The model file's own eager attention on one sequence with its causal (+ window) additive mask."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return fn(module, q, k, v, mask, **kwargs)[0]


def _causal_keep(length: int, window, device, prefix: int = 0):
    """(L, prefix + L) bool: query i (at position prefix + i) sees key j when j <= prefix + i (and
    prefix + i - j < window)."""
    import torch

    i = torch.arange(length, device=device)[:, None] + prefix
    j = torch.arange(prefix + length, device=device)[None, :]
    keep = j <= i
    if window:
        keep = keep & (i - j < window)
    return keep


def _causal_additive(length: int, window, dtype, device, prefix: int = 0):
    """(1, 1, L, prefix + L) additive mask of :func:`_causal_keep`: 0 where seen, else the dtype's min."""
    import torch

    keep = _causal_keep(length, window, device, prefix)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


def _sdpa_prefixed(module, q, k, v, prefix, window, kwargs):
    """transformers' SDPA for a response after a shared prompt: its bool mask, prompt keys all seen."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _causal_keep(q.shape[2], window, q.device, prefix)[None, None]
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


def _eager_prefixed(module, q, k, v, prefix, window, kwargs):
    return _eager_one(module, q, k, v, _causal_additive(q.shape[2], window, q.dtype, q.device, prefix), kwargs)


# model's attention implementation -> (function attending one sequence, whether it needs the causal mask,
# function attending one response after a shared prompt)
PACKED_ATTENTION: dict[str, tuple[Callable, bool, Callable]] = {
    "sdpa": (_sdpa_one, False, _sdpa_prefixed),
    "eager": (_eager_one, True, _eager_prefixed),
}


def _shared_prompts(one, needs_mask, prefixed, module, query, key, value, groups, kwargs):
    """The packed row of prompt groups (one row): each prompt causal on itself, each response on the
    prompt and itself. Returns (1, T, H, d)."""
    import torch

    if query.shape[0] != 1:
        raise UpdateError(f"a packed micro-batch is one row, got {query.shape[0]} rows")
    window = kwargs.get("sliding_window")
    parts = []
    for start, plen, responses in groups:
        sl = slice(start, start + plen)
        qp, kp, vp = query[:, :, sl], key[:, :, sl], value[:, :, sl]
        parts.append(one(module, qp, kp, vp, _causal_additive(plen, window, qp.dtype, qp.device) if needs_mask
                         else None, kwargs))
        for rs, rlen in responses:
            r = slice(rs, rs + rlen)
            k = torch.cat([kp, key[:, :, r]], dim=2)
            v = torch.cat([vp, value[:, :, r]], dim=2)
            parts.append(prefixed(module, query[:, :, r], k, v, plen, window, kwargs))
    return torch.cat(parts, dim=1)


def _packed_forward(impl: str):
    one, needs_mask, prefixed = PACKED_ATTENTION[impl]

    def forward(module, query, key, value, attention_mask, **kwargs):
        # query (B, H, T, d), key/value (B, Hkv, T, d) -> (B, T, H, d), as every transformers attention returns
        import torch

        groups = kwargs.pop("tcrlsd_prefix_groups", None)
        if groups:
            return _shared_prompts(one, needs_mask, prefixed, module, query, key, value, groups, kwargs), None
        cu = kwargs.pop("cu_seq_lens_q", None)
        for name in _PACKING_KWARGS[1:]:
            kwargs.pop(name, None)
        B, T = query.shape[0], query.shape[2]
        if cu is not None and B != 1:
            raise UpdateError(f"a packed micro-batch is one row, got {B} rows")
        bounds = cu.tolist() if cu is not None else [0, T]
        sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        window = kwargs.get("sliding_window")
        rows = []
        for b in range(B):
            # one split per tensor (its backward is one concatenation; slicing each sequence out
            # separately would cost a zero-filled full-size gradient per sequence)
            qs, ks, vs = (x[b : b + 1].split(sizes, dim=2) for x in (query, key, value))
            parts = [one(module, q, k, v, _causal_additive(q.shape[2], window, q.dtype, q.device) if needs_mask else None,
                         kwargs) for q, k, v in zip(qs, ks, vs)]  # each (1, L, H, d)
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return (torch.cat(rows, dim=0) if B > 1 else rows[0]), None

    return forward


def enable_packed_attention(model, share_prompts: bool = False) -> str:
    """Make ``model`` attend within each packed sequence; returns the implementation now in use.

    Raises :class:`UpdateError`, naming the architecture, for an attention implementation this
    module cannot run per sequence (set ``update.pack_tokens: 0`` for such a model), and with
    ``share_prompts`` for flash-attention's varlen path, which cannot show a response its prompt
    without its siblings (set ``update.share_prompts: false``)."""
    from transformers import AttentionInterface

    from tcrlsd.lm_head import architecture

    impl = model.config._attn_implementation
    if share_prompts and impl in NATIVE_VARLEN:
        raise UpdateError(f"{architecture(model)}: update.share_prompts needs the sdpa or eager attention, not {impl!r} "
                          "(flash-attention's varlen kernel keeps whole sequences apart); set update.share_prompts: "
                          "false")
    if impl in NATIVE_VARLEN or impl.startswith(_PREFIX):
        return impl
    if impl not in PACKED_ATTENTION:
        raise UpdateError(f"{architecture(model)}: attention implementation {impl!r} cannot keep packed sequences "
                          f"apart (packing supports {', '.join(list(PACKED_ATTENTION) + list(NATIVE_VARLEN))}); "
                          "set update.pack_tokens: 0")
    name = _PREFIX + impl
    AttentionInterface.register(name, _packed_forward(impl))
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UpdateError(f"{architecture(model)}: transformers refused the packed attention ({name}); "
                          "set update.pack_tokens: 0")
    return name
