"""Score stage: student and teacher log-probs of every sampled response token.

For each rollout (x, y) with optional feedback f (from the critique stage):

    student_logprobs[t] = log pi_S(y_t | x, y_<t)       input: prompt_token_ids + response_token_ids
    teacher_logprobs[t] = log pi_T(y_t | c, y_<t)       input: encode_prompt(teacher_prompt) + response_token_ids

where c is the rendered teacher context (problem + feedback). The response ids are the sampled
ones, never re-tokenised text. Rows without feedback get teacher = student, copied, with no second
forward pass (Delta_t = 0 there, as in the method note).

Which weights play the teacher is a param: ``current`` (the student's checkpoint, the method note),
``lagged`` (a copy the update stage refreshes every K iterations, as RLSD's scripts do) or ``ema``
(a moving average kept by the update stage, as SDPO does). For the last two the caller passes the
teacher checkpoint folder; the student always is the current policy. ``teacher_checkpoint`` records
that folder (the policy path for ``current``) on every row, rows without feedback included, whose
teacher values are the student's by the rule above.

How the forward passes are laid out (the part a reader should check):

- Sequences are sorted by length (longest first, stable) and cut greedily into batches whose
  padded size ``batch_size * longest`` stays within ``max_tokens_per_batch``; a sequence longer
  than the budget runs alone. With ``current`` the student and teacher sequences share one pool.
- Padding goes on the right and no attention mask is passed: under causal attention a real token
  attends only to earlier positions, which are all real, so right padding cannot change a real
  token's output and the fused causal attention kernel stays usable.
- The log-prob of response token t comes from the logits at position ``len(context) + t - 1``.
  Only those positions go through the lm head: the decoder's hidden states are gathered at the
  response positions first, then projected in chunks of ``logits_chunk_tokens`` rows, so a full
  (B, T, V) logits tensor is never built. log-softmax runs in fp32 (logits are cast up even when
  the model runs in bf16).
- Output is written part by part (``rows_per_part`` rollouts each, contiguous in input order)
  through :class:`tcrlsd.artifacts.ShardedOutput`: memory is bounded by one part, a killed run
  resumes at the first missing part, and ``--shard i/N`` workers split the parts.

torch and transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.artifacts import ShardedOutput, ShardSpec, split_evenly
from tcrlsd.schemas import check_token_lengths, schema_for

__all__ = [
    "ScoreParams",
    "ScoreError",
    "TEACHER_MODES",
    "plan_batches",
    "response_logprobs",
    "ScoringInputs",
    "build_inputs",
    "check_vocab",
    "teacher_checkpoint_for",
    "score_part",
    "ScoreRunStats",
    "run_score",
    "score_metrics",
    "checkpoint_digest",
]

TEACHER_MODES = ("current", "lagged", "ema")


class ScoreError(ValueError):
    """The score stage's inputs or settings are wrong (message names the file, row or key)."""


@dataclass(frozen=True)
class ScoreParams:
    """``score:`` section of params.yaml."""

    teacher: Literal["current", "lagged", "ema"] = "current"  # which weights play the teacher
    max_tokens_per_batch: int = 8192  # padded tokens (batch_size * longest sequence) per forward pass
    logits_chunk_tokens: int = 1024  # response positions projected through the lm head at once
    rows_per_part: int = 512  # rollouts per output part (memory bound, resume and shard unit)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens_per_batch", "logits_chunk_tokens", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# ----------------------------------------------------------------------------- batching + forward


def plan_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, padded size within the budget.

    Sorting by length makes each batch's sequences nearly equal, so right padding wastes little;
    the tie-break on index keeps the plan (and hence the float results) deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) + 1) * max(longest, n) > max_tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def _lm_parts(model):
    """(decoder without head, lm head, final logit soft-cap or None) of a Hugging Face causal LM."""
    decoder = model.base_model
    head = model.get_output_embeddings()
    if decoder is model or head is None:
        raise ScoreError(f"{type(model).__name__}: cannot split the model into decoder and lm head")
    # The lm head is applied here instead of in model.forward, so any logit post-processing of a
    # forward must be repeated: Gemma-2/3's soft-cap is; an architecture with another (Cohere's
    # logit_scale) would need a line here.
    cap = getattr(model.config, "final_logit_softcapping", None)
    return decoder, head, cap


def _batch_logprobs(model, contexts, responses, logits_chunk_tokens: int) -> list[np.ndarray]:
    """Response-token log-probs of one batch (lists of id lists), one float32 array per sequence."""
    import torch

    decoder, head, cap = _lm_parts(model)
    device = head.weight.device
    lengths = [len(c) + len(r) for c, r in zip(contexts, responses)]
    B, T = len(lengths), max(lengths)
    ids = np.zeros((B, T), dtype=np.int64)  # right padding with id 0: never attended by real tokens
    rows, cols, targets = [], [], []
    for i, (c, r) in enumerate(zip(contexts, responses)):
        ids[i, : len(c)] = c
        ids[i, len(c) : lengths[i]] = r
        # logits at position p predict token p + 1: response token t sits at len(c) + t
        rows.append(np.full(len(r), i, dtype=np.int64))
        cols.append(np.arange(len(c) - 1, len(c) - 1 + len(r), dtype=np.int64))
        targets.append(np.asarray(r, dtype=np.int64))
    row_idx = torch.from_numpy(np.concatenate(rows)).to(device)  # (N,)
    col_idx = torch.from_numpy(np.concatenate(cols)).to(device)  # (N,)
    tgt = torch.from_numpy(np.concatenate(targets)).to(device)  # (N,)
    hidden = decoder(input_ids=torch.from_numpy(ids).to(device), use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[row_idx, col_idx]  # (N, H): only the response positions reach the lm head
    del hidden
    out = torch.empty(len(tgt), dtype=torch.float32, device=device)  # (N,)
    for s in range(0, len(tgt), logits_chunk_tokens):
        logits = head(h[s : s + logits_chunk_tokens]).float()  # (n, V) fp32
        if cap:
            logits = torch.tanh(logits / cap) * cap
        picked = logits.gather(1, tgt[s : s + logits_chunk_tokens, None]).squeeze(1)  # (n,)
        out[s : s + logits_chunk_tokens] = picked - torch.logsumexp(logits, dim=-1)
    flat = out.cpu().numpy()
    bounds = np.cumsum([0] + [len(r) for r in responses])
    return [flat[bounds[i] : bounds[i + 1]].copy() for i in range(B)]


def response_logprobs(
    model,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    max_tokens_per_batch: int,
    logits_chunk_tokens: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log p(response[t] | context, response[:t]) for each (context, response) pair, float32.

    ``contexts`` must be non-empty (the first response token is predicted from the last context
    position). Empty responses give empty arrays without a forward pass. ``on_batch`` is called
    with the number of real tokens after each forward pass (progress bars).
    """
    import torch

    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(contexts)
    todo = [i for i, r in enumerate(responses) if len(r)]
    for i in todo:
        if not len(contexts[i]):
            raise ValueError(f"sequence {i}: empty context; the first response token needs a preceding token")
    lengths = [len(contexts[i]) + len(responses[i]) for i in todo]
    with torch.inference_mode():
        for batch in plan_batches(lengths, max_tokens_per_batch):
            idx = [todo[j] for j in batch]
            got = _batch_logprobs(model, [contexts[i] for i in idx], [responses[i] for i in idx], logits_chunk_tokens)
            for i, lp in zip(idx, got):
                out[i] = lp
            if on_batch is not None:
                on_batch(sum(lengths[j] for j in batch))
    return out


# ----------------------------------------------------------------------------- rows -> sequences


@dataclass(frozen=True)
class ScoringInputs:
    """Aligned per-rollout inputs of the score stage (critiques reordered to rollouts' order)."""

    rollout_ids: list[str]
    prompts: list[list[int]]  # student context = prompt_token_ids
    responses: list[list[int]]  # the sampled ids
    teacher_prompts: list[str | None]  # rendered teacher context text; None = no feedback

    def __len__(self) -> int:
        return len(self.rollout_ids)


def build_inputs(rollouts: pa.Table, critiques: pa.Table, *, critiques_source: str | None = None) -> ScoringInputs:
    """Join critiques onto rollouts by rollout_id and check what the forward passes rely on.

    Errors name the rollout_id: a rollout without a critique row (or the reverse), feedback_text
    and teacher_prompt disagreeing about whether there is feedback, an empty prompt.
    """
    crit = check_token_lengths(rollouts, critiques, "critiques", source=critiques_source)
    where = f"{critiques_source}: " if critiques_source else ""
    ids = rollouts.column("rollout_id").to_pylist()
    fb_null = pc.is_null(crit.column("feedback_text")).to_pylist()
    tp = crit.column("teacher_prompt").to_pylist()
    for rid, f_null, t in zip(ids, fb_null, tp):
        if f_null != (t is None):
            raise ScoreError(
                f"{where}rollout_id {rid!r}: feedback_text is {'null' if f_null else 'set'} but teacher_prompt is "
                f"{'null' if t is None else 'set'}; both must be null (no feedback) or both set"
            )
    empty = pc.equal(pc.list_value_length(rollouts.column("prompt_token_ids")), 0)
    if pc.any(empty).as_py():
        rid = ids[pc.indices_nonzero(empty)[0].as_py()]
        raise ScoreError(f"rollouts: rollout_id {rid!r}: prompt_token_ids is empty; expected the policy's input ids")
    prompts = rollouts.column("prompt_token_ids").to_pylist()
    responses = rollouts.column("response_token_ids").to_pylist()
    return ScoringInputs(ids, prompts, responses, tp)


def check_vocab(rollouts: pa.Table, vocab_size: int, policy: str) -> None:
    """Every prompt/response id must index the policy's embedding; the error names the rollout."""
    for col in ("prompt_token_ids", "response_token_ids"):
        arr = rollouts.column(col)
        flat = pc.list_flatten(arr)
        if not len(flat):
            continue
        bad = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, vocab_size))
        if pc.any(bad).as_py():
            k = pc.indices_nonzero(bad)[0].as_py()
            row = pc.list_parent_indices(arr)[k].as_py()
            raise ScoreError(
                f"rollouts: rollout_id {rollouts.column('rollout_id')[row].as_py()!r}: {col} holds id "
                f"{flat[k].as_py()}, outside the vocabulary of {policy} (0..{vocab_size - 1}); "
                "were the rollouts generated by another model?"
            )


def score_part(
    inputs: ScoringInputs,
    rows: Sequence[int],
    student,
    teacher,
    tokenizer,
    params: ScoreParams,
    teacher_checkpoint: str,
    on_batch: Callable[[int], None] | None = None,
    teacher_contexts: dict[int, list[int]] | None = None,
) -> tuple[pa.Table, dict]:
    """Scores table of ``rows`` (indices into ``inputs``), and token counts of the work done.

    ``teacher`` is None when the student's weights play the teacher (``current``): then student
    and teacher sequences are batched together through one model. ``teacher_contexts`` may hold
    already encoded teacher prompts by row index.
    """
    from tcrlsd.policy import encode_prompt

    rows = list(rows)
    cache = teacher_contexts or {}
    responses = [inputs.responses[i] for i in rows]
    fb = [j for j, i in enumerate(rows) if inputs.teacher_prompts[i] is not None]
    s_ctx = [inputs.prompts[i] for i in rows]
    t_ctx = [cache.get(rows[j]) or encode_prompt(tokenizer, inputs.teacher_prompts[rows[j]]) for j in fb]
    t_resp = [responses[j] for j in fb]
    kw = dict(max_tokens_per_batch=params.max_tokens_per_batch, logits_chunk_tokens=params.logits_chunk_tokens,
              on_batch=on_batch)
    if teacher is None:
        both = response_logprobs(student, s_ctx + t_ctx, responses + t_resp, **kw)
        student_lp, teacher_fb = both[: len(rows)], both[len(rows) :]
    else:
        student_lp = response_logprobs(student, s_ctx, responses, **kw)
        teacher_fb = response_logprobs(teacher, t_ctx, t_resp, **kw)
    teacher_lp = list(student_lp)  # no feedback: teacher = student, no second pass
    for j, lp in zip(fb, teacher_fb):
        teacher_lp[j] = lp
    schema = schema_for("scores")
    table = pa.table(
        {
            "rollout_id": pa.array([inputs.rollout_ids[i] for i in rows], pa.string()),
            "student_logprobs": pa.array([a.tolist() for a in student_lp], schema.field("student_logprobs").type),
            "teacher_logprobs": pa.array([a.tolist() for a in teacher_lp], schema.field("teacher_logprobs").type),
            "teacher_checkpoint": pa.array([teacher_checkpoint] * len(rows), pa.string()),
        },
        schema=schema,
    )
    counts = {
        "rows": len(rows),
        "forward_tokens": sum(len(c) + len(r) for c, r in zip(s_ctx + t_ctx, responses + t_resp) if r),
        "response_tokens_scored": sum(len(r) for r in responses + t_resp),
    }
    return table, counts


# ----------------------------------------------------------------------------- the stage


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_digest(path: str | os.PathLike) -> str:
    """sha256 over the bytes of an artifact file, or of every file (sorted) in a folder.

    Content, not mtimes: a DVC checkout that restores the same bytes keeps finished parts valid.
    """
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) if p.is_dir() else [p]
    return _file_digest(files)


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
    from tqdm import tqdm

    from tcrlsd.policy import load_policy, load_tokenizer

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
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="score", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
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


# ----------------------------------------------------------------------------- metrics

_ABS_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024)


def _bucket_label(k: int) -> str:
    lo = _ABS_EDGES[k]
    return f"{lo}-{_ABS_EDGES[k + 1] - 1}" if k + 1 < len(_ABS_EDGES) else f"{lo}+"


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x, dtype=np.float64)) if len(x) else None


def score_metrics(scores: pa.Table, inputs: ScoringInputs) -> dict:
    """Delta-gap summary of a complete scores artifact.

    Delta_t = teacher - student, over the tokens of rows with feedback (rows without have Delta = 0
    by construction and would only dilute the mean). Also its spread over token positions: mean
    Delta per relative-position decile (t / T, so short and long responses weigh alike per decile)
    and per absolute-position bucket.
    """
    scores = check_token_lengths(
        pa.table({"rollout_id": inputs.rollout_ids,
                  "response_token_ids": pa.array(inputs.responses, pa.list_(pa.int32()))}),
        scores, "scores",
    )
    has_fb = np.array([t is not None for t in inputs.teacher_prompts], dtype=bool)
    s_col, t_col = scores.column("student_logprobs"), scores.column("teacher_logprobs")
    lengths = pc.list_value_length(s_col).to_numpy(zero_copy_only=False).astype(np.int64)
    student = pc.list_flatten(s_col).to_numpy(zero_copy_only=False).astype(np.float64)
    teacher = pc.list_flatten(t_col).to_numpy(zero_copy_only=False).astype(np.float64)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    pos = np.arange(len(student)) - np.repeat(starts, lengths)  # token index t within its response
    fb_tok = has_fb[row_of] if len(row_of) else np.zeros(0, dtype=bool)
    delta = (teacher - student)[fb_tok]
    d_pos, d_len = pos[fb_tok], lengths[row_of][fb_tok]
    nofb_equal = bool(np.array_equal(teacher[~fb_tok], student[~fb_tok]))

    decile = np.minimum((10 * d_pos) // np.maximum(d_len, 1), 9)
    bucket = np.searchsorted(np.asarray(_ABS_EDGES), d_pos, side="right") - 1
    row_sums = np.bincount(row_of, weights=teacher - student, minlength=len(lengths))
    with_tokens = has_fb & (lengths > 0)
    row_means = row_sums[with_tokens] / lengths[with_tokens]

    def _table(keys, labels):
        return [{"bucket": lab, "tokens": int(np.sum(keys == k)), "mean_delta": _mean(delta[keys == k])}
                for k, lab in labels]

    return {
        "rollouts": int(len(lengths)),
        "rollouts_with_feedback": int(has_fb.sum()),
        "critique_coverage": float(has_fb.mean()) if len(has_fb) else None,
        "response_tokens": int(len(student)),
        "feedback_response_tokens": int(len(delta)),
        "delta_gap": _mean(delta),  # token mean of teacher - student over rows with feedback
        "delta_gap_row_mean": _mean(row_means),  # mean over feedback rows of their token-mean Delta
        "delta_std": float(np.std(delta)) if len(delta) else None,
        "delta_positive_share": float(np.mean(delta > 0)) if len(delta) else None,
        "student_logprob_mean": _mean(student),
        "student_logprob_mean_feedback_rows": _mean(student[fb_tok]),
        "teacher_logprob_mean_feedback_rows": _mean(teacher[fb_tok]),
        "teacher_equals_student_without_feedback": nofb_equal,
        "delta_by_relative_decile": _table(decile, [(k, f"{k / 10:.1f}-{(k + 1) / 10:.1f}") for k in range(10)]),
        "delta_by_position": _table(bucket, [(k, _bucket_label(k)) for k in range(len(_ABS_EDGES))]),
    }
