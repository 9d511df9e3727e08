"""Wrong hints: extra teacher contexts whose feedback was written for another prompt.

RLCSD (arXiv 2606.11709) contrasts the teacher under a correct hint with the teacher under wrong
hints wrapped in the same template: what both contexts shift alike (style, length, confidence) cancels
in the difference, what only the correct hint explains remains. Here the correct hint is the row's
own feedback (``teacher_prompt``) and each of the ``critique.wrong_hints`` wrong hints is the feedback
the stage's own critic writes when told the rollout answers ANOTHER prompt: that prompt's problem,
rendered prompt, gold answer and gold solution replace the row's in the critic's view (the reference
critic then names the first step that departs from the other problem's solution; ``gold`` mode's
feedback is the other prompt's solution). The teacher context renders the row's own problem with that
feedback through the same teacher template, so the correct and the wrong contexts differ only in the
feedback text.

Where this departs from RLCSD: its hints are the policy's own rollouts to the same problem (a correct
sibling as the positive hint, up to K incorrect siblings as negatives, the target rollout excluded);
here the positive hint is the critique stage's feedback and the negatives are feedback written
against other problems' gold solutions -- plausible in form, wrong in content -- so no group needs
both a correct and an incorrect sample.

Which rows: every row with a primary teacher context gets ``wrong_hints`` extra contexts; a row
without one gets as many null entries (its teacher is the student in every context). A wrong hint the
critic could not write is a null entry too (the score stage scores a null context as the student).

Donors: the distinct prompts of the whole iteration (never of one part: the draw must not depend on
how rows are cut into parts), minus the row's own prompt and any prompt with the same problem text;
``wrong_hints`` of them drawn without replacement, seeded by (critique.seed, rollout_id).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import Callable, Sequence

import pyarrow as pa

from tcrlsd.critique.flags import contains_answer, mask_answer
from tcrlsd.critique.params import CritiqueError, CritiqueParams
from tcrlsd.templates import Template, TemplateError, render_teacher_prompt, split_student_prompt

WRONG_HINT = "wrong_hint"  # the kind recorded in extra_teacher_kinds
_DONOR_FIELDS = ("prompt_id", "problem", "prompt", "answer", "solution")


def donor_pool(rows: Sequence[dict]) -> list[dict]:
    """The distinct prompts of ``rows`` (joined dicts of the whole iteration), sorted by prompt_id."""
    seen: dict[str, dict] = {}
    for r in rows:
        seen.setdefault(r["prompt_id"], {k: r[k] for k in _DONOR_FIELDS})
    return [seen[k] for k in sorted(seen)]


def pick_donors(rollout_id: str, problem: str, pool: Sequence[dict], k: int, seed: int) -> list[dict]:
    """``k`` donors (fewer when the pool is short) for one rollout, none with its problem text."""
    candidates = [d for d in pool if d["problem"] != problem]
    digest = hashlib.sha256(f"wrong-hints/{seed}/{rollout_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(candidates, min(k, len(candidates)))


def add_wrong_hints(
    table: pa.Table,
    rows: Sequence[dict],
    params: CritiqueParams,
    teacher_template: Template,
    pool: Sequence[dict],
    ask: Callable[[list[dict], CritiqueParams], pa.Table],
    wrap: tuple[str, str] | None = None,
) -> pa.Table:
    """``table`` (the critiques of ``rows``) with the extra-context columns appended.

    ``ask(views, params)`` returns the critiques table of critic views (the stage's
    :func:`~tcrlsd.critique.stage.critique_rows` with its critic, journal and retry list bound): each
    view is a row with the donor's problem, prompt, answer and solution and the rollout id
    ``<rollout_id>~wrong<j>`` (its own journal key and sampling seed); only its ``feedback_text`` is used
    (the donor's answer masked there when ``mask_leaked_answer`` is on; the row's own answer is masked
    here, should the wrong hint contain it).
    """
    k = params.wrong_hints
    has_fb = table.column("teacher_prompt").is_valid().to_pylist()
    views, where = [], []  # critic views, and (row, slot, donor prompt_id) of each
    donors_of: list[list[str | None]] = []
    for i, row in enumerate(rows):
        slots: list[str | None] = [None] * k
        if has_fb[i]:
            for j, d in enumerate(pick_donors(row["rollout_id"], row["problem"], pool, k, params.seed)):
                views.append({**row, **{f: d[f] for f in _DONOR_FIELDS}, "rollout_id": f"{row['rollout_id']}~wrong{j}"})
                where.append((i, j))
                slots[j] = d["prompt_id"]
        donors_of.append(slots)
    texts: list[list[str | None]] = [[None] * k for _ in rows]
    if views:
        asked = ask(views, replace(params, which="all", wrong_hints=0))
        for (i, j), text in zip(where, asked.column("feedback_text").to_pylist()):
            if text is None:
                continue
            row = rows[i]
            if params.mask_leaked_answer and contains_answer(text, row["answer"]):  # this row's gold, by chance
                text = mask_answer(text, row["answer"], params.mask_text)
            try:
                prefix, problem, instruction = split_student_prompt(row["prompt"], row["problem"], wrap)
            except TemplateError as exc:
                raise CritiqueError(f"rollout_id {row['rollout_id']!r} (prompt_id {row['prompt_id']!r}): {exc}") from None
            texts[i][j] = render_teacher_prompt(teacher_template, prefix, problem, instruction, text, wrap)
    strings = pa.list_(pa.string())
    return (table.append_column("extra_teacher_prompts", pa.array(texts, strings))
                 .append_column("extra_teacher_kinds", pa.array([[WRONG_HINT] * k for _ in rows], strings))
                 .append_column("extra_hint_prompt_ids", pa.array(donors_of, strings)))


def wrong_hint_metrics(critiques: pa.Table) -> dict:
    """Wrong-hint counts of a critiques table; empty when it has no extra contexts (K = 1)."""
    if "extra_teacher_prompts" not in critiques.column_names:
        return {}
    has_fb = critiques.column("teacher_prompt").is_valid().to_pylist()
    extra = critiques.column("extra_teacher_prompts").to_pylist()
    asked = sum(len(e) for e, fb in zip(extra, has_fb) if fb)
    written = sum(1 for e, fb in zip(extra, has_fb) if fb for t in e if t is not None)
    return {"wrong_hints": max((len(e) for e in extra), default=0), "wrong_hint_contexts": written,
            "wrong_hint_failures": asked - written}
