"""The score stage: devices, teacher checkpoint and :func:`run_score`."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from tcrlsd.artifacts import ShardSpec, split_evenly
from tcrlsd.policy import resolve_dtype
from tcrlsd.resume import ShardedOutput, output_settings, resume_dir, stage_fingerprint
from tcrlsd.score.inputs import ScoringInputs, check_vocab, encode_teacher_context, score_part
from tcrlsd.lm_head import check_head_path
from tcrlsd.score.params import ScoreError, ScoreParams
from tcrlsd.score.reuse import student_source
from tcrlsd.teachers import kept_teacher

# ----------------------------------------------------------------------------- the stage

# The resume fingerprint (tcrlsd.resume): the code that computes a part and the params that change it
# (batching, chunking and placement do not; the resolved dtype does, and where the student's log-probs
# come from: the outcome of reuse_sampler_logprobs, not the param, so auto and true agree).
CODE_MODULES = ("tcrlsd.score", "tcrlsd.policy", "tcrlsd.sampler")
NOT_OUTPUT = ("max_tokens_per_batch", "logits_chunk_tokens", "device", "reuse_sampler_logprobs")


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScoreError(f"params score.device is {name!r} but no CUDA device is available")
    return name


def teacher_checkpoint_for(params: ScoreParams, policy: str | os.PathLike, teacher_policy: str | os.PathLike | None) -> str:
    """The checkpoint that plays the teacher; errors when the mode and ``teacher_policy`` disagree.

    lagged / ema: ``teacher_policy`` when given, else the teacher kept in ``policy``'s folder (written
    by the previous update), else ``policy`` itself (before the first update: the starting policy).
    """
    if params.teacher == "current":
        if teacher_policy is not None:
            raise ScoreError(
                f"--teacher-policy {teacher_policy} was given but params score.teacher is 'current' (the student's "
                "own weights); set score.teacher to 'lagged' or 'ema', or drop --teacher-policy"
            )
        return str(policy)
    if teacher_policy is None:  # the teacher kept with the policy (tcrlsd.teachers); the policy itself at first
        return str(kept_teacher(policy))
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
    input_paths: dict | None = None,
    progress: bool = True,
    restart: bool = False,
) -> ScoreRunStats:
    """Score every pending part of this shard into the folder artifact ``out``.

    ``inputs`` is :func:`build_inputs` of ``rollouts`` (which is only read again for the
    vocabulary check).

    ``input_paths`` (name -> the rollouts and critiques artifacts) go into the resume fingerprint by
    content; with the code, the output-changing params and the checkpoints' contents it decides
    whether finished parts on disk are still valid (:mod:`tcrlsd.resume`).

    ``params.reuse_sampler_logprobs`` (:mod:`tcrlsd.score.reuse`): where the rollouts' sampler
    log-probs are the student forward's numbers, they are the student's and only teacher sequences
    run; without a teacher sequence to run no model is loaded at all.
    """
    import torch

    from tcrlsd.policy import load_policy, load_tokenizer
    from tcrlsd.progress import progress_bar

    teacher_ckpt = teacher_checkpoint_for(params, policy, teacher_policy)
    device = _resolve_device(params.device)
    dtype = resolve_dtype(params.dtype, device)  # the one rule (tcrlsd.policy)
    n = rollouts.num_rows
    plan = split_evenly(n, math.ceil(n / params.rows_per_part) if n else 1)
    fingerprint = stage_fingerprint(
        code=CODE_MODULES, settings=output_settings(params, NOT_OUTPUT) | {"dtype": dtype},
        inputs={**(input_paths or {}), "policy": policy,
                "teacher": teacher_ckpt if params.teacher != "current" else None},
        cache_dir=resume_dir(out), rows=n)
    where = str((input_paths or {}).get("rollouts", "rollouts"))
    source = student_source(params.reuse_sampler_logprobs, rollouts, policy_digest=fingerprint["inputs"]["policy"],
                            device=device, dtype=dtype, where=where)
    fingerprint["settings"]["student_logprobs_from"] = source.source
    sink = ShardedOutput(out, "scores", len(plan), fingerprint, restart=restart)
    pending = sink.pending(shard)
    stats = ScoreRunStats(device=device, dtype=dtype, extra=source.as_metrics())
    if inputs.extra_contexts:  # K > 1 only: the K = 1 metrics keep their keys
        stats.extra["teacher_contexts"] = 1 + inputs.extra_contexts
    stats.parts_skipped = sum(1 for p in range(len(plan)) if shard.owns(p)) - len(pending)
    if not pending:
        stats.complete = sink.complete()
        return stats

    # Forward tokens of the pending parts (the progress total): the student sequences (none when the
    # sampler's log-probs are reused) are known from the Arrow list lengths; each part's teacher
    # contexts are added to the total when it encodes them.
    p_len, r_len = inputs.lengths("prompt_token_ids"), inputs.lengths("response_token_ids")
    has_fb = inputs.has_feedback()
    total = teacher_rows = 0
    for part in pending:
        rows = slice(plan[part].start, plan[part].stop)
        nonempty = r_len[rows] > 0
        if not source.reuse:
            total += int(((p_len[rows] + r_len[rows]) * nonempty).sum())
        total += int((r_len[rows] * has_fb[rows]).sum())
        teacher_rows += int((has_fb[rows] & nonempty).sum())
    if inputs.extra_contexts:  # an extra context may have text where the primary has none
        teacher_rows += len(pending)

    tokenizer = load_tokenizer(policy, params.trust_remote_code)
    separate = params.teacher != "current" and Path(teacher_ckpt).resolve() != Path(policy).resolve()
    student = teacher = None  # teacher None: the student's weights play the teacher (pooled batches)
    if not source.reuse or (teacher_rows and not separate):
        student, _ = load_policy(policy, device=device, dtype=dtype, trust_remote_code=params.trust_remote_code)
    if separate and teacher_rows:
        t_tok = load_tokenizer(teacher_ckpt, params.trust_remote_code)
        if t_tok.get_vocab() != tokenizer.get_vocab():
            raise ScoreError(
                f"--teacher-policy {teacher_ckpt}: its tokenizer differs from the policy's ({policy}); the teacher "
                "must score the same response token ids"
            )
        teacher, _ = load_policy(teacher_ckpt, device=device, dtype=dtype, trust_remote_code=params.trust_remote_code)
    model = student if student is not None else teacher
    if model is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
    else:  # nothing to run (reuse, no teacher context): the checkpoint's config says the vocabulary size
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(policy), trust_remote_code=params.trust_remote_code).vocab_size
    check_vocab(rollouts, vocab, str(policy))

    # The load-time check: the stage's fp32 head path must reproduce model(ids).logits (logit
    # scales, soft-caps), on one short real sequence.
    check_ids = inputs.part(range(0, 1)) if n else None
    if check_ids is not None:
        ids = (check_ids.prompts[0] + check_ids.responses[0])[:64]
        for model in (student, teacher):
            if model is not None:
                check_head_path(model, ids)

    bar = progress_bar(total=total, unit="tok", unit_scale=True, desc="score", enabled=progress)
    start = time.perf_counter()
    try:
        for part in pending:
            rows = inputs.part(plan[part], sampler_logprobs=source.reuse)  # this part's rows only, as Python lists
            t_ids = [None if t is None else encode_teacher_context(tokenizer, t) for t in rows.teacher_prompts]
            x_ids = [[None if t is None else encode_teacher_context(tokenizer, t) for t in row]
                     for row in rows.extra_teacher_prompts]  # K - 1 extra contexts a row ([] at K = 1)
            bar.total += sum(len(c) for c, r in zip(t_ids, rows.responses) if c is not None and r)
            bar.total += sum(len(c) + len(r) for row, r in zip(x_ids, rows.responses) for c in row
                             if c is not None and r)
            bar.refresh()
            table, counts = score_part(rows, student, teacher, tokenizer, params, teacher_ckpt,
                                       on_batch=bar.update, teacher_contexts=t_ids, extra_contexts=x_ids)
            sink.write(part, table)
            stats.parts_done += 1
            stats.rows += counts["rows"]
            stats.forward_tokens += counts["forward_tokens"]
            stats.response_tokens_scored += counts["response_tokens_scored"]
            del rows, t_ids, x_ids, table
    finally:
        bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    stats.complete = sink.complete()
    return stats
