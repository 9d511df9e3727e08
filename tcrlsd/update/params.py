"""``update:`` params section: the PPO-clip update of the policy on token-level advantages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tcrlsd.errors import TcrlsdError
from tcrlsd.optim import LR_SCHEDULES
from tcrlsd.params import check_choices, choice
from tcrlsd.teachers import TEACHER_MODES
from tcrlsd.update.losses import AGGREGATIONS, POLICY_LOSSES

__all__ = ["UpdateParams", "UpdateError", "TEACHER_MODES"]


class UpdateError(TcrlsdError, ValueError):
    """The update stage's inputs, saved state or settings are wrong (message names file/row/key)."""


@dataclass(frozen=True)
class UpdateParams:
    """``update:`` section of params.yaml (every key is commented there)."""

    # optimiser (AdamW; weight decay on matrices only) and LR schedule
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = choice("constant", lambda: LR_SCHEDULES, "LR_SCHEDULES in tcrlsd/optim.py")
    warmup_steps: int = 0
    cosine_total_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # policy loss
    policy_loss: str = choice("ppo", lambda: POLICY_LOSSES, "POLICY_LOSSES in tcrlsd/update/losses.py")
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip: float | None = None
    entropy_coef: float = 1e-3
    kl_coef: float = 0.0
    loss_agg_mode: str = choice("token-mean", lambda: AGGREGATIONS, "AGGREGATIONS in tcrlsd/update/losses.py")
    loss_norm_tokens: int = 96
    # off-policy correction and truncated responses (tcrlsd.offpolicy)
    rollout_is: Literal["none", "token", "sequence"] = "none"
    rollout_is_cap: float = 2.0
    mask_truncated: bool = False
    # batching
    mini_batch_prompts: int = 8
    ppo_epochs: int = 1
    shuffle: bool = True
    max_tokens_per_micro_batch: int = 4096
    pack_tokens: int = 4096
    share_prompts: bool = True
    logits_chunk_tokens: int = 1024
    # engine
    zero_stage: int = 2
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"
    num_threads: int = 0
    seed: int = 0
    trust_remote_code: bool = False
    # state across iterations and the kept teacher
    restart: bool = False
    teacher_refresh_every: int = 20
    teacher_ema_tau: float = 0.05

    def __post_init__(self) -> None:
        check_choices(self)
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ValueError(f"dual_clip applies to policy_loss ppo only (policy_loss is {self.policy_loss!r}); "
                             "set it to null")
        for name in ("mini_batch_prompts", "ppo_epochs", "max_tokens_per_micro_batch", "logits_chunk_tokens",
                     "cosine_total_steps", "teacher_refresh_every", "loss_norm_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_steps", "grad_clip", "clip_ratio_low", "clip_ratio_high",
                     "entropy_coef", "kl_coef", "num_threads", "adam_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pack_tokens < 0:
            raise ValueError(f"pack_tokens must be >= 0 (0 = padded micro-batches), got {self.pack_tokens}")
        if self.share_prompts and not self.pack_tokens:
            raise ValueError("share_prompts needs packed micro-batches (pack_tokens > 0); set share_prompts: false "
                             "with pack_tokens: 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam_beta1 and adam_beta2 must be in [0, 1)")
        if self.clip_ratio_low >= 1:
            raise ValueError(f"clip_ratio_low must be < 1, got {self.clip_ratio_low}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (verl uses 3.0) or null, got {self.dual_clip}")
        from tcrlsd.offpolicy import ROLLOUT_IS

        if self.rollout_is not in ROLLOUT_IS:
            raise ValueError(f"rollout_is must be one of {', '.join(ROLLOUT_IS)}, got {self.rollout_is!r}")
        if not self.rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0, got {self.rollout_is_cap}")
        if self.zero_stage not in (1, 2, 3):
            # ZeRO-0 is refused: DeepSpeed's plain fp32 path does not skip a step on a non-finite
            # gradient norm, which this stage promises.
            raise ValueError(f"zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if not 0 < self.teacher_ema_tau <= 1:
            raise ValueError(f"teacher_ema_tau must be in (0, 1], got {self.teacher_ema_tau}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
