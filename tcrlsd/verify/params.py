"""The ``verify:`` params section and the stage's input error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcrlsd.errors import TcrlsdError
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
    overlong_penalty_buffer: int = 0
    overlong_penalty_factor: float = 1.0

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
        if self.overlong_penalty_buffer < 0 or self.overlong_penalty_factor < 0:
            raise ValueError("overlong_penalty_buffer and overlong_penalty_factor must be >= 0 (buffer 0 = off)")
        if self.worker_memory_mb < 0:
            raise ValueError(f"worker_memory_mb must be >= 0 (0 = no limit), got {self.worker_memory_mb}")

    @property
    def limits(self) -> GradeLimits:
        return GradeLimits(self.parse_timeout_s, self.verify_timeout_s)


def response_token_limit(params_path, preset=None) -> int:
    """``generate.sampling.max_new_tokens`` of the params file (the L_max of the overlong penalty): read, not
    restated, so the limit lives in one place."""
    from tcrlsd.params import ParamsError, load_yaml, merge

    data = load_yaml(params_path)
    if preset:
        data = merge(data, load_yaml(preset))
    value = ((data.get("generate") or {}).get("sampling") or {}).get("max_new_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParamsError(f"{params_path}: verify.overlong_penalty_buffer needs generate.sampling.max_new_tokens (an integer "
                          f">= 1, the response limit), got {value!r}")
    return value


def grader_for_source(source: str, params: VerifyParams) -> str:
    return params.graders_by_source.get(source, params.default_grader)


class VerifyError(TcrlsdError, ValueError):
    """Bad input to the verify stage (a rollout without its prompt, an unknown grader)."""
