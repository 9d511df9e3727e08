"""The evaluate stage: held-out greedy mean@1 and sampled avg@k of a policy checkpoint."""

from tcrlsd.evaluate.core import (
    EvaluateParams,
    evaluation_metrics,
    evaluation_rows,
    load_params,
    run_evaluate,
    val_prompt_ids,
)

__all__ = ["EvaluateParams", "evaluation_metrics", "evaluation_rows", "load_params", "run_evaluate", "val_prompt_ids"]
