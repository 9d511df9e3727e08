"""The evaluate stage: held-out accuracy of one policy checkpoint.

For every prompt with ``split == "val"`` (all of them, or the first ``max_prompts`` in prompt_id
order) the policy answers once greedily (mean@1) and ``samples`` times at ``temperature`` (avg@k:
the mean over prompts of each prompt's share of correct samples; verl's ``val_kwargs`` do
n=32 at 0.6), pass@k (a prompt counts when any sample is correct) and maj@k (the answer most
samples give is correct: :mod:`tcrlsd.evaluate.votes`). Responses go through the same generation
backend registry as the generate stage and are graded by the verify stage's graders and worker
pool, so "correct" means the same thing in training and evaluation. Metrics are broken down by ``source`` and ``level``.

The output is a folder of parts (``evaluations`` schema, one row per prompt x decoding x sample),
resumable like the generate stage: a part is a contiguous slice of the val prompts with both its
greedy and its sampled rows; a rerun keeps finished parts while the fingerprint (params, inputs)
matches. Sampling seeds are derive_seed(seed, "eval", part): the same checkpoint gives the same
bytes whichever iteration evaluates it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from tcrlsd.artifacts import ShardSpec, read_artifact, split_evenly
from tcrlsd.evaluate.votes import majority_score
from tcrlsd.generation import Completion, EngineParams, SamplingConfig, SamplingParams
from tcrlsd.schemas import SchemaError, schema_for

__all__ = ["EvaluateParams", "load_params", "val_prompt_ids", "evaluation_rows",
           "evaluation_metrics", "run_evaluate"]


@dataclass(frozen=True)
class EvaluateParams:
    """The ``evaluate:`` section of params.yaml (documented there key by key)."""

    max_prompts: int | None = None
    split: str = "val"  # which prompts split is evaluated: val (the dev set) | test (the final table only)
    samples: int = 4
    seed: int = 0
    num_parts: int = 2
    backend: str = "transformers"
    num_threads: int = 0
    # the avg@k samples' sampling; the greedy answer uses its max_new_tokens
    sampling: SamplingParams = SamplingParams(temperature=0.6, top_p=1.0, max_new_tokens=96)
    engine: EngineParams = field(default_factory=EngineParams)

    def __post_init__(self):
        from tcrlsd.generate.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"evaluate.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.split not in ("val", "test"):
            raise ValueError(f"evaluate.split must be val or test (a held-out split of the prompts file), got {self.split!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"evaluate.max_prompts must be >= 1 or null (all val prompts), got {self.max_prompts}")
        if self.samples < 0:
            raise ValueError(f"evaluate.samples must be >= 0 (0 = greedy only), got {self.samples}")
        if self.samples and not self.sampling.temperature > 0:
            raise ValueError(f"evaluate.sampling.temperature must be > 0 for sampled avg@k, got "
                             f"{self.sampling.temperature}")
        if self.num_parts < 1:
            raise ValueError(f"evaluate.num_parts must be >= 1, got {self.num_parts}")
        if self.num_threads < 0:
            raise ValueError(f"evaluate.num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")

    def backend_options(self) -> dict:
        return self.engine.options(seed=self.seed)


def load_params(params_path: str | os.PathLike, preset: str | os.PathLike | None = None):
    """(EvaluateParams, VerifyParams) from the ``evaluate`` and ``verify`` sections: grading as in training."""
    from tcrlsd.params import load_section
    from tcrlsd.verify.params import VerifyParams

    return (load_section(params_path, "evaluate", EvaluateParams, preset=preset),
            load_section(params_path, "verify", VerifyParams, preset=preset))


def val_prompt_ids(prompts: pa.Table, max_prompts: int | None, source: str | None = None,
                   split: str = "val") -> list[str]:
    """The held-out prompt ids (``split``: val, or test for the final table), sorted, cut to ``max_prompts``."""
    ids = sorted(pid for pid, s in zip(prompts.column("prompt_id").to_pylist(),
                                      prompts.column("split").to_pylist()) if s == split)
    if not ids:
        raise SchemaError(f"{source or 'prompts'}: no rows with split == {split!r}; evaluate needs held-out prompts"
                          + (" (add a test source to prepare.sources)" if split == "test" else ""))
    return ids[:max_prompts] if max_prompts else ids


def evaluation_rows(prompt_ids: Sequence[str], greedy: Sequence[Completion],
                    sampled: Sequence[Sequence[Completion]]) -> dict[str, list]:
    """Ungraded columns (reward/reason filled later) for prompts in order: greedy row, then samples."""
    cols: dict[str, list] = {f.name: [] for f in schema_for("evaluations")}

    def add(pid: str, decoding: str, j: int, c: Completion) -> None:
        cols["eval_id"].append(f"{pid}#greedy" if decoding == "greedy" else f"{pid}#s{j}")
        cols["prompt_id"].append(pid)
        cols["decoding"].append(decoding)
        cols["sample_idx"].append(j)
        cols["response_text"].append(c.text)
        cols["response_length"].append(len(c.token_ids))
        cols["finish_reason"].append(c.finish_reason)

    for i, pid in enumerate(prompt_ids):
        add(pid, "greedy", 0, greedy[i])
        for j, c in enumerate(sampled[i] if sampled else ()):
            add(pid, "sampled", j, c)
    return cols


def grade_eval_rows(cols: dict[str, list], prompts: pa.Table, verify_params, prompts_source: str | None) -> None:
    """Fill reward and reason through the verify stage's graders (same pool, same reasons)."""
    from tcrlsd.verify.stage import verify_rollouts

    table = pa.table({"rollout_id": cols["eval_id"], "prompt_id": cols["prompt_id"],
                      "response_text": cols["response_text"]})
    verdicts, _ = verify_rollouts(table, prompts, verify_params, progress=False, prompts_source=prompts_source)
    cols["reward"] = verdicts.column("reward").to_pylist()
    cols["extracted_answer"] = verdicts.column("extracted_answer").to_pylist()
    cols["reason"] = verdicts.column("reason").to_pylist()


def _accuracy(rows: list[dict]) -> dict:
    """mean@1 over greedy rows; avg@k (per-prompt mean, then mean over prompts), pass@k and maj@k
    (:func:`tcrlsd.evaluate.votes.majority_score`, mean over prompts) over samples."""
    greedy = [r["reward"] for r in rows if r["decoding"] == "greedy"]
    per_prompt: dict[str, list[tuple[str | None, float]]] = defaultdict(list)
    for r in rows:
        if r["decoding"] == "sampled":
            per_prompt[r["prompt_id"]].append((r["extracted_answer"], r["reward"]))
    out = {"prompts": len(greedy), "greedy_mean_at_1": sum(greedy) / len(greedy) if greedy else None}
    if per_prompt:
        means = [sum(w for _, w in v) / len(v) for v in per_prompt.values()]
        out["avg_at_k"] = sum(means) / len(means)
        out["pass_at_k"] = sum(1.0 for v in per_prompt.values() if max(w for _, w in v) > 0) / len(per_prompt)
        out["maj_at_k"] = sum(majority_score(v) for v in per_prompt.values()) / len(per_prompt)
    else:
        out["avg_at_k"] = out["pass_at_k"] = out["maj_at_k"] = None
    return out


def evaluation_metrics(table: pa.Table, prompts: pa.Table, params: EvaluateParams) -> dict:
    """Accuracy overall and by source and level, response lengths, reasons."""
    info = {pid: (src, lvl) for pid, src, lvl in zip(prompts.column("prompt_id").to_pylist(),
                                                     prompts.column("source").to_pylist(),
                                                     prompts.column("level").to_pylist())}
    rows = table.select(["prompt_id", "decoding", "reward", "extracted_answer", "reason", "response_length",
                         "finish_reason"]).to_pylist()
    by_source: dict[str, list[dict]] = defaultdict(list)
    by_level: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        src, lvl = info[r["prompt_id"]]
        by_source[src].append(r)
        by_level["unknown" if lvl is None else str(lvl)].append(r)
    reasons: dict[str, int] = defaultdict(int)
    for r in rows:
        reasons[f"{r['decoding']}/{r['reason']}"] += 1
    n = len(rows)
    return {
        **_accuracy(rows),
        "samples": params.samples,
        "temperature": params.sampling.temperature,
        "mean_response_tokens": sum(r["response_length"] for r in rows) / n if n else 0.0,
        "share_finish_length": sum(r["finish_reason"] == "length" for r in rows) / n if n else 0.0,
        "by_source": {k: _accuracy(v) for k, v in sorted(by_source.items())},
        "by_level": {k: _accuracy(v) for k, v in sorted(by_level.items())},
        "reasons": dict(sorted(reasons.items())),
    }


def run_evaluate(params: EvaluateParams, verify_params, prompts_path: str | os.PathLike,
                 policy_path: str | os.PathLike, out: str | os.PathLike, shard: ShardSpec | None = None,
                 progress: bool = True, restart: bool = False) -> dict:
    """Evaluate ``policy_path`` on the val prompts into the folder ``out``; returns metrics.

    Metrics are computed over the whole artifact when it is complete, else ``{"complete": False}``
    plus progress counts (a worker of a sharded run that finishes early).
    """
    from tcrlsd.generate.backends import derive_seed, make_backend
    from tcrlsd.policy import encode_prompt, load_tokenizer
    from tcrlsd.progress import progress_bar

    prompts = read_artifact(prompts_path, "prompts")
    ids = val_prompt_ids(prompts, params.max_prompts, str(prompts_path), params.split)
    text_of = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    parts = split_evenly(len(ids), params.num_parts)
    from tcrlsd.resume import ShardedOutput, output_settings, resume_dir, stage_fingerprint

    fingerprint = stage_fingerprint(
        code=("tcrlsd.evaluate", "tcrlsd.generate.backends", "tcrlsd.verify", "tcrlsd.policy"),
        settings=output_settings(params, ("engine.device", "engine.batch_size", "engine.max_batch_tokens",
                                          "engine.tensor_parallel_size", "engine.gpu_memory_utilization",
                                          "num_threads")),
        inputs={"prompts": prompts_path, "policy": policy_path}, cache_dir=resume_dir(out),
        verify=dataclasses.asdict(verify_params))
    output = ShardedOutput(out, "evaluations", len(parts), fingerprint, restart=restart)
    pending = output.pending(shard or ShardSpec())
    if pending:
        if params.num_threads:
            import torch

            torch.set_num_threads(params.num_threads)
        tokenizer = load_tokenizer(policy_path, params.engine.trust_remote_code)
        backend = make_backend(params.backend, str(policy_path), **params.backend_options())
        bar = progress_bar(sum(len(parts[p]) for p in pending) * (1 + params.samples), desc="evaluate",
                           unit="response", enabled=progress)
        for p in pending:
            chunk = [ids[i] for i in parts[p]]
            ptoks = [encode_prompt(tokenizer, text_of[pid]) for pid in chunk]
            greedy = [g[0] for g in backend.generate(
                ptoks, 1, SamplingConfig(0.0, 1.0, params.sampling.max_new_tokens,
                                         derive_seed(params.seed, "eval-greedy", p)))]
            bar.update(len(chunk))
            sampled: list[list[Completion]] = []
            if params.samples:
                sampled = backend.generate(ptoks, params.samples,
                                           params.sampling.config(derive_seed(params.seed, "eval", p)))
                bar.update(len(chunk) * params.samples)
            cols = evaluation_rows(chunk, greedy, sampled)
            grade_eval_rows(cols, prompts, verify_params, str(prompts_path))
            output.write(p, pa.Table.from_pydict(cols, schema=schema_for("evaluations")))
        bar.close()
    done = [p for p in range(len(parts)) if output.done(p)]
    if not output.complete():
        return {"complete": False, "parts_total": len(parts), "parts_done": len(done)}
    table = read_artifact(out, "evaluations")
    metrics = evaluation_metrics(table, prompts, params)
    metrics.update({"complete": True, "policy": str(policy_path), "split": params.split, "parts_total": len(parts),
                    "parts_evaluated_now": len(pending)})
    return metrics
