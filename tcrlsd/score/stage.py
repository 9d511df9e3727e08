"""The score stage: devices, teacher checkpoint and :func:`run_score`."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from tcrlsd.artifacts import ShardedOutput, ShardSpec, checkpoint_digest, split_evenly
from tcrlsd.score.inputs import ScoringInputs, check_vocab, score_part
from tcrlsd.score.params import ScoreError, ScoreParams

# ----------------------------------------------------------------------------- the stage


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScoreError(f"params score.device is {name!r} but no CUDA device is available")
    return name


def _resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return name


def teacher_checkpoint_for(params: ScoreParams, policy: str | os.PathLike, teacher_policy: str | os.PathLike | None) -> str:
    """The checkpoint that plays the teacher; errors when the mode and ``teacher_policy`` disagree."""
    if params.teacher == "current":
        if teacher_policy is not None:
            raise ScoreError(
                f"--teacher-policy {teacher_policy} was given but params score.teacher is 'current' (the student's "
                "own weights); set score.teacher to 'lagged' or 'ema', or drop --teacher-policy"
            )
        return str(policy)
    if teacher_policy is None:
        raise ScoreError(
            f"params score.teacher is {params.teacher!r}: pass the teacher checkpoint folder with --teacher-policy PATH "
            "(kept by the update stage)"
        )
    if not Path(teacher_policy).is_dir():
        raise ScoreError(f"--teacher-policy {teacher_policy}: no such checkpoint folder (score.teacher={params.teacher!r})")
    return str(teacher_policy)


@dataclass
class ScoreRunStats:
    """What one invocation computed (resumed parts are not counted)."""

    parts_done: int = 0
    parts_skipped: int = 0
    rows: int = 0
    forward_tokens: int = 0
    response_tokens_scored: int = 0
    seconds: float = 0.0
    device: str = ""
    dtype: str = ""
    complete: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        d["tokens_per_s"] = round(self.forward_tokens / self.seconds, 1) if self.seconds > 0 else None
        d["seconds"] = round(self.seconds, 3)
        return d


def run_score(
    rollouts: pa.Table,
    inputs: ScoringInputs,
    policy: str | os.PathLike,
    out: str | os.PathLike,
    params: ScoreParams,
    *,
    teacher_policy: str | os.PathLike | None = None,
    shard: ShardSpec = ShardSpec(),
    input_digests: dict | None = None,
    progress: bool = True,
) -> ScoreRunStats:
    """Score every pending part of this shard into the folder artifact ``out``.

    ``inputs`` is :func:`build_inputs` of ``rollouts`` (which is only read again for the
    vocabulary check).

    ``input_digests`` identifies the inputs in the resume fingerprint (the stage passes content
    digests of the rollouts and critiques files); with the params and the checkpoints' digests it
    decides whether finished parts on disk are still valid.
    """
    import torch

    from tcrlsd.policy import load_policy, load_tokenizer
    from tcrlsd.progress import progress_bar

    teacher_ckpt = teacher_checkpoint_for(params, policy, teacher_policy)
    device = _resolve_device(params.device)
    dtype = _resolve_dtype(params.dtype, device)
    n = rollouts.num_rows
    plan = split_evenly(n, math.ceil(n / params.rows_per_part) if n else 1)
    fingerprint = {
        "params": asdict(params) | {"device": device, "dtype": dtype},
        "inputs": input_digests or {},
        "policy": {"path": str(policy), "sha256": checkpoint_digest(policy)},
        "teacher": {"path": teacher_ckpt,
                    "sha256": checkpoint_digest(teacher_ckpt) if params.teacher != "current" else "student"},
        "rows": n,
    }
    sink = ShardedOutput(out, "scores", len(plan), fingerprint)
    pending = sink.pending(shard)
    stats = ScoreRunStats(device=device, dtype=dtype)
    stats.parts_skipped = sum(1 for p in range(len(plan)) if shard.owns(p)) - len(pending)
    if not pending:
        stats.complete = sink.complete()
        return stats

    tokenizer = load_tokenizer(policy, params.trust_remote_code)
    student, _ = load_policy(policy, device=device, dtype=dtype, trust_remote_code=params.trust_remote_code)
    check_vocab(rollouts, student.get_output_embeddings().weight.shape[0], str(policy))
    teacher = None
    if params.teacher != "current":
        t_tok = load_tokenizer(teacher_ckpt, params.trust_remote_code)
        if t_tok.get_vocab() != tokenizer.get_vocab():
            raise ScoreError(
                f"--teacher-policy {teacher_ckpt}: its tokenizer differs from the policy's ({policy}); the teacher "
                "must score the same response token ids"
            )
        teacher, _ = load_policy(teacher_ckpt, device=device, dtype=dtype, trust_remote_code=params.trust_remote_code)

    # Encode the teacher contexts of the pending parts once: the progress bar's total needs their
    # lengths, and the parts reuse them.
    from tcrlsd.policy import encode_prompt

    t_ids = {i: encode_prompt(tokenizer, inputs.teacher_prompts[i])
             for part in pending for i in plan[part] if inputs.teacher_prompts[i] is not None}
    total = 0
    for part in pending:
        for i in plan[part]:
            if inputs.responses[i]:
                total += len(inputs.prompts[i]) + len(inputs.responses[i])
                total += len(t_ids[i]) + len(inputs.responses[i]) if i in t_ids else 0
    bar = progress_bar(total=total, unit="tok", unit_scale=True, desc="score", enabled=progress)
    start = time.perf_counter()
    try:
        for part in pending:
            table, counts = score_part(inputs, plan[part], student, teacher, tokenizer, params, teacher_ckpt,
                                       on_batch=bar.update, teacher_contexts=t_ids)
            sink.write(part, table)
            stats.parts_done += 1
            stats.rows += counts["rows"]
            stats.forward_tokens += counts["forward_tokens"]
            stats.response_tokens_scored += counts["response_tokens_scored"]
    finally:
        bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    stats.complete = sink.complete()
    return stats
