"""Which train prompts an iteration samples: seeded epochs of permutations."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from tcrlsd.errors import InputError
from tcrlsd.schemas import SchemaError

# --------------------------------------------------------------------------------------------------
# prompt selection


def train_prompt_ids(prompts: pa.Table, source: str | None = None, levels: Sequence[int] = ()) -> list[str]:
    """The ids of the rows with split == "train" (and, if ``levels`` is not empty, a level in it),
    sorted (selection must not depend on row order)."""
    split = prompts.column("split").to_pylist()
    level = prompts.column("level").to_pylist() if levels else [None] * len(split)
    ids = [pid for pid, s, lv in zip(prompts.column("prompt_id").to_pylist(), split, level)
           if s == "train" and (not levels or lv in levels)]
    if not ids:
        where = f" and a level in {list(levels)} (generate.train_levels)" if levels else ""
        raise SchemaError(f"{source or 'prompts'}: no rows with split == 'train'{where}; generate samples train "
                          "prompts only")
    return sorted(ids)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n).tolist()


def epoch_order(n: int, prompts_per_step: int, seed: int, epochs: int) -> list[int]:
    """Concatenated visiting order (indices into the sorted train ids) of the first ``epochs`` epochs."""
    if prompts_per_step > n:
        raise InputError(
            f"prompts_per_step = {prompts_per_step} exceeds the {n} train prompts; a step cannot hold a "
            "prompt twice (rollout ids would collide): lower generate.prompts_per_step or add prompts"
        )
    order: list[int] = []
    for e in range(epochs):
        perm = epoch_permutation(n, seed, e)
        filled = (e * n) % prompts_per_step  # positions of the straddling step already taken
        if filled:
            taken = set(order[len(order) - filled:])
            head = prompts_per_step - filled  # positions this epoch must fill in that step
            ok = [x for x in perm if x not in taken]
            first = ok[:head]
            chosen = set(first)
            perm = first + [x for x in perm if x not in chosen]
        order.extend(perm)
    return order


def select_prompts(train_ids: Sequence[str], prompts_per_step: int, seed: int, iteration: int) -> list[str]:
    """The ``prompts_per_step`` prompt ids of ``iteration``, in selection order."""
    if iteration < 0:
        raise InputError(f"iteration must be >= 0, got {iteration}")
    n = len(train_ids)
    start, stop = iteration * prompts_per_step, (iteration + 1) * prompts_per_step
    order = epoch_order(n, prompts_per_step, seed, epochs=-(-stop // n))
    return [train_ids[i] for i in order[start:stop]]
