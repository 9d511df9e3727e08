"""TRL's GRPOTrainer on one pipeline iteration's workload, timed: the peer row of bench/iteration.py.

    pip install -e ".[bench]"
    python bench/trl_step.py --workdir WORKSPACE [--threads 1]

WORKSPACE is a bench/iteration.py workspace after its iteration 0000 ran (models/policy-0000,
data/prompts.parquet, data/iter-0000/rollouts, params.yaml). The workload is the pipeline's, read
from its params.yaml by the trl_grpo peer's own mapping (tcrlsd/commands/trl_grpo.py: grpo_settings,
the one TRL config of the project): the prompts the generate stage picked, ``samples_per_prompt``
samples each, the generate stage's sampling, the same math-verify grader as reward, AdamW at the
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
  without recomputation on CPU, so ``CPU_SAME_WORK`` (tcrlsd/commands/trl_grpo.py) turns both off:
  same arithmetic, same work.
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
    from tcrlsd.commands.trl_grpo import CPU_SAME_WORK, grpo_settings, load_params
    from tcrlsd.verify import grade_math_verify

    params = load_params(work / "params.yaml")
    rollouts = read_artifact(work / "data/iter-0000/rollouts", "rollouts", columns=["prompt_id"])
    prompts = read_artifact(work / "data/prompts.parquet", "prompts")
    chosen = set(pc.unique(rollouts.column("prompt_id")).to_pylist())
    rows = [r for r in prompts.select(["prompt_id", "prompt", "answer"]).to_pylist() if r["prompt_id"] in chosen]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    limits = params["verify"].limits
    inside = {"generate": 0.0, "reward": 0.0}

    def reward(completions, answer, **_):
        t0 = time.perf_counter()
        out = [grade_math_verify(c, a, limits).reward for c, a in zip(completions, answer)]
        inside["reward"] += time.perf_counter() - t0
        return out

    sched, _ = grpo_settings(params, iterations=2)  # two generation cycles
    cycle = sched["max_steps"] // 2  # optimizer steps per generation
    cfg = GRPOConfig(output_dir=str(work / "trl"), logging_steps=cycle, save_strategy="no", report_to="none",
                     use_cpu=True, dataloader_num_workers=0, **{**sched, "seed": 0}, **CPU_SAME_WORK)
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
