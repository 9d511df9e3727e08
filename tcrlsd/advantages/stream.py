"""The streamed pass over the scores: alignment, checks, output batches."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tcrlsd.advantages.estimators import ESTIMATORS, READS_CONTRAST, contrast_gap, token_advantages
from tcrlsd.advantages.inputs import (
    IterationInputs,
    attach_critiques,
    attach_verdicts,
    flat_list,
    flat_nested,
    iter_artifact_batches,
    load_rollouts,
    scores_have_contexts,
)
from tcrlsd.advantages.metrics import EstimatorTotals, estimator_metrics, group_metrics, row_sums, safe_ratio, SharedSums
from tcrlsd.advantages.params import AdvantagesParams, settings_for
from tcrlsd.artifacts import AtomicParquetWriter
from tcrlsd.errors import InputError
from tcrlsd.schemas import SchemaError, schema_for
from tcrlsd.signals import DeltaGap, coverage

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


def check_out_path(out: Path, inputs: IterationInputs) -> None:
    o = out.resolve()
    for p in inputs.all_paths():
        q = p.resolve()
        if o == q or q in o.parents:
            raise InputError(f"--out {out} would overwrite the input artifact {p}; choose another path")


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


def _wrong_hint_matrix(f: Path, ids: pa.Array, column: pa.Array, lengths: np.ndarray, offsets: np.ndarray,
                       contexts: int | None) -> np.ndarray:
    """(K', N) log-probs of the extra teacher contexts of a batch, token-aligned with ``offsets``.

    Each row must hold the same K' >= 1 contexts as every other row (``contexts``: K' of earlier
    batches), each as long as the response, all finite; errors name the rollout.
    """
    values, inner, outer = flat_nested(column)
    per_row = np.diff(outer)  # (B,) contexts per row
    k = int(per_row[0]) if len(per_row) else (contexts or 1)
    want_k = contexts if contexts is not None else k
    bad = np.flatnonzero(per_row != want_k)
    if want_k < 1 or len(bad):
        row = int(bad[0]) if len(bad) else 0
        raise SchemaError(f"{f}: scores: rollout_id {ids[row].as_py()!r} has {int(per_row[row])} extra teacher "
                          f"contexts, expected {max(want_k, 1)} like every other row")
    got = np.diff(inner).reshape(len(lengths), want_k)  # (B, K') values per context
    bad = np.flatnonzero((got != lengths[:, None]).any(axis=1))
    if len(bad):
        row = int(bad[0])
        raise SchemaError(f"{f}: scores: rollout_id {ids[row].as_py()!r}: an extra_teacher_logprobs entry has "
                          f"{int(got[row][got[row] != lengths[row]][0])} values but the response has {int(lengths[row])}")
    if not np.isfinite(values).all():
        row = int(np.searchsorted(inner, int(np.flatnonzero(~np.isfinite(values))[0]), side="right") - 1) // want_k
        raise SchemaError(f"{f}: scores: column 'extra_teacher_logprobs' has NaN or inf for rollout_id "
                          f"{ids[row].as_py()!r}; expected finite log-probabilities")
    # Row i's contexts are stored one after another: token t of context j sits at
    # inner[outer[i]] + j * L_i + t.
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # (N,)
    pos = np.arange(offsets[-1]) - offsets[:-1][row_of]  # (N,) token index within its row
    base = inner[outer[:-1]][row_of] + pos  # (N,)
    return values[base[None, :] + np.arange(want_k)[:, None] * lengths[row_of][None, :]]  # (K', N)


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


def stream_advantages(
    inputs: IterationInputs,
    params: AdvantagesParams,
    estimators: Sequence[str],
    out: AtomicParquetWriter | None,
    iteration: int | None,
    lam: float | None,
    batch_rows: int,
) -> tuple[dict, dict[str, dict]]:
    """One pass over the scores: every estimator in ``estimators``; ``params.estimator``'s to ``out``."""
    has_contexts = scores_have_contexts(inputs.scores)  # K > 1: extra teacher contexts were scored
    needs = [n for n in estimators if n in READS_CONTRAST]
    if needs and not has_contexts:
        raise SchemaError(f"{inputs.scores}: estimator {needs[0]!r} contrasts the teacher under the correct hint with "
                          "the teacher under wrong hints, but these scores have no extra_teacher_logprobs; set "
                          "critique.wrong_hints >= 1 and rerun critique and score")
    columns = _SCORE_COLUMNS + (["extra_teacher_logprobs"] if has_contexts else [])
    contexts = None  # K' of the first batch: every batch must agree
    ro = load_rollouts(inputs.rollouts, batch_rows, iteration)
    attach_verdicts(ro, inputs.verdicts, batch_rows)
    if inputs.critiques is not None:
        attach_critiques(ro, inputs.critiques, batch_rows)
    settings = settings_for(params, ro.iteration, lam)
    outcome = {}  # outcome function -> (R,) float32 A: computed once per distinct baseline
    for name in estimators:
        fn = ESTIMATORS[name].outcome
        if fn not in outcome:
            outcome[fn] = fn(ro.group, ro.rewards, ro.lengths, settings).astype(np.float32)
    adv_rows = {name: outcome[ESTIMATORS[name].outcome] for name in estimators}  # name -> (R,) A
    shared_metrics, saturated_group = group_metrics(ro)
    saturated_row = saturated_group[ro.group]  # (R,) bool
    differs_row = np.zeros(len(ro.group), dtype=bool)  # (R,) teacher != student somewhere
    seen = np.zeros(len(ro.group), dtype=bool)  # (R,)
    cursor = 0  # score rows read so far
    sh = SharedSums()
    gap = DeltaGap()
    totals = {name: EstimatorTotals() for name in estimators}
    for f, b in iter_artifact_batches(inputs.scores, "scores", columns, batch_rows):
        ids = b.column("rollout_id")
        idx = _row_index(ro.ids, ids, cursor, f)  # (B,) rollout row of each score row
        cursor += len(idx)
        student, offsets = flat_list(b.column("student_logprobs"))  # (N,), (B+1,)
        teacher, t_offsets = flat_list(b.column("teacher_logprobs"))  # (N,), (B+1,)
        _check_score_batch(f, ids, idx, seen, ro.lengths[idx],
                           {"student_logprobs": (student, offsets), "teacher_logprobs": (teacher, t_offsets)},
                           inputs.rollouts)
        seen[idx] = True
        lengths = np.diff(offsets)  # (B,)
        delta = teacher - student  # (N,) float32
        wrong = None  # (K', N) the wrong-hint contexts' log-probs, when the scores have extra contexts
        if has_contexts:
            wrong = _wrong_hint_matrix(f, ids, b.column("extra_teacher_logprobs"), lengths, offsets, contexts)
            contexts = wrong.shape[0]
        differs = row_sums(delta != 0, offsets) > 0  # (B,)
        differs_row[idx] = differs
        sat = saturated_row[idx]  # (B,)
        sh.tokens += int(len(delta))
        sh.saturated_tokens += int(lengths[sat].sum())
        if ro.feedback is not None:  # Δ-gap: feedback rows' tokens, in float64 (tcrlsd.signals)
            fb_tok = np.repeat(ro.feedback[idx], lengths)  # (N,) bool
            gap.add(teacher[fb_tok].astype(np.float64) - student[fb_tok].astype(np.float64))
        sh.delta_abs_sum += float(np.abs(delta).sum(dtype=np.float64))
        if wrong is not None and ro.feedback is not None:  # contrast gap: mean e_t over feedback rows' tokens
            fb = ro.feedback[idx]  # (B,)
            sh.feedback_contrast_sum += float(row_sums(contrast_gap(teacher, wrong), offsets)[fb].sum())
            sh.feedback_contrast_tokens += int(lengths[fb].sum())
        for name in estimators:
            adv = token_advantages(name, adv_rows[name][idx], offsets, student, teacher, settings, wrong)  # (N,)
            totals[name].add(adv, offsets, sat)
            if out is not None and name == params.estimator:
                out.write(_advantages_table(ids, adv_rows[name][idx], offsets, adv, name))
    if not seen.all():
        row = int(np.flatnonzero(~seen)[0])
        raise SchemaError(
            f"{inputs.scores}: scores has no row for {int((~seen).sum())} rollout(s), "
            f"e.g. rollout_id {ro.ids[row].as_py()!r}"
        )
    shared = {
        **shared_metrics,
        "tokens": sh.tokens,
        "iteration": ro.iteration,
        "lam": settings.lam,
        "lam_source": "given" if lam is not None else "schedule",
        # from the critiques; unknown (None) without them (tcrlsd.signals)
        "critique_coverage": None if ro.feedback is None else coverage(int(ro.feedback.sum()), len(ro.feedback)),
        "teacher_differs_share": float(differs_row.mean()),
        "delta_gap": gap.mean,
        "delta_abs_mean": safe_ratio(sh.delta_abs_sum, sh.tokens),
        "settings": {k: v for k, v in asdict(params).items() if k != "estimator"},
    }
    if has_contexts:  # K > 1 only, so the K = 1 metrics keep their keys
        shared["teacher_contexts"] = 1 + (contexts or 0)
        shared["contrast_gap"] = safe_ratio(sh.feedback_contrast_sum, sh.feedback_contrast_tokens)  # None: no critiques
    return shared, {name: estimator_metrics(totals[name], sh) for name in estimators}
