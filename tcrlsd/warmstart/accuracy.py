"""Greedy accuracy of a policy on the val prompts."""

from __future__ import annotations

from typing import Sequence

from tcrlsd.answers import last_boxed

# --------------------------------------------------------------------------------------------------
# Evaluation


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                   progress: bool = False) -> list[str]:
    """Greedy completions (special tokens skipped) of ``prompts``, batched with left padding.

    Prompts are encoded with ``encode_prompt`` like the generate stage, and batched in length order
    (less padding); the result is in the input order.
    """
    import torch

    from tcrlsd.policy import encode_prompt
    from tcrlsd.progress import progress_bar

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for idx in progress_bar(batches, desc="greedy eval", unit="batch", enabled=progress):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )  # (B, T + new)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True)
    return out


def greedy_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    levels: Sequence[int | None], max_new_tokens: int, batch_size: int,
                    progress: bool = False) -> dict:
    """Greedy accuracy overall and per level: last ``\\boxed{}`` equals ``answer`` exactly."""
    texts = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    correct = [last_boxed(t) == str(a).strip() for t, a in zip(texts, answers)]
    per_level: dict[str, list[bool]] = {}
    for ok, level in zip(correct, levels):
        per_level.setdefault(str(level), []).append(ok)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "accuracy_by_level": {k: sum(v) / len(v) for k, v in sorted(per_level.items())},
        "n_by_level": {k: len(v) for k, v in sorted(per_level.items())},
    }
