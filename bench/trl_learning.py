"""The peer: TRL's GRPOTrainer from the same warm start, same prompts and budget as the pipeline's runs.

    pip install -e ".[bench]"
    python bench/trl_learning.py --policy DIR/runs/grpo-s0/models/policy-0000 \
        --prompts DIR/runs/grpo-s0/data/prompts.parquet [--steps 20] [--lr 1e-4] [--eval-every 4] [--seed 0]

Budget per optimizer step as in the pipeline's default iteration: 8 prompts x 8 samples (an
iteration = 32 prompts in 4 mini-batches of 8, one PPO pass), temperature 1, <= 96 new tokens,
constant LR, no KL (beta 0), clip 0.2, group-normalised rewards; 20 steps = 5 iterations. Training
prompts: the split == train rows, in a seeded order. Reward: the last \\boxed{} equals the answer (the
synthetic task's answers are integers; the same check as the warm start's accuracy). Prints greedy
validation accuracy (all split == val rows) before training and every --eval-every steps, with the
seconds per step, so the curve can be set beside the pipeline's (docs/RESULTS.md). fp32 without
gradient checkpointing, like the update stage (bench/trl_step.CPU_SAME_WORK; runs before that change
used TRL 1.x's defaults, bf16 autocast and checkpointing).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tcrlsd-trl"))
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_step import CPU_SAME_WORK  # bench/ is this script's directory

    from tcrlsd.answers import last_boxed
    from tcrlsd.artifacts import read_artifact
    from tcrlsd.warmstart.accuracy import greedy_accuracy

    torch.set_num_threads(args.threads)
    rows = read_artifact(args.prompts, "prompts").to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    random.Random(args.seed).shuffle(train)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in train])
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, use_safetensors=True)

    def reward(completions, answer, **_):
        return [float(last_boxed(c) == str(a).strip()) for c, a in zip(completions, answer)]

    def evaluate(step: int, seconds: float) -> None:
        was = model.training
        model.eval()
        acc = greedy_accuracy(model, tokenizer, [r["prompt"] for r in val], [r["answer"] for r in val],
                              [r["level"] for r in val], args.max_new_tokens, 100)
        model.train(was)
        levels = " ".join(f"L{k} {100 * v:.0f}" for k, v in acc["accuracy_by_level"].items())
        print(f"step {step:3d}: greedy val {100 * acc['accuracy']:.1f}% ({levels}); {seconds:.1f} s/step", flush=True)

    times: list[float] = []

    class Eval(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            times.append(time.perf_counter() - self.t)
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                evaluate(state.global_step, sum(times) / len(times))

    completions = args.prompts_per_step * args.samples
    cfg = GRPOConfig(output_dir=str(args.out), per_device_train_batch_size=completions, gradient_accumulation_steps=1,
                     num_generations=args.samples, max_completion_length=args.max_new_tokens, temperature=1.0,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, epsilon=0.2,
                     max_steps=args.steps, logging_steps=args.eval_every, save_strategy="no", report_to="none",
                     use_cpu=True, seed=args.seed, dataloader_num_workers=0, shuffle_dataset=False, **CPU_SAME_WORK)
    print(f"TRL GRPOTrainer: {args.steps} steps of {args.prompts_per_step} prompts x {args.samples} samples, lr "
          f"{args.lr}, loss_type {cfg.loss_type}, scale_rewards {cfg.scale_rewards}", flush=True)
    evaluate(0, 0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Eval()])
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
