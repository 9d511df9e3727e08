"""The trl_grpo peer: TRL's GRPOTrainer from a workspace's warm start, on the pipeline's budget and schedule.

    python -m tcrlsd.commands.trl_grpo --workspace DIR
    # run by `tcrlsd experiment --presets grpo,trl_grpo,...` in DIR/runs/trl_grpo-sS (tcrlsd/loop/peers.py)

DIR is a workspace prepared like a grpo run whose `dvc repro baseline` has run: params.yaml,
iterations.yaml (K items), data/prompts.parquet, the warm start (the first item's policy) and
data/metrics/evaluate-baseline.json. Everything TRL is told comes from params.yaml
(:func:`grpo_settings`, recorded in DIR/peer.json):

- budget and schedule: an iteration is one generation of generate.prompts_per_step prompts x
  samples_per_prompt samples, cut into optimizer steps of update.mini_batch_prompts prompts, passed
  over update.ppo_epochs times (TRL: steps_per_generation = prompts_per_step / mini_batch_prompts,
  per_device_train_batch_size = mini_batch_prompts x samples_per_prompt, num_iterations = ppo_epochs);
  K iterations = K x steps-per-iteration optimizer steps (max_steps).
- the update's AdamW (lr, betas, eps, weight decay, grad clip), constant LR, PPO clip (clip_ratio_low /
  high), entropy bonus, KL (kl_coef = TRL's beta: the same k3 to the starting policy), loss aggregation,
  the group std normalisation, truncation masking; generate.sampling's temperature, top_p and
  max_new_tokens; update.seed (= the run's seed).
- reward: the verify stage's own function (:func:`tcrlsd.verify.verify_rollouts`: graders by source,
  deadlines, DAPO's overlong penalty when set) on TRL's completions.
- prompts: the train split in the order the generate stage walks it for the seed
  (:func:`tcrlsd.generate.select_prompts`): TRL's k-th generation holds iteration k's prompts
  (dataset shuffling off); each prompt's text tokenizes to the generate stage's ids (checked).
- fp32 without gradient checkpointing on CPU (:data:`CPU_SAME_WORK`, as the update); torch threads:
  update.num_threads, or at 0 the process's own (the experiment's OMP_NUM_THREADS, as for the stages).

After each iteration's last optimizer step the policy is saved as that item's next_policy
(safetensors + weights.sha256) and evaluated by the evaluate stage into the pipeline's paths, and
iterations.csv is rewritten; before training, the policy TRL holds is evaluated the same way and must
give evaluate-baseline.json exactly (so TRL trains the warm start the stages load). What TRL does
differently is listed in :func:`grpo_settings` (peer.json "unmatched"); settings it cannot reproduce
are refused by key. A rerun starts over: the outputs of an unfinished run are deleted first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tcrlsd.loop.peers import MARKER, PeerError, params_sha256

SECTIONS_READ = ("generate", "update", "advantages", "verify")
# GRPOConfig overrides that make TRL's step the update stage's work on CPU: fp32 (TRL 1.x defaults bf16=True,
# autocasting the loss forward) and no activation recomputation (TRL 1.x: gradient_checkpointing=True).
CPU_SAME_WORK = {"bf16": False, "gradient_checkpointing": False}
# update.loss_agg_mode -> TRL's loss_type with that normalisation (one process, no accumulation):
# token-mean over the step's tokens = dapo; mean over sequences of token means = grpo; token sums over a
# constant (max_completion_length, = update.loss_norm_tokens: checked) averaged over sequences = dr_grpo
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
IMPORTANCE_LEVELS = {"ppo": "token", "gspo": "sequence"}  # update.policy_loss -> TRL's ratio level
# iterations.csv column -> TRL's logged metric of the same definition (mean over the iteration's steps)
TRL_COLUMNS = {"saturated_share": "frac_reward_zero_std", "response_length": "completions/mean_length",
               "entropy": "entropy", "pg_clipfrac": "clip_ratio/region_mean"}
STEP0 = ".peer-step0"  # scratch folder of the step-0 check
BASELINE = "data/metrics/evaluate-baseline.json"  # dvc.yaml's baseline stage writes it
TRL_DIR = ".trl"  # TRL's output_dir (it saves nothing there: save_strategy no)


@dataclass(frozen=True)
class Schedule:
    """The pipeline's schedule in optimizer steps, from params (:func:`trl_schedule`)."""

    iterations: int
    prompts_per_iteration: int  # generate.prompts_per_step: the prompts of one generation
    samples_per_prompt: int  # generate.samples_per_prompt: the group size
    prompts_per_step: int  # update.mini_batch_prompts: prompts (with all their samples) per optimizer step
    ppo_epochs: int  # update.ppo_epochs: passes over a generation

    @property
    def steps_per_generation(self) -> int:
        return self.prompts_per_iteration // self.prompts_per_step

    @property
    def steps_per_iteration(self) -> int:
        return self.steps_per_generation * self.ppo_epochs

    @property
    def total_steps(self) -> int:
        return self.iterations * self.steps_per_iteration

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


def load_params(path: Path) -> dict:
    """The sections the peer reads, validated (section name -> frozen params dataclass)."""
    from tcrlsd.params import load_section, section_class

    return {s: load_section(path, s, section_class(s)) for s in SECTIONS_READ}


def trl_schedule(generate, update, iterations: int) -> Schedule:
    """The schedule of ``iterations`` pipeline iterations (``generate`` / ``update``: the params sections)."""
    if generate.prompts_per_step % update.mini_batch_prompts:
        raise PeerError(f"generate.prompts_per_step ({generate.prompts_per_step}) is not a multiple of "
                        f"update.mini_batch_prompts ({update.mini_batch_prompts}): TRL's steps_per_generation "
                        "must be a whole number")
    return Schedule(iterations, generate.prompts_per_step, generate.samples_per_prompt, update.mini_batch_prompts,
                    update.ppo_epochs)


def grpo_settings(params: dict, iterations: int) -> tuple[dict, list[str]]:
    """(GRPOConfig keywords from params, what TRL does differently) for ``iterations`` iterations of the
    pipeline's schedule. Settings TRL cannot reproduce are a :class:`PeerError` naming each key (the
    estimator is the peer's to check: bench/trl_step.py times TRL on any run's workload)."""
    gen, upd, adv = params["generate"], params["update"], params["advantages"]
    refused = [why for bad, why in (
        (gen.dynamic_sampling, "generate.dynamic_sampling: TRL's GRPOTrainer does not redraw prompts"),
        (upd.lr_schedule != "constant" or upd.warmup_steps > 0,
         "update.lr_schedule / warmup_steps: the peer runs a constant LR without warm-up only (HF's warm-up "
         "starts at 0, the update's at lr / warmup_steps)"),
        (upd.dual_clip is not None, "update.dual_clip: TRL has no dual clip"),
        (gen.sampling.temperature <= 0, "generate.sampling.temperature 0: TRL samples"),
        (upd.loss_agg_mode == "seq-mean-token-sum-norm" and upd.loss_norm_tokens != gen.sampling.max_new_tokens,
         "update.loss_norm_tokens differs from generate.sampling.max_new_tokens: TRL's dr_grpo divides by "
         "max_completion_length"),
    ) if bad]
    if refused:
        raise PeerError("the trl_grpo peer cannot run these params: " + "; ".join(refused))
    sched = trl_schedule(gen, upd, iterations)
    kwargs = {
        "per_device_train_batch_size": sched.completions_per_step, "gradient_accumulation_steps": 1,
        "steps_per_generation": sched.steps_per_generation, "num_iterations": sched.ppo_epochs,
        "num_generations": sched.samples_per_prompt, "max_steps": sched.total_steps,
        "max_completion_length": gen.sampling.max_new_tokens, "temperature": gen.sampling.temperature,
        "top_p": gen.sampling.top_p, "top_k": 0,
        "learning_rate": upd.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch",
        "weight_decay": upd.weight_decay, "adam_beta1": upd.adam_beta1, "adam_beta2": upd.adam_beta2,
        "adam_epsilon": upd.adam_eps, "max_grad_norm": upd.grad_clip,
        "beta": upd.kl_coef, "epsilon": upd.clip_ratio_low, "epsilon_high": upd.clip_ratio_high,
        "loss_type": LOSS_TYPES[upd.loss_agg_mode], "importance_sampling_level": IMPORTANCE_LEVELS[upd.policy_loss],
        "scale_rewards": "group" if adv.norm_by_std else "none", "entropy_coef": upd.entropy_coef,
        "mask_truncated_completions": upd.mask_truncated, "seed": upd.seed, "shuffle_dataset": False,
    }
    unmatched = [
        f"sampling: TRL draws with torch's generator seeded once by update.seed ({upd.seed}), the generate stage "
        "with seeds per (iteration, part): the same prompts, other samples",
        "mini-batches: TRL shuffles a generation's completions one by one before cutting it into steps (a step "
        "holds samples of several prompts); the update deals whole prompt groups",
        "generation: transformers' generate inside the trainer, fp32 on CPU"
        + (f" (generate.backend {gen.backend} is not used)" if gen.backend != "transformers" else ""),
    ]
    if adv.norm_by_std:
        unmatched.append("group advantage: TRL divides by std + 1e-4, the advantages stage by std + 1e-6")
    if upd.rollout_is != "none":
        unmatched.append(f"update.rollout_is {upd.rollout_is}: not applied (TRL samples with the model it trains)")
    return kwargs, unmatched


def prompt_walk(prompts, generate, ks: list[int], source: str) -> list[str]:
    """The prompt ids the generate stage samples at iterations ``ks``, in its order, one after another."""
    from tcrlsd.generate.selection import select_prompts, train_prompt_ids

    ids = train_prompt_ids(prompts, source, generate.train_levels)
    return [pid for k in ks for pid in select_prompts(ids, generate.prompts_per_step, generate.seed, k)]


def trl_prompt_texts(tokenizer, texts: list[str], prompt_ids: list[str]) -> list[str]:
    """The text TRL is given for each prompt: TRL tokenizes a plain prompt with the tokenizer's special
    tokens added, the generate stage adds the BOS only when the text lacks it (a chat template renders
    it); a rendered BOS is therefore cut off. Each result must give the generate stage's ids."""
    from tcrlsd.policy import encode_prompt

    bos = tokenizer.bos_token
    out = []
    for pid, text in zip(prompt_ids, texts):
        given = text[len(bos):] if bos and text.startswith(bos) else text
        if tokenizer(given)["input_ids"] != encode_prompt(tokenizer, text):
            raise PeerError(f"prompt {pid}: TRL's tokenization of the prompt text differs from the generate stage's "
                            "ids (tcrlsd.policy.encode_prompt); the peer would train on other inputs")
        out.append(given)
    return out


def clean(ws: Path, first_policy: str) -> None:
    """Delete what an earlier, unfinished peer run wrote (checkpoints, evaluations, rows, final evaluations)."""
    (ws / MARKER).unlink(missing_ok=True)
    doomed = [p for p in ws.glob("models/policy-*") if p.is_dir() and p != ws / first_policy]
    doomed += list(ws.glob("data/iter-*")) + list(ws.glob("data/metrics/iter-*")) + list(ws.glob("data/final-*"))
    doomed += [ws / STEP0, ws / TRL_DIR]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for p in [*ws.glob("data/metrics/final-*.json"), ws / "data/summary/iterations.csv"]:
        p.unlink(missing_ok=True)


def save_checkpoint(model, tokenizer, path: Path) -> None:
    """The policy as the update writes it: a Hugging Face folder (safetensors) and its weights.sha256."""
    from tcrlsd.artifacts import write_text
    from tcrlsd.policy import WEIGHTS_DIGEST, save_policy
    from tcrlsd.update.state import weights_digest

    save_policy(model, tokenizer, path)
    write_text(weights_digest(path) + "\n", path / WEIGHTS_DIGEST)


def evaluate(ws: Path, policy: str, out: str, metrics: str) -> dict:
    """The evaluate stage on ``policy`` (paths relative to ``ws``); its metrics."""
    from tcrlsd.loop.final import evaluate_stage

    sys.stdout.flush()
    code = evaluate_stage(ws, policy, out, metrics)
    if code != 0:
        raise PeerError(f"the evaluate stage failed on {policy} (exit {code}); see {ws / 'repro.log'}")
    return json.loads((ws / metrics).read_text())


def step0_check(ws: Path, model, tokenizer) -> dict:
    """Evaluate the policy TRL holds before training; it must equal the workspace's baseline evaluation."""
    save_checkpoint(model, tokenizer, ws / STEP0 / "policy")
    got = evaluate(ws, f"{STEP0}/policy", f"{STEP0}/evaluations", f"{STEP0}/evaluate.json")
    want = json.loads((ws / BASELINE).read_text())
    skip = ("policy", "parts_evaluated_now")
    if {k: v for k, v in got.items() if k not in skip} != {k: v for k, v in want.items() if k not in skip}:
        raise PeerError(f"the policy TRL was given evaluates to greedy {got.get('greedy_mean_at_1')} / avg@k "
                        f"{got.get('avg_at_k')}, the warm start's baseline to {want.get('greedy_mean_at_1')} / "
                        f"{want.get('avg_at_k')}: TRL would not train the warm start the stages load")
    shutil.rmtree(ws / STEP0)
    return {"greedy_mean_at_1": got["greedy_mean_at_1"], "avg_at_k": got.get("avg_at_k"),
            "equals_evaluate_baseline": True}


def _plain(value):
    """A config value as JSON (enums by their value)."""
    return getattr(value, "value", value)


def train_peer(ws: Path) -> dict:
    """Train, evaluate and record the peer in workspace ``ws``; returns what peer.json holds."""
    import pyarrow as pa

    from tcrlsd.artifacts import read_artifact, write_json
    from tcrlsd.loop.iterations import read_iterations
    from tcrlsd.policy import load_policy, resolve_dtype
    from tcrlsd.summarize import iteration_row, write_table
    from tcrlsd.verify import verify_rollouts

    ws = ws.resolve()
    started = time.perf_counter()
    try:
        import torch
        import transformers
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise PeerError(f"trl_grpo needs TRL ({exc}): pip install -e \".[bench]\"") from None
    params = load_params(ws / "params.yaml")
    gen, upd = params["generate"], params["update"]
    if params["advantages"].estimator != "grpo":
        raise PeerError(f"{ws / 'params.yaml'}: advantages.estimator is {params['advantages'].estimator!r}; "
                        "the trl_grpo peer is GRPO (prepare its workspace with the grpo preset)")
    if not (ws / BASELINE).is_file():
        raise PeerError(f"{ws / BASELINE} not found: run `dvc repro baseline` in {ws} first (the warm start and "
                        "its evaluation, which the peer's step-0 evaluation must reproduce)")
    items = read_iterations(ws / "iterations.yaml")
    kwargs, unmatched = grpo_settings(params, len(items))
    sched = trl_schedule(gen, upd, len(items))
    missing = sorted(set(kwargs) - {f.name for f in fields(GRPOConfig)})
    if missing:
        raise PeerError(f"trl {trl.__version__}'s GRPOConfig has no {', '.join(missing)}: pip install -U trl")
    clean(ws, items[0].policy)
    if upd.num_threads:
        torch.set_num_threads(upd.num_threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if upd.device == "auto" else upd.device
    work = CPU_SAME_WORK if device == "cpu" else {"bf16": resolve_dtype(upd.dtype, device) == "bfloat16",
                                                   "gradient_checkpointing": False}
    model, tokenizer = load_policy(ws / items[0].policy, device, "float32", upd.trust_remote_code)
    prompts = read_artifact(ws / "data/prompts.parquet", "prompts")
    walk = prompt_walk(prompts, gen, [it.k for it in items], "data/prompts.parquet")
    text_of = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    data = Dataset.from_dict({"prompt": trl_prompt_texts(tokenizer, [text_of[p] for p in walk], walk),
                              "prompt_id": walk})
    verified: dict[int, tuple[dict, list[str]]] = {}  # iteration -> (verify metrics, its prompt ids)

    def verify(completions, completion_ids, prompt_id, trainer_state, **_):  # TRL's reward function
        seen: Counter = Counter()
        rollout_ids = []
        for pid in prompt_id:
            rollout_ids.append(f"{pid}#{seen[pid]}")
            seen[pid] += 1
        table = pa.table({"rollout_id": rollout_ids, "prompt_id": list(prompt_id), "response_text": list(completions),
                          "response_token_ids": pa.array(completion_ids, pa.list_(pa.int32()))})
        verdicts, metrics = verify_rollouts(table, prompts, params["verify"],
                                            overlong_max_tokens=gen.sampling.max_new_tokens)
        verified[trainer_state.global_step // sched.steps_per_iteration] = (metrics, list(dict.fromkeys(prompt_id)))
        return verdicts.column("reward").to_pylist()

    step_logs: list[dict] = []  # TRL's log of every optimizer step
    rows: list[dict] = []

    class IterationEnd(TrainerCallback):
        """After an iteration's last step (its log): save, evaluate, write the iteration's rows."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "train_runtime" in logs:  # the summary at the end of train(), not a step
                return
            step_logs.append({"step": state.global_step, **logs})
            if state.global_step % sched.steps_per_iteration == 0:
                finish(state.global_step // sched.steps_per_iteration - 1)

    def finish(i: int) -> None:
        item = items[i]
        save_checkpoint(model, tokenizer, ws / item.next_policy)
        metrics_dir = ws / "data" / "metrics" / f"iter-{item.key}"
        result = evaluate(ws, item.next_policy, f"data/iter-{item.key}/evaluations",
                          f"data/metrics/iter-{item.key}/evaluate.json")
        verify_metrics, prompt_ids = verified[i]
        write_json(verify_metrics, metrics_dir / "verify.json")  # the verify stage's metrics of TRL's rollouts
        spi = sched.steps_per_iteration
        mine = [r for r in step_logs if i * spi < r["step"] <= (i + 1) * spi]  # this iteration's steps
        columns = {}
        for col, key in TRL_COLUMNS.items():
            values = [r[key] for r in mine if r.get(key) is not None]
            columns[col] = sum(values) / len(values) if values else None
        columns["prompts_drawn"] = len(prompt_ids)
        write_json({"steps": mine, "columns": columns, "prompt_ids": prompt_ids}, metrics_dir / "trl.json")
        rows.append({**iteration_row(metrics_dir, item.key), **columns})
        write_table(rows, ws / "data" / "summary" / "iterations.csv")
        print(f"trl_grpo: iteration {item.key}: {len(mine)} steps, train reward {verify_metrics['reward_mean']:.3f}, "
              f"greedy val {result['greedy_mean_at_1']:.4f} ({item.next_policy})", flush=True)

    config = GRPOConfig(output_dir=str(ws / TRL_DIR), logging_steps=1, save_strategy="no", report_to="none",
                        use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, **kwargs, **work)
    trainer = GRPOTrainer(model=model, reward_funcs=verify, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[IterationEnd()])
    print(f"trl_grpo: TRL {trl.__version__} GRPOTrainer, {sched.total_steps} optimizer steps ({len(items)} iterations "
          f"x {sched.steps_per_iteration}) of {sched.prompts_per_step} prompts x {sched.samples_per_prompt} samples, "
          f"lr {config.learning_rate}", flush=True)
    check = step0_check(ws, model, tokenizer)
    trainer.train()
    if len(rows) != len(items):
        raise PeerError(f"TRL stopped after {trainer.state.global_step} of {sched.total_steps} optimizer steps")
    used = {k: _plain(getattr(trainer.args, k)) for k in kwargs}
    used.update({"optimizer_steps": trainer.state.global_step, "generation_batch_size": trainer.args.generation_batch_size,
                 "learning_rates": sorted({r["learning_rate"] for r in step_logs if "learning_rate" in r})})
    shutil.rmtree(ws / TRL_DIR, ignore_errors=True)
    record = {"peer": "trl_grpo", "iterations": len(items), "params_sha256": params_sha256(ws),
              "versions": {"trl": trl.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "schedule": {**asdict(sched), "steps_per_generation": sched.steps_per_generation,
                           "steps_per_iteration": sched.steps_per_iteration, "total_steps": sched.total_steps},
              "grpo_config": kwargs, "trl_used": used, "device": device, "precision": work,
              "prompt_order": f"the generate stage's walk (select_prompts, generate.seed {gen.seed}): iteration k's "
                              "prompts are TRL's k-th generation", "step0_check": check, "unmatched": unmatched,
              "seconds": round(time.perf_counter() - started, 1)}
    write_json(record, ws / MARKER)  # last, atomically: the run is finished
    return record


def main(argv: list[str] | None = None) -> int:
    from tcrlsd.stagecli import run_stage

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("."), help="the peer's workspace (default: here)")
    args = ap.parse_args(argv)

    def body() -> int:
        train_peer(args.workspace)
        return 0

    return run_stage("trl_grpo", body)


if __name__ == "__main__":
    sys.exit(main())
