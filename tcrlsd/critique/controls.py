"""Whose text becomes a row's feedback: controls (blank, shuffled) and the sibling mode.

Computed over ALL rows of an iteration before they are cut into parts, so a row may take its feedback
from a row of another part; every choice is a pure function of (seed, rollout ids), so any worker of
any shard, and any rerun, makes the same one.

- ``critique.control: blank``: every row that should get feedback gets
  :data:`tcrlsd.reference_critic.CONTENT_FREE_FEEDBACK` and no critic is asked. What the teacher
  learns from a feedback block that says only what the verdict says: the presence effect.
- ``critique.control: shuffled``: each row that should get feedback gets the critique of ANOTHER
  such row of ANOTHER prompt (the critic is asked about that row: its problem, response and verdict),
  placed in this row's teacher context. Same critic, same distribution of critiques, content
  unrelated to this attempt.
- ``critique.mode: sibling`` (SDPO, arXiv 2601.20802): the teacher sees a successful sibling rollout
  of the same group, never the sample itself, where a critique or the gold solution would go; a row
  whose group has no other correct rollout gets no feedback (teacher = student).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

# critique.control values; "none" = the critic's own critique of the row
CONTROLS = ("none", "blank", "shuffled")


def shuffled_sources(rows: Sequence[dict], eligible: Sequence[int], seed: int) -> dict[int, int]:
    """``{row index: source row index}``: a permutation of ``eligible`` in which no row keeps a row of
    its own prompt, deterministic in ``seed`` and the rollout ids.

    The eligible rows are laid out prompt by prompt (prompts and rows within them in a seeded order)
    and each takes the row ``g`` places further round the circle, ``g`` = the largest group: two
    rows ``g`` apart are never in the same block when there are at least ``2g`` rows. With fewer (one
    prompt holds more than half of them) a row takes the next row of another prompt instead (not a
    permutation then); a row with no other prompt at all gets none.
    """
    if not eligible:
        return {}
    rng = random.Random(f"shuffled/{seed}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i in sorted(eligible, key=lambda i: rows[i]["rollout_id"]):
        groups[rows[i]["prompt_id"]].append(i)
    keys = sorted(groups)
    rng.shuffle(keys)
    circle: list[int] = []
    for k in keys:
        block = groups[k]
        rng.shuffle(block)
        circle += block
    m, g = len(circle), max(len(b) for b in groups.values())
    if m >= 2 * g:
        return {circle[t]: circle[(t + g) % m] for t in range(m)}
    out = {}
    for t, i in enumerate(circle):
        for step in range(1, m):
            j = circle[(t + step) % m]
            if rows[j]["prompt_id"] != rows[i]["prompt_id"]:
                out[i] = j
                break
    return out


def sibling_sources(rows: Sequence[dict], eligible: Sequence[int], seed: int) -> dict[int, int]:
    """``{row index: index of a correct sibling}`` (same prompt, another rollout), drawn per rollout id
    and ``seed``; rows whose group has no other correct rollout are absent."""
    correct: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["is_correct"]:
            correct[r["prompt_id"]].append(i)
    out = {}
    for i in eligible:
        others = sorted((j for j in correct.get(rows[i]["prompt_id"], ()) if j != i),
                        key=lambda j: rows[j]["rollout_id"])
        if others:
            out[i] = random.Random(f"sibling/{seed}/{rows[i]['rollout_id']}").choice(others)
    return out


def attach_sources(rows: list[dict], eligible: Sequence[int], mode: str, control: str, seed: int) -> None:
    """Set ``row["source"]`` (the row dict whose text or critique becomes this row's feedback) on the
    rows that take another row's: shuffled control and sibling mode; in place."""
    if control not in CONTROLS:
        raise ValueError(f"critique.control must be one of {', '.join(CONTROLS)}, got {control!r}")
    if mode == "sibling":
        pairs = sibling_sources(rows, eligible, seed)
    elif control == "shuffled":
        pairs = shuffled_sources(rows, eligible, seed)
    else:
        return
    for i, j in pairs.items():
        rows[i]["source"] = rows[j]
    for i in eligible:
        rows[i].setdefault("source", None)  # eligible, but nobody to take feedback from


def control_label(label: str, tag: str | None) -> str:
    """The ``critic`` column of a row whose feedback is not the critic's own on this row:
    ``<critic label>|<tag>`` (e.g. ``reference|shuffled:p3#2``, ``reference|noise:wrong_value``)."""
    return label if not tag else f"{label}|{tag}"
