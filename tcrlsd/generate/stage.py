"""The generate stage: params and :func:`run_generate`."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from tcrlsd.artifacts import ShardSpec, read_artifact, split_evenly
from tcrlsd.generate.backend_base import derive_seed
from tcrlsd.generate.backends import BACKENDS
from tcrlsd.generate.selection import select_prompts, train_prompt_ids
from tcrlsd.generation import PROMPT_TOO_LONG, EngineParams, SamplingConfig, SamplingParams, check_completions
from tcrlsd.sampler import sampler_record
from tcrlsd.resume import ShardedOutput, output_settings, resume_dir, stage_fingerprint
from tcrlsd.schemas import schema_for

# The resume fingerprint (tcrlsd.resume): the code that computes a part and the params that change it;
# the others only place or pace the work.
CODE_MODULES = ("tcrlsd.generate", "tcrlsd.generation", "tcrlsd.policy", "tcrlsd.sampler")
NOT_OUTPUT = ("engine.device", "engine.batch_size", "engine.max_batch_tokens", "engine.tensor_parallel_size",
              "engine.gpu_memory_utilization", "num_threads")
# With dynamic sampling a part also depends on the grading and the estimator's zero-advantage rule.
DYNAMIC_CODE_MODULES = ("tcrlsd.verify", "tcrlsd.advantages", "tcrlsd.feedback")


@dataclass(frozen=True)
class GenerateParams:
    """The ``generate:`` section of params.yaml (documented there key by key)."""

    backend: str = "transformers"
    prompts_per_step: int = 32
    samples_per_prompt: int = 8
    seed: int = 0
    num_parts: int = 4
    num_threads: int = 0
    sampling: SamplingParams = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=96)
    engine: EngineParams = field(default_factory=EngineParams)
    train_levels: tuple[int, ...] = ()
    dynamic_sampling: bool = False
    max_draw_rounds: int = 3

    def __post_init__(self):
        object.__setattr__(self, "train_levels", tuple(self.train_levels or ()))
        if self.backend not in BACKENDS:
            raise ValueError(f"generate.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        for name in ("prompts_per_step", "samples_per_prompt", "num_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"generate.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_draw_rounds < 0:
            raise ValueError(f"generate.max_draw_rounds must be >= 0, got {self.max_draw_rounds}")
        if self.num_threads < 0:
            raise ValueError(f"generate.num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")

    def backend_options(self) -> dict:
        return self.engine.options(seed=self.seed)

    def sampling_config(self, iteration: int, part: int, draw_round: int = 0) -> SamplingConfig:
        """Round 0: the part's seed; dynamic sampling's extra rounds r > 0 get seeds of their own."""
        seed = derive_seed(self.seed, iteration, part) if draw_round == 0 else derive_seed(
            self.seed, iteration, part, "draw", draw_round)
        return self.sampling.config(seed)


# --------------------------------------------------------------------------------------------------
# the stage


def rollout_rows(prompt_ids, prompt_token_ids, groups, iteration: int, sampler: str) -> dict[str, list]:
    """Columns of the rollouts table for prompts in order, each with its group of completions;
    ``sampler``: the :func:`tcrlsd.sampler.sampler_record` of the run that drew them."""
    cols: dict[str, list] = {f.name: [] for f in schema_for("rollouts")}
    for pid, ptoks, group in zip(prompt_ids, prompt_token_ids, groups):
        for j, c in enumerate(group):
            cols["rollout_id"].append(f"{pid}#{j}")
            cols["prompt_id"].append(pid)
            cols["sample_idx"].append(j)
            cols["iteration"].append(iteration)
            cols["prompt_token_ids"].append(list(ptoks))
            cols["response_token_ids"].append(list(c.token_ids))
            cols["response_text"].append(c.text)
            cols["finish_reason"].append(c.finish_reason)
            if len(c.logprobs) != len(c.token_ids):
                raise RuntimeError(f"rollout {pid}#{j}: the generation backend gave {len(c.logprobs)} sampler log-probs "
                                   f"for {len(c.token_ids)} ids; rollouts need one per id (sampler_logprobs)")
            cols["sampler_logprobs"].append(list(c.logprobs))
            cols["sampler"].append(sampler)
    return cols


def rollout_metrics(rollouts: pa.Table) -> dict:
    """Counts, mean response length and share of truncated responses of a rollouts table."""
    import pyarrow.compute as pc

    n = rollouts.num_rows
    lengths = pc.list_value_length(rollouts.column("response_token_ids"))
    n_length = pc.sum(pc.equal(rollouts.column("finish_reason"), "length")).as_py() or 0
    n_too_long = pc.sum(pc.equal(rollouts.column("finish_reason"), PROMPT_TOO_LONG)).as_py() or 0
    n_stop = pc.sum(pc.equal(rollouts.column("finish_reason"), "stop")).as_py() or 0
    return {
        "rollouts": n,
        "prompts": pc.count_distinct(rollouts.column("prompt_id")).as_py() if n else 0,
        "response_tokens": int(pc.sum(lengths).as_py() or 0),
        "mean_response_tokens": float(pc.mean(lengths).as_py()) if n else 0.0,
        "max_response_tokens": int(pc.max(lengths).as_py()) if n else 0,
        "share_finish_length": n_length / n if n else 0.0,
        "prompt_too_long": n_too_long,
        "share_finish_stop": n_stop / n if n else 0.0,  # these end with their stop id (a scored token)
    }


def run_generate(
    params: GenerateParams,
    prompts_path: str | os.PathLike,
    policy_path: str | os.PathLike,
    iteration: int,
    out: str | os.PathLike,
    shard: ShardSpec | None = None,
    progress: bool = True,
    restart: bool = False,
    dynamic=None,
) -> dict:
    """Generate this worker's pending parts of iteration ``iteration`` into the folder ``out``.

    ``dynamic``: ``(GroupFilter, VerifyParams)`` from :func:`tcrlsd.generate.dynamic.load_group_filter`,
    required when ``params.dynamic_sampling`` (groups without signal are replaced by new draws).
    Returns metrics: over the whole artifact when it is complete, else over the parts present, plus
    what this call generated and its throughput.
    """
    from tcrlsd.generate.backends import make_backend
    from tcrlsd.policy import encode_prompt, load_tokenizer

    if params.dynamic_sampling and dynamic is None:
        raise ValueError("generate.dynamic_sampling is on: run_generate needs the group filter and verify params "
                         "(tcrlsd.generate.dynamic.load_group_filter)")
    prompts = read_artifact(prompts_path, "prompts")
    train_ids = train_prompt_ids(prompts, str(prompts_path), params.train_levels)
    chosen = select_prompts(train_ids, params.prompts_per_step, params.seed, iteration)
    text_of = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    parts = split_evenly(len(chosen), params.num_parts)
    settings, code = output_settings(params, NOT_OUTPUT), CODE_MODULES
    if params.dynamic_sampling:
        settings |= {"group_filter": dynamic[0].as_dict(), "verify": asdict(dynamic[1])}
        code = CODE_MODULES + DYNAMIC_CODE_MODULES
    fingerprint = stage_fingerprint(code=code, settings=settings,
                                    inputs={"prompts": prompts_path, "policy": policy_path},
                                    cache_dir=resume_dir(out), iteration=iteration)
    output = ShardedOutput(out, "rollouts", len(parts), fingerprint, restart=restart)
    # What draws this run's rows, on every row: the score stage decides from it whether the sampler's
    # log-probs are its own student forward (tcrlsd.sampler.reuse_blocker). The policy digest is the
    # fingerprint's (hashed once).
    sampler = sampler_record(backend=params.backend, device=params.engine.device, dtype=params.engine.dtype,
                             temperature=params.sampling.temperature, top_p=params.sampling.top_p,
                             policy=fingerprint["inputs"]["policy"])
    pending = output.pending(shard or ShardSpec())
    started = time.perf_counter()
    new_rollouts = new_tokens = 0
    if pending:
        if params.num_threads:
            import torch

            torch.set_num_threads(params.num_threads)
        tokenizer = load_tokenizer(policy_path, params.engine.trust_remote_code)
        backend = make_backend(params.backend, str(policy_path), **params.backend_options())
        bar = _bar(sum(len(parts[p]) for p in pending) * params.samples_per_prompt, progress)

        def sample(ids, p, draw_round=0):
            nonlocal new_tokens
            ptoks = [encode_prompt(tokenizer, text_of[pid]) for pid in ids]
            groups = backend.generate(ptoks, params.samples_per_prompt, params.sampling_config(iteration, p, draw_round))
            check_completions(groups, backend.stop_ids, params.sampling.max_new_tokens, f"{params.backend} backend, part {p}")
            new_tokens += sum(len(c.token_ids) for g in groups for c in g)
            bar.update(len(ids) * params.samples_per_prompt)
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            return ptoks, groups

        reserve = None
        if params.dynamic_sampling:
            from tcrlsd.generate.dynamic import reserve_for_parts

            reserve = reserve_for_parts(train_ids, chosen, len(parts), params.seed, iteration)
        for p in pending:
            ids = [chosen[i] for i in parts[p]]
            if params.dynamic_sampling:
                ids, ptoks, groups = _fill_part(ids, reserve[p], p, sample, prompts, params, dynamic, iteration,
                                                output.resume / f"draws-{p:05d}.json", sampler)
            else:
                ptoks, groups = sample(ids, p)
            table = pa.Table.from_pydict(rollout_rows(ids, ptoks, groups, iteration, sampler),
                                         schema=schema_for("rollouts"))
            output.write(p, table)
            new_rollouts += table.num_rows
        bar.close()
    seconds = time.perf_counter() - started
    done = [p for p in range(len(parts)) if output.done(p)]
    metrics = rollout_metrics(_read_parts(output, done)) if done else rollout_metrics(schema_for("rollouts").empty_table())
    draws = None
    if params.dynamic_sampling:
        from tcrlsd.generate.dynamic import sum_records

        draws = sum_records(output.resume / f"draws-{p:05d}.json" for p in done)
    metrics.update({
        "iteration": iteration,
        "complete": output.complete(),
        "parts_total": len(parts),
        "parts_done": len(done),
        "parts_generated_now": len(pending),
        "rollouts_generated_now": new_rollouts,
        "tokens_generated_now": new_tokens,
        "seconds_generating": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if new_tokens else 0.0,
        "backend": params.backend,
        # prompt groups sampled for this iteration: prompts_per_step, or more with dynamic sampling
        "prompts_drawn": draws["drawn"] if draws else (sum(len(parts[p]) for p in done) if not params.dynamic_sampling
                                                       else None),
        "dynamic_sampling": draws,
    })
    return metrics


def _fill_part(base, reserve, part, sample, prompts, params: GenerateParams, dynamic, iteration: int, record_path,
               sampler: str):
    """Dynamic sampling of one part (:mod:`tcrlsd.generate.dynamic`): ``(ids, prompt ids, groups)`` of
    the kept groups in draw order; the part's draw record is written to ``record_path``."""
    from tcrlsd.generate.dynamic import DrawRecord, groups_with_signal
    from tcrlsd.verify.stage import verify_rollouts

    flt, verify_params = dynamic
    quota = len(base)
    rec = DrawRecord(quota=quota)
    kept: list[tuple] = []
    batch, cursor = list(base), 0
    for draw_round in range(params.max_draw_rounds + 1):
        if draw_round:
            if len(kept) >= quota or cursor >= len(reserve):
                break
            batch = reserve[cursor:cursor + quota]
            cursor += len(batch)
            rec.extra_rounds = draw_round
        ptoks, groups = sample(batch, part, draw_round)
        table = pa.Table.from_pydict(rollout_rows(batch, ptoks, groups, iteration, sampler),
                                     schema=schema_for("rollouts"))
        verdicts, _ = verify_rollouts(table, prompts, verify_params, overlong_max_tokens=params.sampling.max_new_tokens)
        signal = groups_with_signal(table.column("prompt_id").to_pylist(), verdicts.column("reward").to_pylist(),
                                    verdicts.column("is_correct").to_pylist(),
                                    table.column("finish_reason").to_pylist(), flt)
        rec.drawn += len(batch)
        for pid, pt, group in zip(batch, ptoks, groups):
            if not signal[pid]:
                rec.dropped += 1
            elif len(kept) < quota:
                kept.append((pid, pt, group))
            else:
                rec.surplus += 1
    rec.kept = len(kept)
    rec.write(record_path)
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def _read_parts(output: ShardedOutput, parts: list[int]) -> pa.Table:
    from tcrlsd.artifacts import read_table

    tables = [read_table(output.part_path(p), "rollouts") for p in parts]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _bar(total: int, enabled: bool):
    from tcrlsd.progress import progress_bar

    return progress_bar(total=total, unit="rollout", desc="generate", enabled=enabled)
