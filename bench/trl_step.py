"""TRL's GRPOTrainer on one pipeline iteration's workload, timed: the peer row of bench/iteration.py.

    pip install -e ".[bench]"
    python bench/trl_step.py --workdir WORKSPACE [--threads 1]

WORKSPACE is a bench/iteration.py workspace after its iteration 0000 ran (models/policy-0000,
data/prompts.parquet, data/iter-0000/rollouts, params.yaml). The workload is the pipeline's, read
from its params.yaml: the prompts the generate stage picked, ``samples_per_prompt`` samples each,
temperature 1, <= ``max_new_tokens`` new tokens, the same math-verify grader as reward, AdamW at the
update's lr (constant), mini-batches of ``update.mini_batch_prompts`` prompts, one optimizer step
each, ``ppo_epochs`` passes. In TRL's terms: ``steps_per_generation`` = prompts per iteration /
prompts per mini-batch and ``num_iterations`` = ppo_epochs, so TRL, like the score stage, runs one
no-grad forward for the old log-probs (it skips it only when one optimizer step consumes a whole
generation). Two generation cycles run; the second is timed (the first warms up). Prints one JSON line:
the cycle's wall seconds, its CPU seconds, and the wall seconds inside ``model.generate`` and the reward.

TRL at its best on CPU (what made the peer slow here, measured in bench/iteration.py's workspace,
1 torch thread unless said, load average ~5 on 2 cores, CPU seconds of the old bench's timed step):

- **OpenMP threads on a busy machine.** At 2 threads the same step took 37 s wall / 23 CPU s against
  ~8-10 s wall / 6.6 CPU s at 1 thread (OMP_WAIT_POLICY=PASSIVE at 2 threads: 10.7 s wall /
  7.1 CPU s): TRL's thousands of small ops per step each end in a parallel region whose threads
  spin-wait for a descheduled partner. bench/iteration.py therefore times TRL at 1 thread and at the
  stages' thread count and keeps the faster.
- **TRL 1.x's config defaults** ``bf16=True`` (CPU autocast to bfloat16 in the loss forward) and
  ``gradient_checkpointing=True`` (a second forward in the backward). The update stage runs fp32
  without recomputation on CPU, so :data:`CPU_SAME_WORK` turns both off: same arithmetic, same work.
  On this CPU (avx512_bf16) they cost no measurable CPU time at 1 thread (6.58 vs 6.66 CPU s); on a
  CPU without native bfloat16 the autocast matmuls are emulated.
- Not the cause: the math-verify reward (0.1-0.2 s for 256 completions; its timeouts are
  ``signal.alarm``, no fork), logging (``report_to="none"``), data loader workers (0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

# GRPOConfig overrides that make TRL's step the update stage's work on CPU: fp32 (TRL 1.x defaults
# bf16=True, autocasting the loss forward) and no activation recomputation (TRL 1.x defaults
# gradient_checkpointing=True). Shared with bench/trl_learning.py.
CPU_SAME_WORK = {"bf16": False, "gradient_checkpointing": False}


def schedule(params: dict) -> dict:
    """The pipeline iteration's schedule in GRPOConfig's terms, from a params.yaml mapping."""
    gen, upd = params["generate"], params["update"]
    prompts, per_step = gen["prompts_per_step"], upd["mini_batch_prompts"]
    if prompts % per_step:
        raise SystemExit(f"generate.prompts_per_step ({prompts}) is not a multiple of update.mini_batch_prompts "
                         f"({per_step}); TRL's steps_per_generation must be a whole number")
    return {"per_device_train_batch_size": per_step * gen["samples_per_prompt"], "gradient_accumulation_steps": 1,
            "steps_per_generation": prompts // per_step, "num_iterations": upd["ppo_epochs"],
            "num_generations": gen["samples_per_prompt"], "max_completion_length": gen["sampling"]["max_new_tokens"],
            "temperature": 1.0, "learning_rate": upd["lr"], "lr_scheduler_type": "constant", "beta": 0.0,
            "epsilon": upd["clip_ratio_low"], "epsilon_high": upd["clip_ratio_high"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    work = args.workdir

    import torch

    torch.set_num_threads(args.threads)
    import pyarrow.compute as pc
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tcrlsd.artifacts import read_artifact
    from tcrlsd.verify import GradeLimits, grade_math_verify

    params = yaml.safe_load((work / "params.yaml").read_text())
    rollouts = read_artifact(work / "data/iter-0000/rollouts", "rollouts", columns=["prompt_id"])
    prompts = read_artifact(work / "data/prompts.parquet", "prompts")
    chosen = set(pc.unique(rollouts.column("prompt_id")).to_pylist())
    rows = [r for r in prompts.select(["prompt_id", "prompt", "answer"]).to_pylist() if r["prompt_id"] in chosen]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    limits = GradeLimits(params["verify"]["parse_timeout_s"], params["verify"]["verify_timeout_s"])
    inside = {"generate": 0.0, "reward": 0.0}

    def reward(completions, answer, **_):
        t0 = time.perf_counter()
        out = [grade_math_verify(c, a, limits).reward for c, a in zip(completions, answer)]
        inside["reward"] += time.perf_counter() - t0
        return out

    sched = schedule(params)
    cycle = sched["steps_per_generation"] * sched["num_iterations"]  # optimizer steps per generation
    cfg = GRPOConfig(output_dir=str(work / "trl"), max_steps=2 * cycle, logging_steps=cycle, save_strategy="no",
                     report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, **sched, **CPU_SAME_WORK)
    policy = str(work / "models/policy-0000")
    model = AutoModelForCausalLM.from_pretrained(policy)
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            inside["generate"] += time.perf_counter() - t0

    model.generate = timed_generate  # TRL's unwrap_model_for_generation hands back this object on one CPU process
    marks: list[tuple[float, float, dict]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            if state.global_step in (cycle, 2 * cycle):  # the first cycle's end starts the timed one
                marks.append((time.perf_counter(), time.process_time(), dict(inside)))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(policy), callbacks=[Timer()])
    trainer.train()
    (w0, c0, i0), (w1, c1, i1) = marks
    print(json.dumps({"threads": args.threads, "cycle_s": w1 - w0, "cpu_s": c1 - c0,
                      "generate_s": i1["generate"] - i0["generate"], "reward_s": i1["reward"] - i0["reward"],
                      "optimizer_steps": cycle, "completions": len(rows) * sched["num_generations"],
                      "torch_threads_in_step": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
