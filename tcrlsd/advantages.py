"""Token-level advantages: GRPO, RLSD, and the two forms that keep a signal when A = 0.

Formulas (ARCHITECTURE.md, exactly)::

    A   = (r − mean_group) / (std_group + 1e-6)   std unbiased (like verl); norm_by_std=false → r − mean
    Δ_t = log Q_t − log P_t                        teacher_logprobs − student_logprobs
    w_t = exp(sign(A) · Δ_t)
    m_t = (1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w)
    λ(k) = λ_0 · max(0, 1 − k / decay_steps)       k = the rollouts' iteration

    grpo         Â_t = A
    rlsd         Â_t = A · m_t
    rlsd_add     Â_t = (1 − λ) · A + λ · Δ_t
    rlsd_hybrid  Â_t = α · A · m_t + β · Δ_t

Where this departs from the references, and why:

- A group of one rollout gets A = 0. verl treats a singleton group as mean 0, std 1, so there A = r;
  the design here says a lone sample carries no relative information.
- A group whose rewards are all equal gets A = 0 exactly (the formula gives 0 up to the rounding of
  the mean for non-binary rewards); that is what "saturated" means in the metrics.
- ``delta_clip`` (off by default) clips Δ_t to [−c, c] in the additive term only; the
  multiplicative term is already bounded by ε_w. Neither RLSD nor SDPO clips Δ.

Layout: the estimators are pure functions of (A broadcast to tokens, Δ, settings) in one dict,
:data:`ESTIMATORS`. :func:`compute_advantages` streams the scores by Parquet batches (memory does not
grow with the number of tokens), computes Â with numpy on the flattened list values and offsets, and
writes the ``advantages`` artifact through a ParquetWriter to a temporary name, renamed at the end.
:func:`compare_estimators` does the same pass for every estimator at once and writes nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tcrlsd.artifacts import artifact_files, artifact_path
from tcrlsd.schemas import ARTIFACTS, SchemaError, schema_for, validate

__all__ = [
    "AdvantagesParams",
    "Settings",
    "Estimator",
    "ESTIMATORS",
    "STD_EPS",
    "IterationInputs",
    "lam_schedule",
    "settings_for",
    "group_advantages",
    "token_advantages",
    "compute_advantages",
    "compare_estimators",
    "reference_token_advantages",
]

STD_EPS = 1e-6  # added to the group std, as in verl
DEFAULT_BATCH_ROWS = 1024  # scores rows per streamed batch (~1M tokens at 1k tokens a response)


# ---------------------------------------------------------------------------------------------
# Params and settings


@dataclass(frozen=True)
class AdvantagesParams:
    """``params.yaml`` section ``advantages``."""

    estimator: str = "rlsd_hybrid"  # grpo | rlsd | rlsd_add | rlsd_hybrid
    alpha: float = 0.7  # rlsd_hybrid: weight of A·m_t
    beta: float = 0.3  # rlsd_hybrid: weight of Δ_t
    lam0: float = 0.5  # λ_0, teacher weight at iteration 0
    lam_decay_steps: int = 50  # λ reaches 0 at this iteration
    eps_w: float = 0.2  # clip of w_t to [1 − ε_w, 1 + ε_w]
    norm_by_std: bool = True  # A divided by the group std (+1e-6); false → A = r − mean
    delta_clip: float | None = None  # clip Δ_t to [−c, c] in the additive term; None = off

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")
        for name in ("alpha", "beta", "lam0", "eps_w"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.0 <= self.lam0 <= 1.0:
            raise ValueError(f"lam0 must lie in [0, 1], got {self.lam0}")
        if self.lam_decay_steps <= 0:
            raise ValueError(f"lam_decay_steps must be a positive integer, got {self.lam_decay_steps}")
        if not 0.0 <= self.eps_w <= 1.0:
            raise ValueError(f"eps_w must lie in [0, 1], got {self.eps_w}")
        if self.delta_clip is not None and not (self.delta_clip > 0 and math.isfinite(self.delta_clip)):
            raise ValueError(f"delta_clip must be a positive number or null, got {self.delta_clip}")


@dataclass(frozen=True)
class Settings:
    """Everything an estimator reads besides A and Δ (λ already resolved for the iteration)."""

    lam: float
    eps_w: float
    alpha: float
    beta: float
    delta_clip: float | None = None


def lam_schedule(lam0: float, decay_steps: int, iteration: int) -> float:
    """λ(k) = λ_0 · max(0, 1 − k / decay_steps)."""
    return lam0 * max(0.0, 1.0 - iteration / decay_steps)


def settings_for(params: AdvantagesParams, iteration: int, lam: float | None = None) -> Settings:
    """Resolve λ: ``lam`` when given, else the schedule at ``iteration``."""
    if lam is None:
        lam = lam_schedule(params.lam0, params.lam_decay_steps, iteration)
    elif not (0.0 <= lam <= 1.0):
        raise ValueError(f"λ must lie in [0, 1], got {lam}")
    return Settings(lam=float(lam), eps_w=params.eps_w, alpha=params.alpha, beta=params.beta,
                    delta_clip=params.delta_clip)


# ---------------------------------------------------------------------------------------------
# The estimators: pure functions, one signature, one registry.
#   adv:   (N,) float32  the rollout's group advantage A, repeated over its tokens
#   delta: (N,) float32  Δ_t = teacher − student log-prob
#   returns (N,) Â_t, same dtype
# Token math runs in float32, the dtype of the inputs and of the stored output: float64 gave the
# same values to a few float32 ulps at twice the time (the group advantage itself is float64).

Estimator = Callable[[np.ndarray, np.ndarray, Settings], np.ndarray]


def _reweight(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    """m_t = (1 − λ) + λ · clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for large Δ; the clip bounds it
        w = np.exp(np.sign(adv) * delta)  # (N,)
    return (1.0 - s.lam) + s.lam * np.clip(w, 1.0 - s.eps_w, 1.0 + s.eps_w)


def _additive_delta(delta: np.ndarray, s: Settings) -> np.ndarray:
    return delta if s.delta_clip is None else np.clip(delta, -s.delta_clip, s.delta_clip)


def grpo(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return adv.copy()


def rlsd(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return adv * _reweight(adv, delta, s)


def rlsd_add(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return (1.0 - s.lam) * adv + s.lam * _additive_delta(delta, s)


def rlsd_hybrid(adv: np.ndarray, delta: np.ndarray, s: Settings) -> np.ndarray:
    return s.alpha * adv * _reweight(adv, delta, s) + s.beta * _additive_delta(delta, s)


ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo,
    "rlsd": rlsd,
    "rlsd_add": rlsd_add,
    "rlsd_hybrid": rlsd_hybrid,
}


# ---------------------------------------------------------------------------------------------
# Group advantage and token-level computation on flat arrays


def group_advantages(group: np.ndarray, rewards: np.ndarray, norm_by_std: bool) -> np.ndarray:
    """GRPO A per rollout. ``group``: (R,) int group index 0..G-1; ``rewards``: (R,). Returns (R,) float64.

    Unbiased std (ddof=1) like verl; a group of one, or a group whose rewards are all equal, gets 0.
    """
    group = np.asarray(group, dtype=np.int64)
    r = np.asarray(rewards, dtype=np.float64)  # (R,)
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    n_groups = int(group.max()) + 1
    count = np.bincount(group, minlength=n_groups).astype(np.float64)  # (G,)
    mean = np.bincount(group, weights=r, minlength=n_groups) / np.maximum(count, 1)  # (G,)
    centred = r - mean[group]  # (R,)
    ss = np.bincount(group, weights=centred * centred, minlength=n_groups)  # (G,)
    std = np.sqrt(ss / np.maximum(count - 1, 1))  # (G,) unbiased; singleton handled below
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, group, r)
    np.maximum.at(hi, group, r)
    flat = (count < 2) | (lo == hi)  # (G,) singleton or all-equal: no relative signal
    adv = centred / (std[group] + STD_EPS) if norm_by_std else centred
    return np.where(flat[group], 0.0, adv)


def token_advantages(
    estimator: str,
    group_adv: np.ndarray,
    offsets: np.ndarray,
    student: np.ndarray,
    teacher: np.ndarray,
    settings: Settings,
) -> np.ndarray:
    """Â for a batch of rows given as flat token arrays.

    ``group_adv``: (B,) A per row; ``offsets``: (B+1,) start of each row in the flat arrays (0-based);
    ``student``/``teacher``: (N,) log-probs. Returns (N,) float32.
    """
    lengths = np.diff(offsets)  # (B,)
    adv_tok = np.repeat(np.asarray(group_adv, dtype=np.float32), lengths)  # (N,)
    delta = np.asarray(teacher, dtype=np.float32) - np.asarray(student, dtype=np.float32)  # (N,)
    return ESTIMATORS[estimator](adv_tok, delta, settings).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# A plain restatement of the formulas, token by token in Python floats: the ground truth for the
# loop-vs-vectorised tests and the "per-row Python loop" baseline of bench/recompute.py.

_REFERENCE: dict[str, Callable[[float, float, float, float, Settings], float]] = {
    # (A, Δ, m, Δ for the additive term, settings) -> Â_t
    "grpo": lambda a, d, m, dd, s: a,
    "rlsd": lambda a, d, m, dd, s: a * m,
    "rlsd_add": lambda a, d, m, dd, s: (1.0 - s.lam) * a + s.lam * dd,
    "rlsd_hybrid": lambda a, d, m, dd, s: s.alpha * a * m + s.beta * dd,
}


def reference_token_advantages(
    estimator: str, group_adv: float, student: Sequence[float], teacher: Sequence[float], s: Settings
) -> list[float]:
    """Â for one row, one token at a time (slow; for tests and benchmarks only)."""
    sign = (group_adv > 0) - (group_adv < 0)
    out = []
    for p, q in zip(student, teacher):
        d = float(q) - float(p)
        try:
            w = math.exp(sign * d)
        except OverflowError:
            w = math.inf
        m = (1.0 - s.lam) + s.lam * min(max(w, 1.0 - s.eps_w), 1.0 + s.eps_w)
        dd = d if s.delta_clip is None else min(max(d, -s.delta_clip), s.delta_clip)
        out.append(_REFERENCE[estimator](group_adv, d, m, dd, s))
    return out


# ---------------------------------------------------------------------------------------------
# Inputs: artifact files, schema checks, streamed batches



@dataclass(frozen=True)
class IterationInputs:
    """Where an iteration's inputs live (each a ``NAME.parquet`` file or a ``NAME/`` shard folder)."""

    rollouts: Path
    verdicts: Path
    scores: Path
    critiques: Path | None = None

    @classmethod
    def find(cls, iter_dir: str | os.PathLike) -> "IterationInputs":
        """Locate rollouts, verdicts, scores (required) and critiques (optional) in ``iter_dir``."""
        d = Path(iter_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not an iteration folder")
        found = {}
        for name in ("rollouts", "verdicts", "scores", "critiques"):
            try:
                found[name] = artifact_path(d / name)
            except FileNotFoundError:
                if name != "critiques":
                    raise FileNotFoundError(
                        f"{d}: no {name} artifact ({name}.parquet or {name}/) in this iteration folder"
                    ) from None
                found[name] = None
        return cls(**found)

    def all_paths(self) -> list[Path]:
        return [p for p in (self.rollouts, self.verdicts, self.scores, self.critiques) if p is not None]


def _check_schema(file: Path, name: str, needed: Sequence[str]) -> None:
    """Check that ``file`` has the ``needed`` columns of artifact ``name`` with compatible types.

    Reads only the footer. The other columns of the contract are not required here (this stage does
    not read them) but, when present, must have the right type too.
    """
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: not a readable Parquet file: {exc}") from None
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise SchemaError(
            f"{file}: {name} is missing column(s) {', '.join(missing)}; the advantages stage needs "
            f"{', '.join(needed)}; found: {', '.join(schema.names)}"
        )
    table = schema.empty_table()
    for col in ARTIFACTS[name]:
        if col.name not in schema.names:
            table = table.append_column(pa.field(col.name, col.type, nullable=True), pa.array([], col.type))
    validate(table, name, source=str(file))


def _iter_batches(path: Path, name: str, columns: list[str], batch_rows: int) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """Batches of ``columns`` of artifact ``name``, file by file, cast to the contract's types."""
    types = {c.name: c.type for c in ARTIFACTS[name]}
    target = pa.schema([pa.field(c, types[c]) for c in columns])
    files = artifact_files(path, name)
    for f in files:
        _check_schema(f, name, columns)
    for f in files:
        pf = pq.ParquetFile(f)
        # One row group at a time: an iter_batches over the whole file keeps memory that grows with
        # the file (measured: 183 -> 356 MiB peak from 8M to 32M tokens); per row group it stays
        # flat, bounded by the largest row group's column chunks.
        for rg in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[rg]):
                yield f, _checked(f, name, columns, target, batch)


def _checked(f: Path, name: str, columns: list[str], target: pa.Schema, batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` cast to the contract's types, with no nulls in ``columns``."""
    if batch.schema != target:
        batch = batch.cast(target)
    for c in columns:
        col = batch.column(c)
        if col.null_count:
            row = int(pc.indices_nonzero(col.is_null())[0].as_py())
            rid = batch.column("rollout_id")[row].as_py() if c != "rollout_id" else None
            what = f"rollout_id {rid!r}" if rid is not None else "a row"
            raise SchemaError(f"{f}: {name}: column {c!r} is null for {what}; nulls are not allowed there")
    return batch


def _read_small(path: Path, name: str, columns: list[str], batch_rows: int) -> pa.Table:
    batches = [b for _, b in _iter_batches(path, name, columns, batch_rows)]
    if not batches:
        return schema_for(name).empty_table().select(columns)
    return pa.Table.from_batches(batches)


def _flat(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values (N,), offsets (B+1,) from 0) of a list array, whatever its slice offset."""
    offsets = arr.offsets.to_numpy().astype(np.int64)  # (B+1,)
    values = arr.values.to_numpy(zero_copy_only=False)  # nulls inside lists become NaN
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


# ---------------------------------------------------------------------------------------------
# Per-rollout tables (small: one value per rollout)


@dataclass
class _Rollouts:
    ids: pa.Array  # (R,) string
    group: np.ndarray  # (R,) int64 group index (by prompt_id)
    lengths: np.ndarray  # (R,) int64 len(response_token_ids)
    iteration: int
    rewards: np.ndarray | None = None  # (R,) float64, from verdicts
    feedback: np.ndarray | None = None  # (R,) bool, from critiques


def _load_rollouts(path: Path, batch_rows: int, iteration: int | None) -> _Rollouts:
    ids, prompts, iters, lengths = [], [], [], []
    cols = ["rollout_id", "prompt_id", "iteration", "response_token_ids"]
    for _, b in _iter_batches(path, "rollouts", cols, batch_rows):
        ids.append(b.column("rollout_id"))
        prompts.append(b.column("prompt_id"))
        iters.append(b.column("iteration").to_numpy())
        lengths.append(pc.list_value_length(b.column("response_token_ids")).to_numpy().astype(np.int64))
    if not ids:
        raise SchemaError(f"{path}: rollouts has no rows; nothing to compute advantages for")
    id_arr = pa.chunked_array(ids).combine_chunks()
    n_unique = pc.count_distinct(id_arr).as_py()
    if n_unique != len(id_arr):
        dup = next(v["values"] for v in pc.value_counts(id_arr).to_pylist() if v["counts"] > 1)
        raise SchemaError(f"{path}: rollouts: rollout_id {dup!r} appears more than once; it must be unique")
    group = pc.dictionary_encode(pa.chunked_array(prompts).combine_chunks()).indices.to_numpy().astype(np.int64)
    its = np.unique(np.concatenate(iters))
    if iteration is None:
        if len(its) != 1:
            raise SchemaError(
                f"{path}: rollouts hold several iterations ({', '.join(map(str, its[:5]))}); "
                "the λ schedule needs one -- pass the iteration explicitly"
            )
        iteration = int(its[0])
    return _Rollouts(ids=id_arr, group=group, lengths=np.concatenate(lengths), iteration=iteration)


def _align(r_ids: pa.Array, path: Path, name: str, other_ids: pa.Array) -> np.ndarray:
    """For each rollout, the row of ``other`` with the same rollout_id; one row per rollout exactly."""
    n_unique = pc.count_distinct(other_ids).as_py()
    if n_unique != len(other_ids):
        dup = next(v["values"] for v in pc.value_counts(other_ids).to_pylist() if v["counts"] > 1)
        raise SchemaError(f"{path}: {name}: rollout_id {dup!r} appears more than once; it must be unique")
    pos = pc.index_in(r_ids, value_set=other_ids)
    if pos.null_count:
        row = int(pc.indices_nonzero(pos.is_null())[0].as_py())
        raise SchemaError(
            f"{path}: {name} has no row for {pos.null_count} rollout(s), e.g. rollout_id {r_ids[row].as_py()!r}"
        )
    if len(other_ids) != len(r_ids):
        extra = pc.invert(pc.is_in(other_ids, value_set=r_ids))
        row = int(pc.indices_nonzero(extra)[0].as_py())
        raise SchemaError(
            f"{path}: {name} has {len(other_ids) - len(r_ids)} row(s) for rollouts not in the rollouts "
            f"artifact, e.g. rollout_id {other_ids[row].as_py()!r}"
        )
    return pos.to_numpy().astype(np.int64)


def _attach_verdicts(ro: _Rollouts, path: Path, batch_rows: int) -> None:
    t = _read_small(path, "verdicts", ["rollout_id", "reward"], batch_rows)
    pos = _align(ro.ids, path, "verdicts", t.column("rollout_id").combine_chunks())
    reward = t.column("reward").to_numpy().astype(np.float64)[pos]  # (R,)
    if not np.isfinite(reward).all():
        row = int(np.flatnonzero(~np.isfinite(reward))[0])
        raise SchemaError(f"{path}: verdicts: reward is NaN or inf for rollout_id {ro.ids[row].as_py()!r}")
    ro.rewards = reward


def _attach_critiques(ro: _Rollouts, path: Path, batch_rows: int) -> None:
    files = artifact_files(path, "critiques")
    for f in files:
        _check_schema(f, "critiques", ["rollout_id", "feedback_text"])
    tables = [pq.read_table(f, columns=["rollout_id", "feedback_text"]) for f in files]
    t = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    ids = t.column("rollout_id").combine_chunks().cast(pa.string())
    pos = _align(ro.ids, path, "critiques", ids)
    ro.feedback = t.column("feedback_text").is_valid().to_numpy(zero_copy_only=False)[pos]


# ---------------------------------------------------------------------------------------------
# Metrics accumulated over batches


def _row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row sums of flat token ``values`` (N,) with row ``offsets`` (B+1,); empty rows give 0.

    ``np.add.reduceat`` over the starts of the non-empty rows: each segment then runs exactly to
    the next non-empty row's start, since empty rows own no tokens.
    """
    lengths = np.diff(offsets)  # (B,)
    dtype = np.int64 if values.dtype == np.bool_ else np.float64
    out = np.zeros(len(lengths), dtype=dtype)  # (B,)
    filled = lengths > 0
    if filled.any():
        out[filled] = np.add.reduceat(values, offsets[:-1][filled], dtype=dtype)
    return out


@dataclass
class _Totals:
    """Sums over tokens of one estimator's Â."""

    abs_sum: float = 0.0
    sum: float = 0.0
    nonzero: int = 0
    saturated_nonzero: int = 0

    def add(self, adv: np.ndarray, offsets: np.ndarray, saturated: np.ndarray) -> None:
        """``adv``: (N,) Â of a batch; ``offsets``: (B+1,); ``saturated``: (B,) row in an all-equal group."""
        nonzero = _row_sums(adv != 0, offsets)  # (B,)
        self.abs_sum += float(np.abs(adv).sum(dtype=np.float64))
        self.sum += float(adv.sum(dtype=np.float64))
        self.nonzero += int(nonzero.sum())
        self.saturated_nonzero += int(nonzero[saturated].sum())


@dataclass
class _Shared:
    """Sums that do not depend on the estimator."""

    tokens: int = 0
    saturated_tokens: int = 0
    feedback_tokens: int = 0
    feedback_delta_sum: float = 0.0
    delta_abs_sum: float = 0.0
    teacher_differs_rows: int = 0


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _group_metrics(ro: _Rollouts) -> tuple[dict, np.ndarray]:
    """Reward and saturation metrics; also (G,) bool 'all rewards equal' per group."""
    g = ro.group
    n_groups = int(g.max()) + 1
    count = np.bincount(g, minlength=n_groups)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, g, ro.rewards)
    np.maximum.at(hi, g, ro.rewards)
    saturated = lo == hi  # (G,) includes groups of one
    metrics = {
        "rollouts": int(len(g)),
        "groups": n_groups,
        "reward_mean": float(ro.rewards.mean()),
        "saturated_group_share": float(saturated.mean()),
        "saturated_all_correct_share": float((saturated & (hi > 0)).mean()),
        "saturated_all_wrong_share": float((saturated & (hi <= 0)).mean()),
        "singleton_group_share": float((count == 1).mean()),
    }
    return metrics, saturated


def _estimator_metrics(t: _Totals, sh: _Shared) -> dict:
    return {
        "adv_abs_mean": _ratio(t.abs_sum, sh.tokens),
        "adv_mean": _ratio(t.sum, sh.tokens),
        "adv_nonzero_token_share": _ratio(t.nonzero, sh.tokens),
        "saturated_adv_nonzero_token_share": _ratio(t.saturated_nonzero, sh.saturated_tokens),
    }


# ---------------------------------------------------------------------------------------------
# The streamed pass

_SCORE_COLUMNS = ["rollout_id", "student_logprobs", "teacher_logprobs"]


def _row_index(r_ids: pa.Array, ids: pa.Array, cursor: int, source: Path) -> np.ndarray:
    """Rollout row of each id in ``ids``. Fast path: scores written in the rollouts' order (what the
    score stage does) -- one comparison with the matching slice instead of a hash lookup over all
    rollouts per batch."""
    n = len(ids)
    if cursor + n <= len(r_ids) and pc.all(pc.equal(ids, r_ids.slice(cursor, n))).as_py() in (True, None):
        return np.arange(cursor, cursor + n, dtype=np.int64)
    pos = pc.index_in(ids, value_set=r_ids)
    if pos.null_count:
        row = int(pc.indices_nonzero(pos.is_null())[0].as_py())
        raise SchemaError(f"{source}: scores has a row for rollout_id {ids[row].as_py()!r}, which is not in the rollouts")
    return pos.to_numpy().astype(np.int64)


class _AtomicParquet:
    """A ParquetWriter on a temporary name beside ``path``, renamed to ``path`` only on success."""

    def __init__(self, path: Path, schema: pa.Schema):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.path, self.tmp = path, Path(tmp)
        # same options as tcrlsd.artifacts.write_table: same table -> same bytes
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd", use_dictionary=False,
                                       write_statistics=False)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def __enter__(self) -> "_AtomicParquet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _check_out_path(out: Path, inputs: IterationInputs) -> None:
    o = out.resolve()
    for p in inputs.all_paths():
        q = p.resolve()
        if o == q or q in o.parents:
            raise ValueError(f"--out {out} would overwrite the input artifact {p}; choose another path")


def _check_score_batch(
    f: Path, ids: pa.Array, idx: np.ndarray, seen: np.ndarray, want: np.ndarray,
    columns: dict[str, tuple[np.ndarray, np.ndarray]], rollouts_path: Path,
) -> None:
    """Each score row once, token lists as long as the response, finite log-probs; errors name the row.

    ``idx``: (B,) rollout rows; ``seen``: (R,) rows met in earlier batches; ``want``: (B,) response
    lengths; ``columns``: name -> (flat values (N,), offsets (B+1,)).
    """
    order = np.sort(idx)
    twice = order[:-1][np.diff(order) == 0]
    again = seen[idx] | np.isin(idx, twice)  # (B,) met in an earlier batch, or twice in this one
    if again.any():
        rid = ids[int(np.flatnonzero(again)[0])].as_py()
        raise SchemaError(f"{f}: scores: rollout_id {rid!r} appears more than once; it must be unique")
    for col, (values, offsets) in columns.items():
        got = np.diff(offsets)  # (B,)
        bad = got != want
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SchemaError(
                f"{f}: scores: rollout_id {ids[row].as_py()!r}: len({col}) = {got[row]} but "
                f"len(response_token_ids) = {want[row]} in {rollouts_path}"
            )
        finite = np.isfinite(values)
        if not finite.all():
            tok = int(np.flatnonzero(~finite)[0])
            row = int(np.searchsorted(offsets, tok, side="right") - 1)
            raise SchemaError(
                f"{f}: scores: column {col!r} has NaN or inf for rollout_id {ids[row].as_py()!r} "
                f"(token {tok - offsets[row]}); expected finite log-probabilities"
            )


def _advantages_table(ids: pa.Array, group_adv: np.ndarray, offsets: np.ndarray, adv: np.ndarray, name: str) -> pa.Table:
    """The advantages artifact rows of one batch; lists built from the offsets, no per-row loop."""
    return pa.Table.from_arrays(
        [
            ids,
            pa.array(group_adv, pa.float32()),  # (B,)
            pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(adv)),  # (B,) lists, (N,) values
            pa.array([name] * len(ids), pa.string()),
        ],
        schema=schema_for("advantages"),
    )


def _stream(
    inputs: IterationInputs,
    params: AdvantagesParams,
    estimators: Sequence[str],
    out: _AtomicParquet | None,
    iteration: int | None,
    lam: float | None,
    batch_rows: int,
) -> tuple[dict, dict[str, dict]]:
    """One pass over the scores: every estimator in ``estimators``; ``params.estimator``'s to ``out``."""
    ro = _load_rollouts(inputs.rollouts, batch_rows, iteration)
    _attach_verdicts(ro, inputs.verdicts, batch_rows)
    if inputs.critiques is not None:
        _attach_critiques(ro, inputs.critiques, batch_rows)
    settings = settings_for(params, ro.iteration, lam)
    adv_row = group_advantages(ro.group, ro.rewards, params.norm_by_std).astype(np.float32)  # (R,)
    shared_metrics, saturated_group = _group_metrics(ro)
    saturated_row = saturated_group[ro.group]  # (R,) bool
    differs_row = np.zeros(len(ro.group), dtype=bool)  # (R,) teacher != student somewhere
    seen = np.zeros(len(ro.group), dtype=bool)  # (R,)
    cursor = 0  # score rows read so far
    sh = _Shared()
    totals = {name: _Totals() for name in estimators}
    for f, b in _iter_batches(inputs.scores, "scores", _SCORE_COLUMNS, batch_rows):
        ids = b.column("rollout_id")
        idx = _row_index(ro.ids, ids, cursor, f)  # (B,) rollout row of each score row
        cursor += len(idx)
        student, offsets = _flat(b.column("student_logprobs"))  # (N,), (B+1,)
        teacher, t_offsets = _flat(b.column("teacher_logprobs"))  # (N,), (B+1,)
        _check_score_batch(f, ids, idx, seen, ro.lengths[idx],
                           {"student_logprobs": (student, offsets), "teacher_logprobs": (teacher, t_offsets)},
                           inputs.rollouts)
        seen[idx] = True
        lengths = np.diff(offsets)  # (B,)
        adv_tok = np.repeat(adv_row[idx], lengths)  # (N,) float32
        delta = teacher - student  # (N,) float32
        differs = _row_sums(delta != 0, offsets) > 0  # (B,)
        differs_row[idx] = differs
        fb = ro.feedback[idx] if ro.feedback is not None else differs  # (B,) rows with feedback
        sat = saturated_row[idx]  # (B,)
        sh.tokens += int(len(delta))
        sh.saturated_tokens += int(lengths[sat].sum())
        sh.feedback_tokens += int(lengths[fb].sum())
        sh.feedback_delta_sum += float(_row_sums(delta, offsets)[fb].sum())
        sh.delta_abs_sum += float(np.abs(delta).sum(dtype=np.float64))
        for name in estimators:
            adv = ESTIMATORS[name](adv_tok, delta, settings).astype(np.float32, copy=False)  # (N,)
            totals[name].add(adv, offsets, sat)
            if out is not None and name == params.estimator:
                out.write(_advantages_table(ids, adv_row[idx], offsets, adv, name))
    if not seen.all():
        row = int(np.flatnonzero(~seen)[0])
        raise SchemaError(
            f"{inputs.scores}: scores has no row for {int((~seen).sum())} rollout(s), "
            f"e.g. rollout_id {ro.ids[row].as_py()!r}"
        )
    feedback_rows = ro.feedback if ro.feedback is not None else differs_row
    shared = {
        **shared_metrics,
        "tokens": sh.tokens,
        "iteration": ro.iteration,
        "lam": settings.lam,
        "lam_source": "given" if lam is not None else "schedule",
        "critique_coverage": float(feedback_rows.mean()),
        "critique_coverage_source": "critiques" if ro.feedback is not None else "scores",
        "teacher_differs_share": float(differs_row.mean()),
        "delta_gap": _ratio(sh.feedback_delta_sum, sh.feedback_tokens),
        "delta_abs_mean": _ratio(sh.delta_abs_sum, sh.tokens),
        "settings": {k: v for k, v in asdict(params).items() if k != "estimator"},
    }
    return shared, {name: _estimator_metrics(totals[name], sh) for name in estimators}


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
        shared, per = _stream(inputs, params, [params.estimator], None, iteration, lam, batch_rows)
    else:
        out = Path(out)
        _check_out_path(out, inputs)
        with _AtomicParquet(out, schema_for("advantages")) as writer:
            shared, per = _stream(inputs, params, [params.estimator], writer, iteration, lam, batch_rows)
    return {"estimator": params.estimator, **shared, **per[params.estimator]}


def compare_estimators(
    inputs: IterationInputs,
    params: AdvantagesParams,
    *,
    estimators: Sequence[str] = tuple(ESTIMATORS),
    iteration: int | None = None,
    lam: float | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[dict, dict[str, dict]]:
    """One pass computing every estimator with the same settings; writes nothing.

    Returns (metrics shared by all estimators, {estimator: its own metrics}).
    """
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {', '.join(unknown)}; known: {', '.join(ESTIMATORS)}")
    return _stream(inputs, params, list(estimators), None, iteration, lam, batch_rows)
