"""The ``prepare:`` params section (its sources) and the stage's error."""

from __future__ import annotations

from collections import Counter
from dataclasses import MISSING, dataclass
from typing import Literal

from tcrlsd.params import check_choices, choice
from tcrlsd.prepare.sources import FORMATS, HF_HINT, PrepareError  # noqa: F401 -- re-exported

# verl's MATH/GSM8K prompt (data_preprocess/math_dataset.py): the problem, one space, the instruction.
DEFAULT_PROMPT_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."

# --------------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class SourceParams:
    """One raw problem set and how much of it goes into which split."""

    name: str  # names the source in prompt ids, the ``source`` column and the metrics
    format: str = choice(MISSING, lambda: FORMATS, "FORMATS in tcrlsd/prepare/sources.py")
    split: Literal["train", "val", "test"]  # SPLITS
    path: str | None = None  # JSONL/Parquet file, or "hf:<dataset id>"; null for synthetic
    count: int | None = None  # rows to keep after the seeded shuffle; null = all
    levels: tuple[int, ...] | None = None  # synthetic only: levels to cycle through
    max_operand: int | None = None  # synthetic only: largest starting number / added operand
    hf_config: str | None = None  # hf: paths only: dataset configuration (e.g. "main" for gsm8k)
    hf_split: str | None = None  # hf: paths only: dataset split; default "train" / "test" by split

    def __post_init__(self) -> None:
        label = f"source {self.name!r}"
        check_choices(self)
        if self.split not in SPLITS:
            raise ValueError(f"{label}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not self.name or "/" in self.name or "#" in self.name:
            raise ValueError(f"{label}: name must be non-empty without '/' or '#' (it prefixes prompt ids)")
        if self.count is not None and self.count < 0:
            raise ValueError(f"{label}: count must be >= 0 or null (all), got {self.count}")
        if self.format == "synthetic":
            if self.path is not None:
                raise ValueError(f"{label}: a synthetic source has no path (got {self.path!r}); set path: null")
            if self.count is None:
                raise ValueError(f"{label}: a synthetic source needs a count (it has no 'all')")
            if self.levels is not None and (not self.levels or min(self.levels) < 1):
                raise ValueError(f"{label}: levels must be a non-empty list of integers >= 1, got {list(self.levels)}")
            if self.max_operand is not None and self.max_operand < 2:
                raise ValueError(f"{label}: max_operand must be >= 2, got {self.max_operand}")
        else:
            if not self.path:
                raise ValueError(f"{label}: format {self.format!r} needs a path (a .jsonl/.parquet file or hf:<id>)")
            extra = [k for k in ("levels", "max_operand") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{label}: {', '.join(extra)} only apply to synthetic sources")
        if (self.hf_config or self.hf_split) and not (self.path or "").startswith("hf:"):
            raise ValueError(f"{label}: hf_config / hf_split only apply to hf:<dataset id> paths")


# The splits of the prompts file, in the order they are built: val excludes every train problem, test
# every train and val problem. train feeds RL; val is the dev set (lr, lambda schedule, warm-start
# choices, every per-iteration curve); test is drawn like val and used only for the final table.
SPLITS = ("train", "val", "test")

_DEFAULT_SOURCES = (
    SourceParams(name="synthetic", format="synthetic", split="train", count=2000, levels=(1, 2, 3, 4), max_operand=20),
    SourceParams(name="synthetic", format="synthetic", split="val", count=200, levels=(1, 2, 3, 4), max_operand=20),
    SourceParams(name="synthetic", format="synthetic", split="test", count=200, levels=(1, 2, 3, 4), max_operand=20),
)


@dataclass(frozen=True)
class PrepareParams:
    """``params.yaml`` section ``prepare``."""

    sources: tuple[SourceParams, ...] = _DEFAULT_SOURCES
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat_template_tokenizer: str | None = None
    missing_answer: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources is empty; list at least one source")
        pairs = Counter((s.name, s.split) for s in self.sources)
        dup = [f"{n}/{s}" for (n, s), c in pairs.items() if c > 1]
        if dup:
            raise ValueError(f"two sources share name and split ({', '.join(dup)}); give them distinct names")
        if "{problem}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{problem}}; got {self.prompt_template!r}")
