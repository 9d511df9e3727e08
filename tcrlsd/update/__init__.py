"""Update stage: PPO-clip on token-level advantages through DeepSpeed (see ARCHITECTURE.md).

Modules, one concern each: ``params`` (the params section), ``losses`` (pure loss terms, aggregation registry,
LR schedule), ``batching`` (Parquet read per mini-batch, mini/micro-batch plans), ``engine``
(DeepSpeed), ``trainer`` (the loop), ``state`` (what survives between iterations), ``teacher``
(lagged / EMA teacher weights), ``stage`` (inputs to outputs). Importing this package is cheap.
"""

from tcrlsd.update.params import UpdateError, UpdateParams

__all__ = ["UpdateError", "UpdateParams"]
