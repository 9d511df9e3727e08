"""Supervised training of the tiny Llama on response tokens only."""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

from tcrlsd.optim import decay_groups, learning_rate
from tcrlsd.warmstart.data import ROLES, SftExample, build_tokenizer, sft_examples, sft_problems
from tcrlsd.warmstart.params import IGNORE, WarmstartParams


def collate(examples: Sequence[SftExample], pad_id: int):
    """Right-padded ``(input_ids, attention_mask, labels)`` tensors, each (B, T)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, mask, labels


def response_loss(logits, labels):
    """Token-mean next-token cross-entropy over the positions whose label is not IGNORE.

    logits (B, T, V) predict the token at t+1 from position t; labels (B, T) hold the token at t
    (IGNORE on prompt and padding), so the prompt carries no loss and the first response token is
    predicted from the last prompt position.
    """
    import torch.nn.functional as F

    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def lr_at(step: int, params: WarmstartParams) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    return learning_rate(step, params.lr, warmup_steps=params.warmup_steps, schedule="cosine",
                         total_steps=params.steps, min_ratio=params.min_lr_ratio)


# --------------------------------------------------------------------------------------------------
# Training


def _chunks(values: list[float], n: int) -> list[list[float]]:
    size = max(1, math.ceil(len(values) / n))
    return [values[i: i + size] for i in range(0, len(values), size)]


def _length_bucketed_batches(examples: Sequence[SftExample], batch_size: int, gen, pool: int = 64) -> list[list[int]]:
    """One pass over ``examples`` as batches of similar length (less padding), in a seeded order.

    A random permutation is cut into pools of ``pool`` batches; each pool is sorted by length and cut
    into batches; the batches are shuffled. Returned as a stack: the caller pops from the end.
    """
    import torch

    perm = torch.randperm(len(examples), generator=gen).tolist()
    batches: list[list[int]] = []
    step = batch_size * pool
    for lo in range(0, len(perm), step):
        chunk = sorted(perm[lo: lo + step], key=lambda i: (len(examples[i].input_ids), i))
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches  # drop ragged tails
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def train_policy(params: WarmstartParams, exclude: Iterable[str] = (), progress: bool = True):
    """Build the tokenizer and tiny Llama and train it; returns ``(model, tokenizer, stats)``.

    Batches are drawn without replacement from the SFT corpus in a seeded order (a new permutation
    per pass), right-padded; the loss is :func:`response_loss`.
    """
    import torch

    from tcrlsd.policy import build_tiny_llama
    from tcrlsd.progress import progress_bar

    if params.num_threads > 0:
        torch.set_num_threads(params.num_threads)
    tokenizer = build_tokenizer(params)
    problems = sft_problems(params, exclude)
    examples = sft_examples(tokenizer, params, problems)
    n_teacher = sum(e.teacher_context for e in examples)
    model = build_tiny_llama(tokenizer, params.model_config(), seed=params.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        decay_groups(model.named_parameters(), params.weight_decay), lr=params.lr,
        betas=(params.adam_beta1, params.adam_beta2), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(params.seed)
    order: list[list[int]] = []
    tokens = response_tokens = 0
    losses: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = progress_bar(range(params.steps), desc="warmstart", unit="step", enabled=progress)
    for step in bar:
        if not order:
            order = _length_bucketed_batches(examples, params.batch_size, gen)
        batch = [examples[i] for i in order.pop()]
        ids, mask, labels = collate(batch, tokenizer.pad_token_id)  # (B, T) each
        for group in opt.param_groups:
            group["lr"] = lr_at(step, params)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        loss = response_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        tokens += int(mask.sum())
        response_tokens += int((labels != IGNORE).sum())
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == params.steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    model.eval()
    tail = losses[-min(50, len(losses)):]
    stats = {
        "parameters": n_params,
        "sft_examples": len(examples),
        "teacher_context_examples": n_teacher,
        "examples_by_role": {role: sum(e.role == role for e in examples) for role in ROLES},
        "steps": params.steps,
        "train_tokens": tokens,
        "train_response_tokens": response_tokens,
        "train_seconds": round(elapsed, 2),
        "train_cpu_seconds": round(time.process_time() - start_cpu, 2),
        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        "final_loss": round(sum(tail) / len(tail), 5),
        # mean loss of each tenth of training: the learning curve, for a glance in the metrics
        "loss_curve": [round(sum(c) / len(c), 4) for c in _chunks(losses, 10)],
        "vocab_size": len(tokenizer),
    }
    return model, tokenizer, stats
