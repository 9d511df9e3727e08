"""The ``verify:`` params section and the stage's input error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcrlsd.verify.graders import GRADERS, GradeLimits

# ---------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class VerifyParams:
    """``verify:`` section of params.yaml."""

    default_grader: str = "math_verify"
    graders_by_source: dict[str, str] = field(default_factory=lambda: {"gsm8k": "string"})
    workers: int = 2
    start_method: Literal["forkserver", "fork", "spawn"] = "forkserver"
    parse_timeout_s: int = 3
    verify_timeout_s: int = 3
    row_deadline_s: float = 10.0
    worker_memory_mb: int = 4096

    def __post_init__(self) -> None:
        known = ", ".join(GRADERS)
        if self.default_grader not in GRADERS:
            raise ValueError(f"default_grader {self.default_grader!r} is not a grader; known: {known}")
        for source, name in self.graders_by_source.items():
            if not isinstance(name, str) or name not in GRADERS:
                raise ValueError(f"graders_by_source[{source!r}] = {name!r} is not a grader; known: {known}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.parse_timeout_s < 1 or self.verify_timeout_s < 1:
            raise ValueError("parse_timeout_s and verify_timeout_s must be whole seconds >= 1 "
                             "(math-verify's signal.alarm ignores anything else)")
        if not self.row_deadline_s > 0:
            raise ValueError(f"row_deadline_s must be > 0, got {self.row_deadline_s}")
        if self.worker_memory_mb < 0:
            raise ValueError(f"worker_memory_mb must be >= 0 (0 = no limit), got {self.worker_memory_mb}")

    @property
    def limits(self) -> GradeLimits:
        return GradeLimits(self.parse_timeout_s, self.verify_timeout_s)


def grader_for_source(source: str, params: VerifyParams) -> str:
    return params.graders_by_source.get(source, params.default_grader)


class VerifyError(ValueError):
    """Bad input to the verify stage (a rollout without its prompt, an unknown grader)."""
