"""The ``warmstart:`` params section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tcrlsd.policy import TinyLlamaConfig

PROBLEM_FIELD = "{problem}"
IGNORE = -100  # label of positions that carry no loss (prompt and padding)


@dataclass(frozen=True)
class WarmstartParams:
    """The ``warmstart`` section of params.yaml (each key is documented there)."""

    seed: int = 1_000_003
    # task (the SFT corpus; the val prompts come from the prepare stage)
    sft_problems: int = 40_000
    levels: tuple[int, ...] = (1, 2, 3, 4)
    max_operand: int = 20
    prompt_template: str = "{problem} Let's think step by step and output the final answer within \\boxed{}."
    response_prefix: str = "\n"
    # tokenizer
    vocab_size: int = 512
    tokenizer_problems: int = 4000
    # share of SFT problems shown in a teacher context (problem + critique of a wrong attempt)
    teacher_context_fraction: float = 0.4
    # of those, the share given the content-free feedback (target: the plain demonstrator)
    blank_feedback_share: float = 0.25
    # share of the wrong attempts with another slip than the demonstrator's (wrong_attempt)
    other_error_share: float = 0.1
    # share of SFT problems shown in the gold mode's teacher context (target: the gold solution)
    gold_context_fraction: float = 0.05
    # share of SFT problems shown as a self-mode critic prompt (target: the reference critique)
    critic_fraction: float = 0.1
    # share of the carry/borrow steps the demonstrator of the student-context examples gets wrong
    carry_slip_rate: float = 0.7
    # model shape (a LlamaConfig); its vocab_size is the trained tokenizer's, set above
    model: TinyLlamaConfig = TinyLlamaConfig()
    # optimisation
    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    num_threads: int = 2
    # evaluation
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 64

    def __post_init__(self):
        if PROBLEM_FIELD not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {PROBLEM_FIELD}; got {self.prompt_template!r}")
        if not self.levels or any(level < 1 for level in self.levels):
            raise ValueError(f"levels must be a non-empty list of integers >= 1; got {list(self.levels)}")
        for name in ("steps", "batch_size", "sft_problems", "vocab_size", "eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.carry_slip_rate <= 1:
            raise ValueError(f"carry_slip_rate must be in [0, 1]; got {self.carry_slip_rate}")
        for name in ("teacher_context_fraction", "blank_feedback_share", "other_error_share",
                     "gold_context_fraction", "critic_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        roles = self.teacher_context_fraction + self.gold_context_fraction + self.critic_fraction
        if roles > 1:
            raise ValueError("teacher_context_fraction + gold_context_fraction + critic_fraction must be <= 1 "
                             f"(shares of the SFT problems); got {roles:g}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}]; got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1; got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")

    def model_config(self) -> TinyLlamaConfig:
        return dataclasses.replace(self.model, vocab_size=self.vocab_size)
