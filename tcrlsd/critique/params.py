"""The ``critique:`` params section, its modes and the stage's error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcrlsd.critique.backends import CRITICS
from tcrlsd.critique.controls import CONTROLS
from tcrlsd.errors import TcrlsdError
from tcrlsd.feedback import effective_which
from tcrlsd.generate.backends import BACKENDS
from tcrlsd.generation import EngineParams, SamplingConfig, SamplingParams
from tcrlsd.params import check_choices, choice

MODES = ("critique", "critique_gold", "gold", "self", "sibling", "none")


class CritiqueError(TcrlsdError, ValueError):
    """Bad input to the critique stage (missing join rows, bad template, ...)."""


@dataclass(frozen=True)
class CritiqueParams:
    mode: str = choice("critique", lambda: MODES, "MODES in tcrlsd/critique/params.py")
    which: Literal["auto", "incorrect", "all"] = "auto"
    wrong_hints: int = 0  # extra teacher contexts per rollout with feedback (K - 1; tcrlsd.critique.wrong_hints)
    critic: str = choice("reference", lambda: CRITICS, "CRITICS in tcrlsd/critique/backends.py")
    critic_model: str = ""
    templates_dir: str | None = None
    max_response_chars: int = 6000
    max_feedback_chars: int = 4000
    reference_reveal_final_answer: bool = False
    reference_noise: float = 0.0
    control: str = choice("none", lambda: CONTROLS, "CONTROLS in tcrlsd/critique/controls.py")
    mask_leaked_answer: bool = False
    mask_text: str = "[answer withheld]"
    skip_truncated: bool = True
    policy_chat_template_tokenizer: str | None = None
    rows_per_part: int = 512
    # model critics (transformers, vllm, openai) and self mode
    sampling: SamplingParams = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=96)
    seed: int = 0
    self_backend: str = choice("transformers", lambda: BACKENDS, "BACKENDS in tcrlsd/generate/backends.py")
    engine: EngineParams = field(default_factory=EngineParams)  # transformers / vllm critics and self mode
    chunk_rows: int = 64
    chat_template_kwargs: dict = field(default_factory=dict)
    base_url: str = "http://127.0.0.1:8000/v1"
    endpoint: Literal["chat", "completions", "auto"] = "auto"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    request_timeout_s: float = 120.0
    max_attempts: int = 4
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    abort_after_failures: int = 32

    def __post_init__(self):
        check_choices(self)
        for name in ("max_response_chars", "max_feedback_chars", "rows_per_part", "chunk_rows", "max_concurrency",
                     "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("request_timeout_s must be > 0 and the backoff times >= 0")
        if self.endpoint not in ("chat", "completions", "auto"):
            raise ValueError(f"endpoint must be chat, completions or auto, got {self.endpoint!r}")
        if not 0 <= self.reference_noise <= 1:
            raise ValueError(f"reference_noise must be in [0, 1], got {self.reference_noise}")
        if self.wrong_hints < 0:
            raise ValueError(f"wrong_hints must be >= 0 (0 = one teacher context), got {self.wrong_hints}")
        if self.wrong_hints and self.mode == "none":
            raise ValueError("wrong_hints > 0 needs feedback to contrast with: mode 'none' gives the teacher none "
                             "(set critique.wrong_hints: 0)")
        if self.abort_after_failures < 0:
            raise ValueError(f"abort_after_failures must be >= 0 (0 = never), got {self.abort_after_failures}")

    def sampling_config(self) -> SamplingConfig:
        return self.sampling.config(self.seed)

    def effective_which(self) -> str:
        return effective_which(self.mode, self.which)
