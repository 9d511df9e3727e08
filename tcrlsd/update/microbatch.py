"""One micro-batch's tensors, in one of three layouts (``update.pack_tokens``, ``update.share_prompts``):

- padded (``pack_tokens: 0``): ``(B, T)`` ids, one sequence per row, right padded with 0, no
  attention mask (under causal attention real tokens never see the padding: the score stage's
  layout). Cut by :func:`tcrlsd.update.batching.plan_micro_batches` (``sequences x longest``).
- packed: ``(1, N)`` ids, the sequences end to end with no padding, position ids restarting at 0
  for each and the cumulative sequence lengths ``cu_seqlens`` that the attention reads to stay
  within each sequence (:mod:`tcrlsd.update.packed_attention`). Cut by
  :func:`tcrlsd.batching.plan_packed_batches` (real tokens per micro-batch).

- packed with shared prompts (``share_prompts``): a group's prompt is written once, followed by each
  of its responses; a response's positions continue from the prompt's length and it attends to the
  prompt and to itself, never to a sibling (``prefix_groups``; :mod:`tcrlsd.update.packed_attention`).
  The first token of every response is predicted by the prompt's last position. Cut by
  :func:`tcrlsd.update.batching.plan_shared_batches` (real tokens, each prompt counted once).

In all, every response token t of sequence i is one entry of the flat ``(N,)`` tensors: the
logits at ``(rows, cols)`` predict ``targets``; ``seq`` is its sequence's index in the
micro-batch (GSPO's per-sequence ratio), ``seq_len`` its sequence's response length (the
aggregation weights). Per token the two layouts compute the same numbers (``tests/test_packing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcrlsd.offpolicy import rollout_is_weights
from tcrlsd.update.batching import TrainSequence

__all__ = ["MicroBatch", "collate"]


@dataclass
class MicroBatch:
    input_ids: object  # (B, T) int64 padded / (1, N) packed
    rows: object  # (N,) int64
    cols: object  # (N,) int64: position whose logits predict the token
    targets: object  # (N,) int64
    old_logprobs: object  # (N,) float32
    advantages: object  # (N,) float32
    seq_len: object  # (N,) int64: response length of the token's sequence
    seq: object  # (N,) int64: index of the token's sequence in this micro-batch
    tokens: int  # real (prompt + response) tokens
    is_weights: object = None  # (N,) float32 truncated importance weights (update.rollout_is), None = off
    position_ids: object = None  # (1, N) int64, packed only: 0.. per sequence
    cu_seqlens: object = None  # (S + 1,) int32, packed only: sequence i is ids[0, cu[i]:cu[i+1]]
    max_len: int = 0  # packed only: the longest sequence
    # shared prompts only: per prompt group (start, prompt length, ((response start, length), ...)) in the row
    prefix_groups: tuple = ()

    def decoder_kwargs(self) -> dict:
        """What the decoder's forward needs besides the ids: nothing padded; positions and sequence
        bounds packed (the names transformers' flash-attention varlen path reads)."""
        if self.prefix_groups:
            return {"position_ids": self.position_ids, "tcrlsd_prefix_groups": self.prefix_groups}
        if self.cu_seqlens is None:
            return {}
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def collate(seqs: list[TrainSequence], device, rollout_is: str = "none", rollout_is_cap: float = 2.0, *,
            packed: bool = False, share_prompts: bool = False) -> MicroBatch:
    """The ids and flat per-token tensors of ``seqs`` (padded, packed, or packed with each distinct
    prompt written once: ``share_prompts``); with ``rollout_is`` other than none, each sequence's
    truncated importance weights (:func:`tcrlsd.offpolicy.rollout_is_weights` of its old log-probs
    against its sampler log-probs)."""
    import torch

    if share_prompts:
        return _collate_shared(seqs, device, rollout_is, rollout_is_cap)
    lengths = [s.length for s in seqs]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) if packed else np.zeros(len(seqs), np.int64)
    if packed:
        ids = np.zeros((1, int(starts[-1])), dtype=np.int64)
        positions = np.concatenate([np.arange(n) for n in lengths])[None]  # (1, N)
    else:
        ids = np.zeros((len(seqs), max(lengths)), dtype=np.int64)
    rows, cols = [], []
    for i, s in enumerate(seqs):
        c, r = len(s.prompt_ids), len(s.response_ids)
        row, at = (0, int(starts[i])) if packed else (i, 0)
        ids[row, at : at + c] = s.prompt_ids
        ids[row, at + c : at + c + r] = s.response_ids
        rows.append(np.full(r, row))
        cols.append(np.arange(at + c - 1, at + c - 1 + r))  # logits at p predict token p + 1
    mb = _micro_batch(seqs, ids, rows, cols, sum(lengths), device, rollout_is, rollout_is_cap)
    if packed:
        mb.position_ids = torch.from_numpy(positions).to(device)
        mb.cu_seqlens = torch.from_numpy(starts.astype(np.int32)).to(device)
        mb.max_len = max(lengths)
    return mb


def _collate_shared(seqs: list[TrainSequence], device, rollout_is: str, rollout_is_cap: float) -> MicroBatch:
    import torch

    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    n = sum(len(p) for p in groups) + sum(len(s.response_ids) for s in seqs)
    ids = np.zeros((1, n), dtype=np.int64)
    positions = np.zeros((1, n), dtype=np.int64)
    cols_of: dict[int, np.ndarray] = {}
    layout = []
    at = 0
    for prompt, members in groups.items():
        c, start = len(prompt), at
        ids[0, at : at + c] = prompt
        positions[0, at : at + c] = np.arange(c)
        at += c
        responses = []
        for i in members:
            r = len(seqs[i].response_ids)
            ids[0, at : at + r] = seqs[i].response_ids
            positions[0, at : at + r] = np.arange(c, c + r)
            # the first token is predicted by the prompt's last position, the others by their predecessor
            cols_of[i] = np.concatenate([[start + c - 1], np.arange(at, at + r - 1)])
            responses.append((at, r))
            at += r
        layout.append((start, c, tuple(responses)))
    rows = [np.zeros(len(s.response_ids)) for s in seqs]
    mb = _micro_batch(seqs, ids, rows, [cols_of[i] for i in range(len(seqs))], n, device, rollout_is, rollout_is_cap)
    mb.position_ids = torch.from_numpy(positions).to(device)
    mb.prefix_groups = tuple(layout)
    return mb


def _micro_batch(seqs: list[TrainSequence], ids, rows: list, cols: list, tokens: int, device, rollout_is: str,
                 rollout_is_cap: float) -> MicroBatch:
    """The MicroBatch of a layout (``ids``, and the row / column of the logits predicting each response
    token, per sequence): the per-token tensors, in the order of ``seqs``."""
    import torch

    def t(parts, dtype):
        return torch.from_numpy(np.concatenate(parts).astype(dtype)).to(device)

    weights = None
    if rollout_is != "none":
        weights = t([rollout_is_weights(s.old_logprobs, s.sampler_logprobs, rollout_is, rollout_is_cap) for s in seqs],
                    np.float32)
    return MicroBatch(torch.from_numpy(ids).to(device), t(rows, np.int64), t(cols, np.int64),
                      t([np.asarray(s.response_ids) for s in seqs], np.int64),
                      t([s.old_logprobs for s in seqs], np.float32), t([s.advantages for s in seqs], np.float32),
                      t([np.full(len(s.response_ids), len(s.response_ids)) for s in seqs], np.int64),
                      t([np.full(len(s.response_ids), i) for i, s in enumerate(seqs)], np.int64), tokens, weights)
