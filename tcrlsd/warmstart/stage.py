"""The warmstart stage's one function."""

from __future__ import annotations

import time
from dataclasses import asdict

from tcrlsd.errors import InputError
from tcrlsd.warmstart.accuracy import greedy_accuracy
from tcrlsd.warmstart.data import check_prompt_template
from tcrlsd.warmstart.params import WarmstartParams
from tcrlsd.warmstart.train import train_policy

# --------------------------------------------------------------------------------------------------
# The stage


def run_warmstart(params: WarmstartParams, prompts, source: str = "prompts", progress: bool = True):
    """Train on the SFT corpus (minus every problem in ``prompts``) and evaluate on its val split.

    ``prompts`` is the validated prompts table. Returns ``(model, tokenizer, metrics)``.
    """
    problems = prompts.column("problem").to_pylist()
    splits = prompts.column("split").to_pylist()
    val = [i for i, s in enumerate(splits) if s == "val"]
    if not val:
        raise InputError(f"{source}: no rows with split == 'val'; warmstart evaluates on the val prompts")
    val_prompts = [prompts.column("prompt")[i].as_py() for i in val]
    check_prompt_template(params.prompt_template, [problems[i] for i in val], val_prompts, source)
    model, tokenizer, stats = train_policy(params, exclude=problems, progress=progress)
    start, start_cpu = time.perf_counter(), time.process_time()
    metrics = greedy_accuracy(
        model, tokenizer, val_prompts,
        [prompts.column("answer")[i].as_py() for i in val],
        [prompts.column("level")[i].as_py() for i in val],
        params.eval_max_new_tokens, params.eval_batch_size, progress,
    )
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    metrics["eval_cpu_seconds"] = round(time.process_time() - start_cpu, 2)
    metrics.update(stats)
    metrics["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}
    return model, tokenizer, metrics
