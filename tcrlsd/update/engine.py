"""The DeepSpeed side of the update: process group, the trained module, the engine, saving weights.

- One process needs no launcher: :func:`init_distributed` fills the rendezvous variables a launcher
  would set (rank 0 of 1, a free local port) before ``deepspeed.init_distributed``. Under
  ``torchrun`` / ``deepspeed`` they are already set and each process takes its rank from them.
  gloo on CPU, nccl on GPU.
- :class:`TokenLogprobs` is the module handed to ``deepspeed.initialize``: the Hugging Face model
  plus the one forward the loss needs, log p(y_t) and the full-vocabulary entropy at the response
  positions. The decoder runs once per micro-batch; only the response positions' hidden states go
  through the lm head (:mod:`tcrlsd.lm_head`: fp32 projection, the head's bias, the architecture's
  logit post-processing -- the score stage's head), in chunks, each chunk under activation
  checkpointing, so neither a (B, T, V) nor an (N, V) logits tensor is ever alive (one chunk's
  (n, V) at a time, forward and backward). Padded micro-batches: right padding, no attention
  mask (under causal attention real tokens never see the padding: the score stage's layout, so
  its log-probs are reproduced and the first ratio is 1). Packed ones (``update.pack_tokens``):
  the decoder also gets per-sequence position ids and sequence bounds, and the model attends
  within each sequence (:mod:`tcrlsd.update.packed_attention`, switched on here).
- :func:`build_engine`: AdamW (torch's, weight decay on matrices only) wrapped by ZeRO stage 1/2/3;
  fp32 on CPU, bf16 (fp32 master weights in the optimizer) on GPU; gradient clipping by DeepSpeed,
  which also skips the step when the gradient norm is not finite (counted in ``skipped_steps``).
- :func:`save_hf_checkpoint`: the weights gathered (ZeRO-3 shards included) and written by rank 0 as
  a plain Hugging Face folder through :func:`tcrlsd.policy.save_policy`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tcrlsd.lm_head import logprobs_entropy, postprocess_of, split_model
from tcrlsd.optim import decay_groups

__all__ = ["init_distributed", "rank_and_world", "barrier", "TokenLogprobs", "deepspeed_config", "build_engine",
           "save_hf_checkpoint"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one on a free local port
            # DeepSpeed reads these variables (LOCAL_RANK in the engine), so they are set, not passed.
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(_free_port())})
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _token_logprobs_class():
    import torch
    from torch.utils.checkpoint import checkpoint

    class TokenLogprobs(torch.nn.Module):
        """HF causal LM -> (log p(target), entropy) at given (row, column) positions of a batch."""

        def __init__(self, model, logits_chunk_tokens: int):
            super().__init__()
            split_model(model)  # refuses, by name, a model without a separate decoder and lm head
            self.model = model
            self.chunk = logits_chunk_tokens
            self.post = postprocess_of(model)  # what model.forward does to the head's output, repeated here

        def head_params(self):
            """(weight (V, H), bias (V,) or None) of the lm head: trained parameters of the model."""
            head = self.model.get_output_embeddings()
            return head.weight, getattr(head, "bias", None)

        def forward(self, input_ids, rows, cols, targets, **decoder_kwargs):
            # input_ids (B, T); rows, cols, targets (N,): logits at (rows[i], cols[i]) predict targets[i];
            # decoder_kwargs: MicroBatch.decoder_kwargs() (packed: position ids, sequence bounds)
            hidden = self.model.base_model(input_ids=input_ids, use_cache=False,
                                           **decoder_kwargs).last_hidden_state  # (B, T, H)
            h = hidden[rows, cols]  # (N, H)
            w, b = self.head_params()
            logps, ents = [], []
            for s in range(0, h.shape[0], self.chunk):
                lp, ent = checkpoint(logprobs_entropy, h[s : s + self.chunk], w, b, targets[s : s + self.chunk],
                                     self.post, use_reentrant=False)
                logps.append(lp)
                ents.append(ent)
            return torch.cat(logps), torch.cat(ents)  # (N,), (N,)

    return TokenLogprobs


def TokenLogprobs(model, logits_chunk_tokens: int):  # noqa: N802 - a class built lazily (torch import)
    return _token_logprobs_class()(model, logits_chunk_tokens)


def deepspeed_config(zero_stage: int, bf16: bool, grad_clip: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,  # micro-batches are cut by tokens here, not by DeepSpeed
        "gradient_accumulation_steps": 1,  # boundaries are set by hand per mini-batch
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, wrapped by ZeRO
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model, params, device: str, bf16: bool):
    """(engine, module): DeepSpeed engine around :class:`TokenLogprobs` of ``model`` with AdamW."""
    import deepspeed
    import torch

    if params.pack_tokens:
        from tcrlsd.update.packed_attention import enable_packed_attention

        enable_packed_attention(model, share_prompts=params.share_prompts)
    module = TokenLogprobs(model, params.logits_chunk_tokens)
    if params.zero_stage == 3:
        # The head's weight (and bias) are used by this module's forward, not only by the lm head's:
        # ZeRO-3 must gather them for this module too.
        for p in module.head_params():
            if p is not None:
                deepspeed.zero.register_external_parameter(module, p)
    groups = decay_groups(module.named_parameters(), params.weight_decay)
    opt = torch.optim.AdamW(groups, lr=params.lr, betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_eps)
    cfg = deepspeed_config(params.zero_stage, bf16, params.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    return engine


def save_hf_checkpoint(engine, tokenizer, path: str | os.PathLike, zero_stage: int) -> Path:
    """Write the engine's current weights as a Hugging Face folder (rank 0 writes; all gather)."""
    import contextlib

    import deepspeed

    from tcrlsd.policy import save_policy

    rank, _ = rank_and_world()
    model = engine.module.model
    ctx = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
           if zero_stage == 3 else contextlib.nullcontext())
    with ctx:
        if rank == 0:
            save_policy(model, tokenizer, path)
    barrier()
    return Path(path)
