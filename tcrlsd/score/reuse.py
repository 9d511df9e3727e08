"""Where the student's log-probs come from: the rollouts' ``sampler_logprobs`` or a forward pass.

The generate stage already computed log pi(y_t | x, y_<t) for every sampled token. Where those are
the numbers the score stage's student forward would give (:func:`tcrlsd.sampler.reuse_blocker`:
transformers backend, float32 on CPU, temperature 1 / top_p 1 or greedy, the very checkpoint
scored), the stage takes them and runs only the teacher's forward; ``score.reuse_sampler_logprobs``
says whether it may (auto), must (true) or must not (false). The decision is one per artifact
(every row's ``sampler`` record must qualify) and goes into the resume fingerprint as its outcome,
so auto and true, which agree, do not invalidate each other's parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.sampler import reuse_blocker
from tcrlsd.score.params import ScoreError

FROM_SAMPLER, FROM_FORWARD = "sampler", "forward"


@dataclass(frozen=True)
class StudentSource:
    """``source``: ``sampler`` or ``forward``; ``blocked_by``: why the sampler's numbers are not the
    forward's (None where they are, or where reuse was turned off without asking)."""

    source: str
    blocked_by: str | None = None

    @property
    def reuse(self) -> bool:
        return self.source == FROM_SAMPLER

    def as_metrics(self) -> dict:
        return {"student_logprobs_from": self.source, "reuse_blocked_by": self.blocked_by}


def rollouts_blocker(rollouts: pa.Table, *, policy_digest: str, device: str, dtype: str) -> str | None:
    """:func:`reuse_blocker` over every distinct ``sampler`` record of ``rollouts`` (None: all qualify)."""
    if not rollouts.num_rows:
        return None
    if "sampler_logprobs" not in rollouts.column_names:
        return "the rollouts have no sampler_logprobs column"
    if "sampler" not in rollouts.column_names:
        return reuse_blocker(None, policy=policy_digest, device=device, dtype=dtype)
    for record in pc.unique(rollouts.column("sampler")).to_pylist():
        why = reuse_blocker(record, policy=policy_digest, device=device, dtype=dtype)
        if why is not None:
            return why
    return None


def student_source(mode, rollouts: pa.Table, *, policy_digest: str, device: str, dtype: str,
                   where: str = "rollouts") -> StudentSource:
    """Apply ``score.reuse_sampler_logprobs`` (``mode``: auto, True or False) to ``rollouts``.

    ``policy_digest``: content digest of the scored checkpoint; ``device`` / ``dtype``: the stage's
    resolved ones; ``where`` names the rollouts in the error that ``True`` raises when not exact.
    """
    if mode is False:
        return StudentSource(FROM_FORWARD)
    why = rollouts_blocker(rollouts, policy_digest=policy_digest, device=device, dtype=dtype)
    if why is None:
        return StudentSource(FROM_SAMPLER)
    if mode is True:
        raise ScoreError(f"{where}: params score.reuse_sampler_logprobs is true, but the sampler's log-probs are not "
                         f"the student forward's: {why}. Set it to auto (reuse only where exact) or false.")
    return StudentSource(FROM_FORWARD, why)
