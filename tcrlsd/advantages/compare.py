"""Every estimator at once on one iteration, nothing written (``tcrlsd compare``)."""

from __future__ import annotations

from typing import Sequence

from tcrlsd.advantages.estimators import ESTIMATORS, READS_CONTRAST
from tcrlsd.advantages.inputs import IterationInputs, scores_have_contexts
from tcrlsd.advantages.params import DEFAULT_BATCH_ROWS, AdvantagesParams
from tcrlsd.advantages.stream import stream_advantages


def compare_estimators(
    inputs: IterationInputs,
    params: AdvantagesParams,
    *,
    estimators: Sequence[str] | None = None,
    iteration: int | None = None,
    lam: float | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[dict, dict[str, dict]]:
    """One pass computing every estimator with the same settings; writes nothing.

    Returns (metrics shared by all estimators, {estimator: its own metrics}). ``estimators`` None:
    every registered one whose inputs the iteration has (those of ``READS_CONTRAST`` need scores
    with extra teacher contexts).
    """
    if estimators is None:
        with_contexts = scores_have_contexts(inputs.scores)
        estimators = [e for e in ESTIMATORS if with_contexts or e not in READS_CONTRAST]
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {', '.join(unknown)}; known: {', '.join(ESTIMATORS)}")
    return stream_advantages(inputs, params, list(estimators), None, iteration, lam, batch_rows)
