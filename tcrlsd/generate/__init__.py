"""The generate stage: pick this iteration's training prompts and sample a GRPO group for each.

Prompt selection walks the training prompts in epochs. Epoch e is a permutation of the train
prompt ids (sorted by id first, so the file's row order does not matter) seeded by (seed, e);
iteration k takes positions [k*P, (k+1)*P) of the concatenated epochs, P = ``prompts_per_step``.
Every train prompt is therefore seen once per epoch. Where a step straddles two epochs, the
new epoch's first prompts are reordered (stably) so that no prompt appears twice in one step --
a prompt twice in a step would give two GRPO groups with the same rollout ids.

The step's prompts are cut into ``num_parts`` contiguous parts (whole groups); each part is one
``part-NNNNN.parquet`` of the ``rollouts`` folder, generated with sampling seed
derive_seed(seed, iteration, part). Parts are the unit of sharing (``--shard i/N`` takes parts
p % N == i) and of resuming (a finished part is never generated again while the resume
fingerprint -- code, input contents, output-changing params, iteration -- still matches; see
:mod:`tcrlsd.resume`).


Layout of this package: ``selection``, ``backends``, ``stage`` (see docs/ARCHITECTURE.md). Importing it is cheap: torch and transformers are imported inside functions, and this
``__init__`` imports its submodules only when one of the names below is first used, because the
critique stage uses ``generate.backends`` and must not depend on the generate stage's own code.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it (PEP 562 lazy re-exports)
_EXPORTS = {
    "BACKENDS": "backends",
    "make_backend": "backends",
    "derive_seed": "backend_base",
    "epoch_order": "selection",
    "groups_with_signal": "dynamic",
    "load_group_filter": "dynamic",
    "select_prompts": "selection",
    "train_prompt_ids": "selection",
    "GenerateParams": "stage",
    "rollout_metrics": "stage",
    "rollout_rows": "stage",
    "run_generate": "stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tcrlsd.generate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tcrlsd.generate' has no attribute {name!r}")
