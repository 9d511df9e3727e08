"""Dynamic sampling that knows the estimator (DAPO, arXiv 2503.14476, section 3.2), per output part.

``generate.dynamic_sampling: true``: after a part's prompts are sampled, every response is graded
right away with the verify stage's own function (:func:`tcrlsd.verify.verify_rollouts`, the same
graders, pool and overlong penalty), and a prompt group is dropped when its advantage would be zero
under the estimator in use; more prompts are drawn until the part holds as many groups as it should
(``generate.max_draw_rounds`` extra rounds at most). The verify stage grades the kept rollouts again
afterwards (the same verdicts: the grading is deterministic).

Where it departs from DAPO: DAPO keeps a group whose rewards are not all equal. Here "zero advantage"
is asked of the estimator itself (:func:`groups_with_signal`): the estimator's own outcome advantage A
of the rewards (``ESTIMATORS[estimator].outcome``) and a probe Delta of 1 on the rollouts that
will get feedback (:mod:`tcrlsd.feedback`: mode, which, skip_truncated) go through its token form
``ESTIMATORS[estimator].token`` once with Delta = 0 and once with A = 0, lambda at this iteration. So under
grpo / rlsd a group with equal rewards is dropped, while under rlsd_add / rlsd_hybrid an all-wrong
group whose rollouts get feedback is kept (it still carries Delta), until lambda has decayed to 0.

Drawing: round 0 is the part's own prompts of the epoch walk (the prompts and seeds of a run
without dynamic sampling, so a part whose groups all carry signal is byte-identical to one). Each
extra round r draws as many prompts as the part holds (DAPO draws whole generation batches) from
the part's own reserve: the train prompts not selected by this iteration, in a permutation seeded
by (seed, iteration), dealt to the parts round-robin -- so parts never draw the same prompt and
need no coordination (shards, resume). Kept groups fill the part in draw order; groups with signal
beyond the quota are discarded (``surplus``). A part still short after the last round is written
with fewer groups (``short``). The record of each part (drawn, kept, dropped, surplus, rounds) is
kept in the output's resume folder and summed into the stage's metrics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tcrlsd.advantages.estimators import ESTIMATORS, Settings
from tcrlsd.feedback import CRITIC_MODES, gets_feedback

__all__ = ["GroupFilter", "load_group_filter", "groups_with_signal", "reserve_for_parts", "DrawRecord",
           "sum_records"]

_FEEDBACK_MODES = CRITIC_MODES + ("gold", "none")


@dataclass(frozen=True)
class GroupFilter:
    """What decides whether a prompt group carries signal (read from the advantages and critique
    sections; lambda resolved for the iteration)."""

    estimator: str
    settings: Settings
    norm_by_std: bool
    feedback_mode: str
    feedback_which: str
    skip_truncated: bool

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"advantages.estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if self.feedback_mode not in _FEEDBACK_MODES:
            raise ValueError(f"critique.mode {self.feedback_mode!r} is not one of {', '.join(_FEEDBACK_MODES)}")
        if self.feedback_which not in ("auto", "incorrect", "all"):
            raise ValueError(f"critique.which {self.feedback_which!r} is not one of auto, incorrect, all")

    def as_dict(self) -> dict:
        return asdict(self)


def load_group_filter(params_path, iteration: int):
    """``(GroupFilter, VerifyParams)`` from the params file's advantages, critique and verify sections."""
    from tcrlsd.advantages.params import AdvantagesParams, settings_for
    from tcrlsd.params import ParamsError, load_section, load_yaml
    from tcrlsd.verify.params import VerifyParams

    adv = load_section(params_path, "advantages", AdvantagesParams)
    critique = load_yaml(params_path).get("critique")
    if not isinstance(critique, dict) or not {"mode", "which", "skip_truncated"} <= set(critique):
        raise ParamsError(f"{params_path}: generate.dynamic_sampling needs critique.mode, critique.which and "
                          "critique.skip_truncated (which rollouts will get feedback)")
    flt = GroupFilter(adv.estimator, settings_for(adv, iteration), adv.norm_by_std, critique["mode"],
                      critique["which"], bool(critique["skip_truncated"]))
    return flt, load_section(params_path, "verify", VerifyParams)


def groups_with_signal(prompt_ids, rewards, is_correct, finish_reasons, flt: GroupFilter) -> dict[str, bool]:
    """Per prompt id: whether its group's token advantages would not all be zero (module notes).

    One probe token per rollout: A from the group's rewards, Delta = 1 where the rollout will get
    feedback, else 0 (a rollout without feedback has teacher = student).
    """
    ids = list(prompt_ids)
    order = {pid: g for g, pid in enumerate(dict.fromkeys(ids))}
    group = np.array([order[p] for p in ids], dtype=np.int64)  # (R,)
    outcome, token = _estimator_parts(flt.estimator)
    adv = outcome(group, np.asarray(rewards, dtype=np.float64), flt).astype(np.float32)  # (R,) A
    probe = np.array([gets_feedback(flt.feedback_mode, flt.feedback_which, bool(c), f, flt.skip_truncated)
                      for c, f in zip(is_correct, finish_reasons)], dtype=np.float32)  # (R,)
    from_a = token(adv, np.zeros_like(adv), flt.settings)  # (R,) the reward part alone
    from_delta = token(np.zeros_like(adv), probe, flt.settings)  # (R,) the teacher part alone
    nonzero = (from_a != 0) | (from_delta != 0)  # (R,)
    hit = np.bincount(group, weights=nonzero.astype(np.float64), minlength=len(order)) > 0
    return {pid: bool(hit[g]) for pid, g in order.items()}


def _estimator_parts(name: str):
    """(outcome A of a round's rewards, token form Â_t(A, Δ)) of estimator ``name``: its ``ESTIMATORS``
    entry. Batch-whitened outcomes (REINFORCE++) whiten within the round's rows here (every rollout
    weighing 1), not over the whole iteration: they give almost every group A != 0, so they drop
    almost nothing, as they should (they have no group baseline to cancel).
    """
    entry = ESTIMATORS[name]
    return (lambda group, rewards, flt: entry.outcome(group, rewards, np.ones(len(rewards), np.int64), flt.settings),
            entry.token)


def reserve_for_parts(train_ids, chosen, num_parts: int, seed: int, iteration: int) -> list[list[str]]:
    """Per part, the prompts its extra rounds draw from, in order (module notes)."""
    taken = set(chosen)
    rest = [p for p in train_ids if p not in taken]  # sorted train ids minus this iteration's
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, iteration, 0x44594E])))  # "DYN"
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return [rest[p::num_parts] for p in range(num_parts)]


@dataclass
class DrawRecord:
    """What one part drew (prompt groups)."""

    quota: int = 0
    drawn: int = 0
    kept: int = 0
    dropped: int = 0  # zero advantage under the estimator
    surplus: int = 0  # with signal, but the part was already full
    extra_rounds: int = 0

    def write(self, path: Path) -> None:
        from tcrlsd.artifacts import write_json

        write_json(asdict(self), path)


def sum_records(paths) -> dict | None:
    """The parts' records summed (None when one is missing: parts written by an older run)."""
    total = DrawRecord()
    most_rounds = 0
    for path in paths:
        try:
            rec = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        for k in ("quota", "drawn", "kept", "dropped", "surplus", "extra_rounds"):
            setattr(total, k, getattr(total, k) + int(rec[k]))
        most_rounds = max(most_rounds, int(rec["extra_rounds"]))
    out = asdict(total)
    out["short"] = total.quota - total.kept
    out["most_extra_rounds_of_a_part"] = most_rounds
    return out
