"""The advantages stage's one function, :func:`compute_advantages`."""

from __future__ import annotations

import os
from pathlib import Path

from tcrlsd.advantages.inputs import IterationInputs
from tcrlsd.advantages.params import DEFAULT_BATCH_ROWS, AdvantagesParams
from tcrlsd.advantages.stream import check_out_path, stream_advantages
from tcrlsd.artifacts import AtomicParquetWriter
from tcrlsd.schemas import schema_for


def compute_advantages(
    inputs: IterationInputs,
    params: AdvantagesParams,
    out: str | os.PathLike | None = None,
    *,
    iteration: int | None = None,
    lam: float | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict:
    """Compute ``params.estimator``'s advantages, write them to ``out`` (when given), return metrics.

    ``iteration`` overrides the rollouts' ``iteration`` column for the λ schedule; ``lam`` sets λ
    directly. The output rows follow the scores' row order. Nothing but ``out`` is written.
    """
    if out is None:
        shared, per = stream_advantages(inputs, params, [params.estimator], None, iteration, lam, batch_rows)
    else:
        out = Path(out)
        check_out_path(out, inputs)
        with AtomicParquetWriter(out, schema_for("advantages")) as writer:
            shared, per = stream_advantages(inputs, params, [params.estimator], writer, iteration, lam, batch_rows)
    return {"estimator": params.estimator, **shared, **per[params.estimator]}
