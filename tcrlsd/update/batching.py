"""What the update trains on, and in what order: Parquet inputs read per mini-batch, then cut.

- :class:`UpdateInputs` indexes the rollouts, scores and advantages artifacts by ``rollout_id``
  (only ids, prompt ids and lengths are held for every row) and reads the rows of one mini-batch
  at a time, row group by row group: memory follows the mini-batch, not the iteration.
- :func:`plan_mini_batches`: mini-batches counted in prompts, like verl's ``ppo_mini_batch_size``
  (a prompt's whole group of samples stays in one mini-batch); each one is one optimizer step.
  The prompt order is shuffled per epoch with a seed drawn from (seed, iteration, epoch), so a run
  split into separate processes sees the same order as one continuous run. The last mini-batch
  may hold fewer prompts.
- :func:`split_for_ranks`: the sequences of a mini-batch are dealt to processes, longest first,
  each to the process with the fewest tokens so far.
- :func:`plan_micro_batches`: a process's sequences sorted by length (longest first) and cut
  greedily so that ``sequences * longest`` (the padded size) stays within the token budget; with
  sorted lengths a micro-batch's sequences are nearly equal, so little of the budget is padding.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tcrlsd.artifacts import artifact_files
from tcrlsd.batching import plan_padded_batches
from tcrlsd.update.params import UpdateError

__all__ = ["TrainSequence", "UpdateInputs", "plan_mini_batches", "split_for_ranks", "plan_micro_batches",
           "plan_shared_batches"]

_COLUMNS = {
    "rollouts": ("rollout_id", "prompt_id", "iteration", "prompt_token_ids", "response_token_ids", "finish_reason"),
    "scores": ("rollout_id", "student_logprobs"),
    "advantages": ("rollout_id", "advantages"),
}


@dataclass(frozen=True)
class TrainSequence:
    """One rollout as the loss sees it."""

    rollout_id: str
    prompt_ids: list[int]  # context (never empty)
    response_ids: list[int]  # the sampled ids, stop token included for `stop` rows
    old_logprobs: np.ndarray  # (T,) float32: the score stage's student_logprobs
    advantages: np.ndarray  # (T,) float32: A_hat_t
    sampler_logprobs: np.ndarray | None = None  # (T,) float32: rollouts' sampler_logprobs (read for rollout_is only)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class UpdateInputs:
    """rollouts + scores + advantages joined on rollout_id, read one mini-batch at a time."""

    def __init__(self, rollouts: str | os.PathLike, scores: str | os.PathLike, advantages: str | os.PathLike,
                 sampler_logprobs: bool = False):
        """``sampler_logprobs``: also read the rollouts' ``sampler_logprobs`` (update.rollout_is needs them)."""
        self.sources = {"rollouts": rollouts, "scores": scores, "advantages": advantages}
        self._columns = dict(_COLUMNS)
        if sampler_logprobs:
            self._columns["rollouts"] = _COLUMNS["rollouts"] + ("sampler_logprobs",)
        rollouts_path = rollouts
        self._where: dict[str, dict[str, tuple[int, int, int]]] = {}
        self._files: dict[str, list] = {}
        prompt_of: list[str] = []
        lengths: list[int] = []
        response_lengths: list[int] = []
        truncated: list[bool] = []
        iterations: set[int] = set()
        ids: list[str] = []
        for name, cols in self._columns.items():
            files = artifact_files(self.sources[name], name)
            self._files[name] = files
            where: dict[str, tuple[int, int, int]] = {}
            for fi, path in enumerate(files):
                pf = pq.ParquetFile(path)
                missing = [c for c in cols if c not in pf.schema_arrow.names]
                if missing:
                    why = (" (update.rollout_is needs the sampler's log-probs: regenerate the rollouts, or set "
                           "update.rollout_is: none)") if "sampler_logprobs" in missing else ""
                    raise UpdateError(f"{path}: {name} artifact lacks column(s) {', '.join(missing)}{why}")
                read = (["rollout_id"] if name != "rollouts"
                        else ["rollout_id", "prompt_id", "iteration", "prompt_token_ids", "response_token_ids",
                              "finish_reason"])
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=read)
                    rids = t.column("rollout_id").to_pylist()
                    for j, rid in enumerate(rids):
                        if rid in where:
                            raise UpdateError(f"{path}: {name}: rollout_id {rid!r} appears more than once")
                        where[rid] = (fi, rg, j)
                    if name == "rollouts":
                        ids += rids
                        prompt_of += t.column("prompt_id").to_pylist()
                        iterations.update(t.column("iteration").to_pylist())
                        p_len = pc.list_value_length(t.column("prompt_token_ids")).to_numpy(zero_copy_only=False)
                        r_len = pc.list_value_length(t.column("response_token_ids")).to_numpy(zero_copy_only=False)
                        lengths += (p_len + r_len).tolist()
                        response_lengths += r_len.tolist()
                        truncated += [f == "length" for f in t.column("finish_reason").to_pylist()]
                        if len(p_len) and (p_len == 0).any():
                            rid = rids[int(np.argmax(p_len == 0))]
                            raise UpdateError(f"{path}: rollout_id {rid!r}: prompt_token_ids is empty")
            self._where[name] = where
        for name in ("scores", "advantages"):
            extra = set(self._where[name]) - set(self._where["rollouts"])
            missing = [r for r in ids if r not in self._where[name]]
            if missing:
                raise UpdateError(f"{self.sources[name]}: {name} has no row for rollout_id {missing[0]!r} "
                                  f"({len(missing)} rollout(s) missing)")
            if extra:
                raise UpdateError(f"{self.sources[name]}: {name} has rows for unknown rollouts, e.g. {sorted(extra)[0]!r}")
        if len(iterations) > 1:
            raise UpdateError(f"{rollouts_path}: rollouts mix iterations {sorted(iterations)}; one update reads one iteration")
        self.iteration = int(next(iter(iterations))) if iterations else 0
        self.rollout_ids = ids
        self.prompt_ids = prompt_of
        self.lengths = lengths  # prompt + response tokens per rollout
        self.response_lengths = response_lengths
        self.truncated = truncated  # finish_reason == "length": cut by the token limit (update.mask_truncated)

    def __len__(self) -> int:
        return len(self.rollout_ids)

    def _read(self, name: str, rids: Sequence[str]) -> dict[str, dict]:
        """{rollout_id: {column: value}} of ``rids`` from artifact ``name``, row group by row group."""
        groups: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
        for rid in rids:
            fi, rg, j = self._where[name][rid]
            groups[(fi, rg)].append((j, rid))
        out: dict[str, dict] = {}
        cols = [c for c in self._columns[name] if c not in ("rollout_id", "finish_reason")]
        for (fi, rg), rows in sorted(groups.items()):
            t = pq.ParquetFile(self._files[name][fi]).read_row_group(rg, columns=cols)
            t = t.take(pa.array([j for j, _ in rows], pa.int64()))
            data = {c: t.column(c).to_pylist() for c in cols}
            for k, (_, rid) in enumerate(rows):
                out[rid] = {c: data[c][k] for c in cols}
        return out

    def read(self, rows: Sequence[int]) -> list[TrainSequence]:
        """The sequences of rollouts ``rows`` (indices into this index), checked for the loss."""
        rids = [self.rollout_ids[i] for i in rows]
        got = {name: self._read(name, rids) for name in self._columns}
        seqs = []
        for rid in rids:
            r, s, a = got["rollouts"][rid], got["scores"][rid], got["advantages"][rid]
            resp = r["response_token_ids"]
            old = np.asarray(s["student_logprobs"], dtype=np.float32)
            adv = np.asarray(a["advantages"], dtype=np.float32)
            checks = [("scores", "student_logprobs", old), ("advantages", "advantages", adv)]
            sampler = None
            if "sampler_logprobs" in r:
                sampler = np.asarray(r["sampler_logprobs"], dtype=np.float32)
                checks.append(("rollouts", "sampler_logprobs", sampler))
            for name, col, arr in checks:
                if len(arr) != len(resp):
                    raise UpdateError(f"{self.sources[name]}: rollout_id {rid!r}: len({col}) = {len(arr)} but "
                                      f"len(response_token_ids) = {len(resp)}")
                if not np.isfinite(arr).all():
                    raise UpdateError(f"{self.sources[name]}: rollout_id {rid!r}: {col} holds a non-finite value at "
                                      f"token {int(np.argmin(np.isfinite(arr)))}")
            seqs.append(TrainSequence(rid, list(r["prompt_token_ids"]), list(resp), old, adv, sampler))
        return seqs


def plan_mini_batches(prompt_ids: Sequence[str], mini_batch_prompts: int, *, seed: int, iteration: int,
                      epoch: int, shuffle: bool) -> list[list[int]]:
    """Row indices per mini-batch: groups of ``mini_batch_prompts`` prompts (all their samples)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    order = list(groups)
    if shuffle:
        rng = np.random.default_rng([seed, iteration, epoch])
        order = [order[k] for k in rng.permutation(len(order))]
    return [[i for p in order[s : s + mini_batch_prompts] for i in groups[p]]
            for s in range(0, len(order), mini_batch_prompts)]


def split_for_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of ``lengths`` dealt to ``world_size`` processes, balancing tokens (deterministic)."""
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(o) for o in out]


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches, longest first, ``len(batch) * longest <= max_tokens``
    (:func:`tcrlsd.batching.plan_padded_batches`, the score stage's plan too). A sequence longer
    than the budget runs alone.
    """
    return plan_padded_batches(lengths, max_tokens)


def plan_shared_batches(prompt_keys: Sequence, prompt_lengths: Sequence[int], response_lengths: Sequence[int],
                        max_tokens: int) -> list[list[int]]:
    """Packed micro-batches with each prompt written once (``update.share_prompts``): indices grouped
    by prompt (order of first appearance), a group cut into chunks of at most ``max_tokens`` real
    tokens (its prompt counted once per chunk; a response longer than that runs alone), the chunks
    placed first-fit decreasing by :func:`tcrlsd.batching.plan_packed_batches`. A chunk's members
    stay together, in their order."""
    from tcrlsd.batching import plan_packed_batches

    groups: dict = {}
    for i, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(i)
    chunks: list[list[int]] = []
    sizes: list[int] = []
    for members in groups.values():
        plen = prompt_lengths[members[0]]
        current, size = [], plen
        for i in members:
            if current and size + response_lengths[i] > max_tokens:
                chunks.append(current)
                sizes.append(size)
                current, size = [], plen
            current.append(i)
            size += response_lengths[i]
        chunks.append(current)
        sizes.append(size)
    return [[i for c in batch for i in chunks[c]] for batch in plan_packed_batches(sizes, max_tokens)]
