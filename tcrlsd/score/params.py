"""The ``score:`` params section and the stage's error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tcrlsd.errors import TcrlsdError
from tcrlsd.params import check_choices, choice
from tcrlsd.teachers import TEACHER_MODES


class ScoreError(TcrlsdError, ValueError):
    """The score stage's inputs or settings are wrong (message names the file, row or key)."""


@dataclass(frozen=True)
class ScoreParams:
    """``score:`` section of params.yaml."""

    teacher: str = choice("current", lambda: TEACHER_MODES, "TEACHER_MODES in tcrlsd/teachers.py")  # which weights play the teacher
    max_tokens_per_batch: int = 8192  # padded tokens (batch_size * longest sequence) per forward pass
    logits_chunk_tokens: int = 1024  # response positions projected through the lm head at once
    rows_per_part: int = 512  # rollouts per output part (memory bound, resume and shard unit)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    trust_remote_code: bool = False
    # student_logprobs from the rollouts' sampler_logprobs instead of a forward: auto (where they are the
    # same numbers: tcrlsd.sampler.reuse_blocker) | true (demanded: an error where they are not) | false
    reuse_sampler_logprobs: Literal["auto", True, False] = "auto"

    def __post_init__(self) -> None:
        check_choices(self)
        if not (self.reuse_sampler_logprobs == "auto" or isinstance(self.reuse_sampler_logprobs, bool)):
            raise ValueError(f"reuse_sampler_logprobs must be auto, true or false, got {self.reuse_sampler_logprobs!r}")
        for name in ("max_tokens_per_batch", "logits_chunk_tokens", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
