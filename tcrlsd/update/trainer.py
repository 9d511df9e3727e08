"""The update loop: PPO epochs over mini-batches (one optimizer step each), micro-batches per process.

For every mini-batch (prompts, see :mod:`tcrlsd.update.batching`) each process takes its share of
the sequences, cuts it into token-budget micro-batches and accumulates gradients over them; every
process runs the same number of forward/backward passes (a process with fewer micro-batches runs
zero-weight ones), because ZeRO-2/3 reduce gradients inside every backward. The loss weights come
from counts of the whole mini-batch (known to every process from the index), times the number of
processes, since DeepSpeed averages gradients over processes: the sum over processes and
micro-batches is exactly the loss of the whole mini-batch, whatever the split. A micro-batch is
padded or packed (``update.pack_tokens``, :mod:`tcrlsd.update.microbatch`); the per-token numbers,
and so the loss, are the same in both layouts.

The LR of every step is set from the global optimizer step (warm-up, then constant or cosine), so
a run cut into one process per iteration follows the same schedule as one continuous run.

Every step's own numbers (:func:`step_metrics`, reduced over processes in the step's existing
collective) go to the metrics JSON's ``per_step`` list and, when set, to ``Trainer.on_step``
(the stage hands it :meth:`tcrlsd.tracking.Tracker.log_step` on rank 0: live curves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from tcrlsd.batching import plan_packed_batches
from tcrlsd.update.batching import (TrainSequence, UpdateInputs, plan_micro_batches, plan_mini_batches,
                                    plan_shared_batches, split_for_ranks)
from tcrlsd.update.microbatch import MicroBatch, collate
from tcrlsd.update.params import UpdateError, UpdateParams
from tcrlsd.optim import learning_rate
from tcrlsd.update.losses import POLICY_LOSSES, AggregationCounts, ClipSettings, aggregate, k3_kl
from tcrlsd.update.state import TrainerState

__all__ = ["MicroBatch", "collate", "Trainer", "IterationStats", "step_metrics"]


@dataclass
class IterationStats:
    """Per-iteration sums, turned into the metrics JSON by :meth:`as_metrics`."""

    steps: int = 0
    skipped: int = 0
    pg_loss: list = field(default_factory=list)  # per step, the aggregated loss of the mini-batch
    grad_norm: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    tokens: float = 0.0  # response tokens trained on (summed over epochs)
    clipped: float = 0.0
    log_ratio_sum: float = 0.0  # sum of (old - logp): ppo_kl numerator
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    forward_tokens: float = 0.0
    first_max_abs_log_ratio: float | None = None
    seconds: float = 0.0
    is_weight_sum: float = 0.0  # update.rollout_is: sum of the tokens' weights, and tokens at the cap
    is_capped: float = 0.0
    masked_truncated: int = 0  # update.mask_truncated: `length` rollouts left out of the loss (over epochs)
    per_step: list = field(default_factory=list)  # step_metrics() of every step, in order

    # the sums a step adds to; per step they are reduced over processes, per iteration again at the end
    SUMS = ("tokens", "clipped", "log_ratio_sum", "entropy_sum", "kl_sum", "forward_tokens")

    def sums(self) -> list[float]:
        return [float(getattr(self, k)) for k in self.SUMS]

    def as_metrics(self) -> dict:
        n = max(self.tokens, 1.0)
        finite = [g for g in self.grad_norm if np.isfinite(g)]
        return {
            "pg_loss": float(np.mean([x for x in self.pg_loss if np.isfinite(x)])) if any(np.isfinite(self.pg_loss)) else None,
            "pg_clipfrac": self.clipped / n,
            "ppo_kl": self.log_ratio_sum / n,
            "entropy": self.entropy_sum / n,
            "kl_to_reference": self.kl_sum / n,
            "grad_norm": float(np.mean(finite)) if finite else None,
            "grad_norm_max": float(np.max(finite)) if finite else None,
            "lr": self.lr[-1] if self.lr else None,
            "optimizer_steps": self.steps,
            "skipped_steps": self.skipped,
            "response_tokens_trained": int(self.tokens),
            "forward_tokens": int(self.forward_tokens),
            "tokens_per_s": round(self.forward_tokens / self.seconds, 1) if self.seconds > 0 else None,
            "seconds": round(self.seconds, 3),
            # largest |log r| over the first mini-batch before any step: 0 when the update reproduces
            # the score stage's log-probs (ratio 1)
            "first_minibatch_max_abs_log_ratio": self.first_max_abs_log_ratio,
            "rollout_is_weight_mean": self.is_weight_sum / n,  # 1.0 when update.rollout_is is none
            "rollout_is_capped_share": self.is_capped / n,
            "truncated_rollouts_masked": self.masked_truncated,
            "per_step": self.per_step,
        }


def step_metrics(step: int, sums: dict, pg_loss: float, grad_norm: float, lr: float, seconds: float,
                 skipped: bool) -> dict:
    """One optimizer step's numbers from its own sums (all processes): the as_metrics() formulas
    over one step. ``step`` counts attempted steps over the run (global step + skipped steps), so
    the series continues across iterations. A skipped step has no grad_norm; a non-finite number is
    None (the metrics JSON is strict JSON)."""
    n = max(sums["tokens"], 1.0)
    out = {
        "step": step,
        "pg_loss": pg_loss,
        "pg_clipfrac": sums["clipped"] / n,
        "ppo_kl": sums["log_ratio_sum"] / n,
        "entropy": sums["entropy_sum"] / n,
        "kl_to_reference": sums["kl_sum"] / n,
        "grad_norm": None if skipped else grad_norm,
        "lr": lr,
        "response_tokens": int(sums["tokens"]),
        "tokens_per_s": round(sums["forward_tokens"] / seconds, 1) if seconds > 0 else None,
        "skipped": int(skipped),
    }
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in out.items()}


class Trainer:
    """A DeepSpeed engine with its training state; :meth:`train_iteration` may be called repeatedly."""

    def __init__(self, engine, params: UpdateParams, state: TrainerState, *, device: str, reference=None):
        self.engine = engine
        self.params = params
        self.state = state
        self.device = device
        self.reference = reference  # FrozenHead of the k3 KL's reference model (or None)
        self.on_step = None  # called as on_step(step_metrics without "step", step) after every step
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # -- one micro-batch
    def _micro_loss(self, mb: MicroBatch, counts: AggregationCounts, stats: IterationStats):
        import torch

        p = self.params
        logp, ent = self.engine(mb.input_ids, mb.rows, mb.cols, mb.targets, **mb.decoder_kwargs())  # (N,), (N,)
        pg, clipped = POLICY_LOSSES[p.policy_loss](logp, mb.old_logprobs, mb.advantages, mb.seq,
                                                   ClipSettings(p.clip_ratio_low, p.clip_ratio_high, p.dual_clip))
        if mb.is_weights is not None:  # truncated importance sampling: sampler -> scorer (tcrlsd.offpolicy)
            pg = pg * mb.is_weights
        agg = lambda x: aggregate(x, mb.seq_len, p.loss_agg_mode, counts)  # noqa: E731
        pg_part = agg(pg)
        loss = pg_part - p.entropy_coef * agg(ent)
        if self.reference is not None:
            ref = self.reference_logprobs(mb)
            kl = k3_kl(logp, ref)
            loss = loss + p.kl_coef * agg(kl)
            stats.kl_sum += float(kl.detach().sum())
        with torch.no_grad():
            stats.clipped += float(clipped.sum())
            stats.log_ratio_sum += float((mb.old_logprobs - logp).sum())
            stats.entropy_sum += float(ent.sum())
            if mb.is_weights is not None:
                stats.is_weight_sum += float(mb.is_weights.sum())
                stats.is_capped += float((mb.is_weights >= p.rollout_is_cap).sum())
            else:
                stats.is_weight_sum += len(mb.targets)
            stats.tokens += len(mb.targets)
            stats.forward_tokens += mb.tokens
        return loss * self.world, pg_part.detach(), logp.detach()

    def reference_logprobs(self, mb: MicroBatch):
        import torch

        with torch.inference_mode():  # the reference is a tcrlsd.lm_head.FrozenHead: the score stage's head
            return self.reference.logprobs_at(mb.input_ids, mb.rows, mb.cols, mb.targets,
                                              self.params.logits_chunk_tokens, **mb.decoder_kwargs()).clone()

    def _dummy(self) -> MicroBatch:
        one = TrainSequence("", [0], [0], np.zeros(1, np.float32), np.zeros(1, np.float32))
        return collate([one], self.device, packed=self.params.pack_tokens > 0, share_prompts=self.params.share_prompts)

    # -- one mini-batch = one optimizer step
    def _step(self, inputs: UpdateInputs, rows: list[int], stats: IterationStats, first: bool) -> None:
        import torch
        import torch.distributed as dist

        p = self.params
        rows = [i for i in rows if inputs.response_lengths[i] > 0]  # an empty response has no token to train
        if p.mask_truncated:  # a response cut by the token limit adds no loss and no count (DAPO overlong filter)
            kept = [i for i in rows if not inputs.truncated[i]]
            stats.masked_truncated += len(rows) - len(kept)
            rows = kept
        if not rows:  # no token at all: no step (AdamW would still move weights on its momentum)
            return
        start, before = time.perf_counter(), stats.sums()
        lengths = [inputs.lengths[i] for i in rows]
        counts = AggregationCounts(tokens=max(1, sum(inputs.response_lengths[i] for i in rows)),
                                   sequences=max(1, len(rows)), norm_tokens=p.loss_norm_tokens)
        shares = split_for_ranks(lengths, self.world)
        # packed: real tokens up to pack_tokens per micro-batch; padded: sequences x longest up to max_tokens_per_micro_batch
        # shared prompts: the same, each distinct prompt counted once per micro-batch
        if p.share_prompts:
            plans = [plan_shared_batches([inputs.prompt_ids[rows[j]] for j in share],
                                         [lengths[j] - inputs.response_lengths[rows[j]] for j in share],
                                         [inputs.response_lengths[rows[j]] for j in share], p.pack_tokens)
                     for share in shares]
        else:
            plan = ((lambda n: plan_packed_batches(n, p.pack_tokens)) if p.pack_tokens
                    else (lambda n: plan_micro_batches(n, p.max_tokens_per_micro_batch)))
            plans = [plan([lengths[j] for j in share]) for share in shares]
        n_micro = max(1, max(len(pl) for pl in plans))
        mine = shares[self.rank]
        seqs = inputs.read([rows[j] for j in mine])
        micro = [[seqs[k] for k in mb] for mb in plans[self.rank]]
        lr = learning_rate(self.state.global_step, p.lr, warmup_steps=p.warmup_steps, schedule=p.lr_schedule,
                           total_steps=p.cosine_total_steps, min_ratio=p.min_lr_ratio)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        pg_total = torch.zeros((), dtype=torch.float64)
        max_abs = torch.zeros((), dtype=torch.float64)
        for m in range(n_micro):
            self.engine.set_gradient_accumulation_boundary(m == n_micro - 1)
            if m < len(micro):
                mb = collate(micro[m], self.device, p.rollout_is, p.rollout_is_cap, packed=p.pack_tokens > 0,
                             share_prompts=p.share_prompts)
                loss, pg_part, logp = self._micro_loss(mb, counts, stats)
                pg_total += float(pg_part)
                if first:
                    max_abs = torch.maximum(max_abs, (logp - mb.old_logprobs).abs().max().double().cpu())
            else:  # same number of passes on every process: a zero-weight one
                mb = self._dummy()
                logp, ent = self.engine(mb.input_ids, mb.rows, mb.cols, mb.targets, **mb.decoder_kwargs())
                loss = 0.0 * (logp.sum() + ent.sum())
            self.engine.backward(loss, scale_wrt_gas=False)
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        skipped = self.engine.skipped_steps - skipped_before
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        mine = [a - b for a, b in zip(stats.sums(), before)]  # this step's sums on this process
        red = torch.tensor([float(pg_total), *mine, float(max_abs), time.perf_counter() - start], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(red[:-2], op=dist.ReduceOp.SUM)
            dist.all_reduce(red[-2:], op=dist.ReduceOp.MAX)
        stats.pg_loss.append(float(red[0]))
        if first:
            stats.first_max_abs_log_ratio = float(red[-2])
        stats.grad_norm.append(norm if not skipped else float("inf"))
        stats.lr.append(lr)
        if skipped:
            stats.skipped += 1
            self.state = replace(self.state, skipped_steps=self.state.skipped_steps + 1)
        else:
            stats.steps += 1
            self.state = replace(self.state, global_step=self.state.global_step + 1)
        record = step_metrics(self.state.global_step + self.state.skipped_steps,
                              dict(zip(IterationStats.SUMS, red[1:-2].tolist())), float(red[0]), norm, lr,
                              float(red[-1]), bool(skipped))
        stats.per_step.append(record)
        if self.on_step is not None:
            self.on_step({k: v for k, v in record.items() if k != "step"}, record["step"])

    def train_iteration(self, inputs: UpdateInputs) -> dict:
        """ppo_epochs passes over ``inputs``; returns the iteration's metrics (same on every process)."""
        import torch
        import torch.distributed as dist

        p = self.params
        if self.state.iteration >= inputs.iteration:
            raise UpdateError(f"rollouts are of iteration {inputs.iteration} but the training state already covers "
                              f"iteration {self.state.iteration}")
        self.engine.train()
        stats = IterationStats()
        start = time.perf_counter()
        first = True
        for epoch in range(p.ppo_epochs):
            for rows in plan_mini_batches(inputs.prompt_ids, p.mini_batch_prompts, seed=p.seed,
                                          iteration=inputs.iteration, epoch=epoch, shuffle=p.shuffle):
                self._step(inputs, rows, stats, first)
                first = False
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - start
        sums = torch.tensor([stats.tokens, stats.clipped, stats.log_ratio_sum, stats.entropy_sum, stats.kl_sum,
                             stats.forward_tokens, stats.is_weight_sum, stats.is_capped], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        (stats.tokens, stats.clipped, stats.log_ratio_sum, stats.entropy_sum, stats.kl_sum,
         stats.forward_tokens, stats.is_weight_sum, stats.is_capped) = sums.tolist()
        self.state = replace(self.state, iteration=inputs.iteration)
        out = stats.as_metrics()
        out["global_step"] = self.state.global_step
        out["skipped_steps_total"] = self.state.skipped_steps
        return out
