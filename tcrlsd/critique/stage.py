"""The critique stage: rows -> critiques table, part by part, and its metrics."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from tcrlsd.answers import last_boxed
from tcrlsd.artifacts import ShardSpec, read_artifact, split_evenly
from tcrlsd.critique.backends import GenerationCritic, make_critic
from tcrlsd.critique.controls import attach_sources, control_label
from tcrlsd.critique.content import content_metrics
from tcrlsd.critique.flags import claims_correct, contains_answer, mask_answer, relaxed_equal
from tcrlsd.critique.journal import Journal, prompt_sha
from tcrlsd.critique.params import CritiqueError, CritiqueParams
from tcrlsd.critique.protocol import CriticRetryLater, CritiqueRequest
from tcrlsd.critique.wrong_hints import add_wrong_hints, donor_pool, wrong_hint_metrics
from tcrlsd.feedback import TRUNCATED_NOT_CRITIQUED, skipped_as_truncated, wants_feedback
from tcrlsd.reference_critic import CONTENT_FREE_FEEDBACK, CriticReply
from tcrlsd.resume import ShardedOutput, output_settings, resume_dir, stage_fingerprint
from tcrlsd.schemas import schema_for
from tcrlsd.signals import coverage
from tcrlsd.templates import (
    Template,
    TemplateError,
    chat_wrap,
    default_templates_dir,
    load_template,
    render_critic_prompt,
    render_teacher_prompt,
    split_student_prompt,
)


def _critic_template_name(mode: str, is_correct: bool) -> str:
    kind = "correct" if is_correct else "incorrect"
    return {"critique": f"critic-{kind}", "critique_gold": f"critic-gold-{kind}", "self": f"self-{kind}"}[mode]


def _teacher_template_name(mode: str) -> str:
    # sibling: a successful sibling rollout fills the slot a reference solution fills (SDPO's
    # "Correct solution:" section), so it shares gold mode's context, which the warm start trains
    return "teacher-gold" if mode in ("gold", "sibling") else "teacher-critique"


def templates_for(params: CritiqueParams) -> dict[str, Template]:
    folder = params.templates_dir or default_templates_dir()
    if params.mode == "none":
        return {}
    names = [_teacher_template_name(params.mode)]
    if params.mode in ("critique", "critique_gold", "self"):
        names += [_critic_template_name(params.mode, c) for c in (False, True)]
    return {n: load_template(folder, n) for n in names}


def needs_feedback(mode: str, which: str, is_correct: bool) -> bool:
    return wants_feedback(mode, which, is_correct)


# --------------------------------------------------------------------------------------------------
# Joining the inputs


def join_inputs(rollouts: pa.Table, verdicts: pa.Table, prompts: pa.Table, sources: dict | None = None) -> list[dict]:
    """One dict per rollout, in rollouts order, with its verdict and prompt fields.

    ``sources`` (artifact name -> file) lets the errors name the files."""
    src = {k: str(v) for k, v in (sources or {}).items()}
    v_rows = {r["rollout_id"]: r for r in verdicts.select(
        ["rollout_id", "is_correct", "reason", "extracted_answer"]).to_pylist()}
    p_rows = {r["prompt_id"]: r for r in prompts.select(
        ["prompt_id", "problem", "prompt", "answer", "solution"]).to_pylist()}
    out = []
    for r in rollouts.select(["rollout_id", "prompt_id", "response_text", "finish_reason"]).to_pylist():
        v = v_rows.get(r["rollout_id"])
        if v is None:
            raise CritiqueError(f"{src.get('verdicts', 'verdicts')}: no row for rollout_id {r['rollout_id']!r} of "
                                f"{src.get('rollouts', 'the rollouts')}; every rollout needs a verdict")
        p = p_rows.get(r["prompt_id"])
        if p is None:
            raise CritiqueError(f"{src.get('prompts', 'prompts')}: no row for prompt_id {r['prompt_id']!r} (rollout "
                                f"{r['rollout_id']!r} of {src.get('rollouts', 'the rollouts')})")
        out.append({**r, **{k: v[k] for k in ("is_correct", "reason", "extracted_answer")},
                    **{k: p[k] for k in ("problem", "prompt", "answer", "solution")}})
    return out


def critique_rows(rows: Sequence[dict], params: CritiqueParams, critic, templates: dict[str, Template],
                  wrap: tuple[str, str] | None = None, journal: Journal | None = None,
                  progress=None, retry_later: list | None = None) -> pa.Table:
    """The ``critiques`` table for ``rows`` (joined dicts, see :func:`join_inputs`), in order.

    Rows whose critic request failed transiently are appended to ``retry_later`` as
    ``(rollout_id, error)``: the table must then not be written as a finished part.
    """
    mode, which = params.mode, params.effective_which()
    n = len(rows)
    feedback: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    template_ids: list[str] = [""] * n
    critic_labels = ["none"] * n
    tags: list[str | None] = [None] * n  # what a control did to the row's feedback (in the critic column)
    todo: list[int] = []
    requests: list[CritiqueRequest] = []
    shas: list[str] = []  # journal key of each request: its prompt (and, shuffled, whose row it asks about)
    for i, row in enumerate(rows):
        if not needs_feedback(mode, which, row["is_correct"]):
            if progress is not None:
                progress.update(1)
            continue
        if skipped_as_truncated(mode, row.get("finish_reason"), params.skip_truncated):
            errors[i] = TRUNCATED_NOT_CRITIQUED  # the row's reason: no critique of half a response
            if progress is not None:
                progress.update(1)
            continue
        teacher_id = templates[_teacher_template_name(mode)].id
        src = row.get("source", row)  # the row whose text or critique becomes the feedback (controls.py)
        if src is None or mode == "sibling" or params.control == "blank":
            if src is None and mode != "sibling":
                errors[i] = "shuffled control: no row of another prompt to take a critique from"
            elif src is not None:
                template_ids[i] = teacher_id
                if mode == "sibling":
                    critic_labels[i], feedback[i] = f"sibling:{src['rollout_id']}", src["response_text"]
                else:
                    critic_labels[i], feedback[i] = "control:blank", CONTENT_FREE_FEEDBACK
            if progress is not None:
                progress.update(1)
            continue
        if src is not row:
            tags[i] = f"shuffled:{src['rollout_id']}"
        if mode == "gold":
            critic_labels[i] = "gold"
            template_ids[i] = teacher_id
            if src["solution"]:  # shuffled: another prompt's gold solution
                feedback[i] = src["solution"]
            else:
                errors[i] = "no gold solution in the prompts row"
            if progress is not None:
                progress.update(1)
            continue
        critic_labels[i] = critic.label
        if critic.template_id is not None:  # the critic reads the row itself, not a rendered prompt
            prompt = ""
            template_ids[i] = f"{critic.template_id}+{teacher_id}"
        else:
            tpl = templates[_critic_template_name(mode, src["is_correct"])]
            prompt = render_critic_prompt(tpl, src, params.max_response_chars)
            template_ids[i] = f"{tpl.id}+{teacher_id}"
        sha = prompt_sha(prompt if src is row else f"{src['rollout_id']}\n{prompt}")
        if journal is not None and (done := journal.get(row["rollout_id"], sha)) is not None:
            feedback[i], errors[i] = done
            if progress is not None:
                progress.update(1)
            continue
        todo.append(i)
        shas.append(sha)
        # the request names THIS row (journal key, seeds, noise draw) but carries the source row's text
        requests.append(CritiqueRequest(row["rollout_id"], prompt, src["problem"], src["response_text"],
                                        src["solution"], src["answer"], src["is_correct"],
                                        src["extracted_answer"]))

    def on_reply(j: int, reply: CriticReply) -> None:
        i = todo[j]
        feedback[i], errors[i] = reply.text, (reply.error if reply.text is None else None)
        if reply.control:
            tags[i] = f"{tags[i]},{reply.control}" if tags[i] else reply.control
        if reply.text is None and reply.retryable:
            if retry_later is not None:
                retry_later.append((requests[j].rollout_id, reply.error))
        elif journal is not None:
            journal.add(requests[j].rollout_id, shas[j], reply.text, errors[i])
        if progress is not None:
            progress.update(1)

    if requests:
        critic.critique(requests, on_reply)

    leaks, suspects, teacher_prompts = [], [], []
    for i, row in enumerate(rows):
        text = feedback[i]
        leak = contains_answer(text, row["answer"])
        if text is not None and leak and params.mask_leaked_answer:
            text = feedback[i] = mask_answer(text, row["answer"], params.mask_text)
        leaks.append(leak)
        predicted = row["extracted_answer"] if row["extracted_answer"] is not None else last_boxed(
            row["response_text"])
        suspects.append(not row["is_correct"] and (relaxed_equal(predicted, row["answer"]) or claims_correct(text)))
        if text is None:
            teacher_prompts.append(None)
            continue
        try:
            prefix, problem, instruction = split_student_prompt(row["prompt"], row["problem"], wrap)
        except TemplateError as exc:
            raise CritiqueError(f"rollout_id {row['rollout_id']!r} (prompt_id {row['prompt_id']!r}): {exc}") from None
        teacher_prompts.append(render_teacher_prompt(templates[_teacher_template_name(mode)], prefix, problem,
                                                     instruction, text, wrap))
    return pa.table({
        "rollout_id": pa.array([r["rollout_id"] for r in rows], pa.string()),
        "mode": pa.array([mode] * n, pa.string()),
        "critic": pa.array([control_label(c, t) for c, t in zip(critic_labels, tags)], pa.string()),
        "feedback_text": pa.array(feedback, pa.string()),
        "template": pa.array(template_ids, pa.string()),
        "teacher_prompt": pa.array(teacher_prompts, pa.string()),
        "error": pa.array(errors, pa.string()),
        "leaks_answer": pa.array(leaks, pa.bool_()),
        "suspected_false_negative": pa.array(suspects, pa.bool_()),
    }, schema=schema_for("critiques"))


# --------------------------------------------------------------------------------------------------
# The stage's one function


def _make_stage_critic(params: CritiqueParams, policy_path: str | None):
    if params.mode in ("none", "gold", "sibling") or params.control == "blank":
        return None
    if params.mode == "self":
        if not policy_path:
            raise CritiqueError("mode 'self' needs the policy checkpoint (--policy)")
        return GenerationCritic(params.self_backend, str(policy_path), params.engine.options(),
                                params.sampling_config(),
                                params.max_feedback_chars, params.chunk_rows, params.chat_template_kwargs,
                                label=f"self:{params.self_backend}:{policy_path}")
    return make_critic(params.critic, params, params.critic_model)


def chat_wrap_from(params: CritiqueParams) -> tuple[str, str] | None:
    if not params.policy_chat_template_tokenizer:
        return None
    from tcrlsd.policy import load_tokenizer

    tok = load_tokenizer(params.policy_chat_template_tokenizer, params.engine.trust_remote_code)
    if not getattr(tok, "chat_template", None):
        raise CritiqueError(f"policy_chat_template_tokenizer {params.policy_chat_template_tokenizer!r} "
                            "has no chat template")
    return chat_wrap(tok)


# The resume fingerprint (tcrlsd.resume): the code that computes a part and the params that change
# it (the rest pace the work or say where things are; files found by path go in by content).
CODE_MODULES = ("tcrlsd.critique", "tcrlsd.templates", "tcrlsd.answers", "tcrlsd.reference_critic",
                "tcrlsd.generation", "tcrlsd.feedback")
NOT_OUTPUT = ("templates_dir", "policy_chat_template_tokenizer", "engine.device", "engine.batch_size",
              "engine.max_batch_tokens", "engine.tensor_parallel_size", "engine.gpu_memory_utilization", "chunk_rows",
              "base_url", "api_key_env", "max_concurrency", "request_timeout_s", "max_attempts",
              "backoff_initial_s", "backoff_max_s", "abort_after_failures")


def critique_fingerprint(params: CritiqueParams, templates: dict[str, Template], out_dir, input_paths,
                         policy_path: str | None, rows: int) -> dict:
    """:func:`tcrlsd.resume.stage_fingerprint` of the critique stage."""
    inputs = dict(input_paths) if isinstance(input_paths, dict) else {f"input{i}": p for i, p in enumerate(input_paths)}
    settings = output_settings(params, NOT_OUTPUT)
    code = list(CODE_MODULES)
    if params.mode == "self" and policy_path:
        inputs["policy"] = policy_path
        code.append("tcrlsd.generate")  # self-critique generates through the generate stage's backends
    if params.policy_chat_template_tokenizer:
        inputs["chat_template_tokenizer"] = params.policy_chat_template_tokenizer
    if params.mode in ("critique", "critique_gold") and params.critic in ("transformers", "vllm"):
        code.append("tcrlsd.generate")
        if Path(params.critic_model).exists():
            inputs["critic_model"] = params.critic_model  # a local model: by content, not by path
            settings.pop("critic_model")
    return stage_fingerprint(code=code, settings=settings, inputs=inputs, cache_dir=resume_dir(out_dir),
                             templates={t.id: t.sha for t in templates.values()}, rows=rows)


def run_critique(rollouts: pa.Table, verdicts: pa.Table, prompts: pa.Table, params: CritiqueParams,
                 out_dir: str | os.PathLike, shard: ShardSpec = ShardSpec(), policy_path: str | None = None,
                 input_paths: dict | Sequence[str | os.PathLike] = (), restart: bool = False) -> bool:
    """Write the ``critiques`` artifact under ``out_dir`` part by part; True once it is complete.

    Resumes: finished parts are skipped, and answered rows of an unfinished part are read back from
    its journal (model critics). ``input_paths`` (artifact name -> file) go into the fingerprint by
    content. Raises :class:`CriticRetryLater` after doing every pending part when some rows failed
    transiently (their parts are left unwritten, journals kept).
    """
    rows = join_inputs(rollouts, verdicts, prompts, input_paths if isinstance(input_paths, dict) else None)
    which = params.effective_which()
    attach_sources(rows, [i for i, r in enumerate(rows) if needs_feedback(params.mode, which, r["is_correct"])
                          and not skipped_as_truncated(params.mode, r.get("finish_reason"), params.skip_truncated)],
                   params.mode, params.control, params.seed)
    templates = templates_for(params)
    num_parts = max(1, math.ceil(len(rows) / params.rows_per_part))
    fingerprint = critique_fingerprint(params, templates, out_dir, input_paths, policy_path, len(rows))
    out = ShardedOutput(out_dir, "critiques", num_parts, fingerprint, restart=restart)
    pending = out.pending(shard)
    if not pending:
        return out.complete()
    ranges = split_evenly(len(rows), num_parts)
    critic = _make_stage_critic(params, policy_path)
    wrap = chat_wrap_from(params)
    from tcrlsd.progress import progress_bar

    pool = donor_pool(rows) if params.wrong_hints else []  # wrong-hint donors: the whole iteration's prompts
    total = sum(len(ranges[p]) for p in pending)
    retry_later: list[tuple[str, str]] = []
    unfinished = []
    with progress_bar(total=total, desc=f"critique ({params.mode})", unit="row", mininterval=1.0) as bar:
        for part in pending:
            part_rows = [rows[i] for i in ranges[part]]
            journal_path = out.journal_path(part)
            journal = Journal(journal_path) if critic is not None and critic.journaled else None
            failed: list[tuple[str, str]] = []
            try:
                table = critique_rows(part_rows, params, critic, templates, wrap, journal, bar, failed)
                if params.wrong_hints:  # extra teacher contexts, from the same critic (journal, retries)
                    table = add_wrong_hints(
                        table, part_rows, params, templates[_teacher_template_name(params.mode)], pool,
                        lambda views, p: critique_rows(views, p, critic, templates, wrap, journal, None, failed), wrap)
            finally:
                if journal is not None:
                    journal.close()
            if failed:  # not final: keep the journal, leave the part for a rerun
                retry_later += failed
                unfinished.append(part)
                continue
            out.write(part, table)
            journal_path.unlink(missing_ok=True)
    if retry_later:
        rid, err = retry_later[0]
        raise CriticRetryLater(
            f"{len(retry_later)} row(s) in {len(unfinished)} part(s) of {out.folder} failed transiently "
            f"(e.g. rollout {rid!r}: {err}); those parts stay unfinished, answered rows are kept in "
            f"{out.resume}; rerun to ask only the failed rows again"
        )
    return out.complete()


def critique_metrics(critiques: pa.Table, verdicts: pa.Table, params: CritiqueParams,
                     rollouts: pa.Table | None = None, prompts: pa.Table | None = None) -> dict:
    """Coverage, critique length, failures by reason, leakage and suspected false negatives.

    ``leaks`` / ``leakage_share`` count feedback that contained the gold answer before masking (the
    ``leaks_answer`` column); with rollouts and prompts given, ``leakage_share_after_masking`` checks
    the stored text again (equal to ``leakage_share`` unless ``mask_leaked_answer`` is on).
    """
    gold_answers = None
    if rollouts is not None and prompts is not None:
        ans = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("answer").to_pylist()))
        gold_answers = [{"rollout_id": rid, "answer": ans.get(pid, "")} for rid, pid in
                        zip(rollouts.column("rollout_id").to_pylist(), rollouts.column("prompt_id").to_pylist())]
    rows = critiques.to_pylist()
    correct = {r["rollout_id"]: r["is_correct"] for r in verdicts.select(["rollout_id", "is_correct"]).to_pylist()}
    n = len(rows)
    texts = [r["feedback_text"] for r in rows if r["feedback_text"] is not None]
    n_fb = len(texts)
    skipped = sum(1 for r in rows if r["error"] == TRUNCATED_NOT_CRITIQUED)
    failures = Counter(r["error"] for r in rows if r["error"] is not None and r["error"] != TRUNCATED_NOT_CRITIQUED)
    n_incorrect = sum(1 for r in rows if not correct.get(r["rollout_id"], False))
    which = params.effective_which()
    eligible = sum(1 for r in rows if needs_feedback(params.mode, which, correct.get(r["rollout_id"], False)))
    leaks = sum(1 for r in rows if r["leaks_answer"] and r["feedback_text"] is not None)
    answers = {r["rollout_id"]: r["answer"] for r in gold_answers} if gold_answers is not None else None
    leaks_after = (sum(1 for r in rows if contains_answer(r["feedback_text"], answers.get(r["rollout_id"], "")))
                   if answers is not None else None)
    suspects = [r for r in rows if r["suspected_false_negative"]]
    content = content_metrics(rows, correct, rollouts, prompts)

    def share(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "mode": params.mode,
        "critic": params.critic if params.mode in ("critique", "critique_gold") else params.mode,
        "which": which,
        "rollouts": n,
        "incorrect_rollouts": n_incorrect,
        "incorrect_share": share(n_incorrect, n),
        "eligible_rollouts": eligible,
        "rollouts_with_feedback": n_fb,
        "coverage": coverage(n_fb, n),  # tcrlsd.signals: share of rollouts with feedback
        "coverage_of_eligible": share(n_fb, eligible),
        "mean_feedback_chars": share(sum(len(t) for t in texts), n_fb),
        "mean_feedback_words": share(sum(len(t.split()) for t in texts), n_fb),
        "failures": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        # permanent failures by name (transient ones never reach a finished part): the first 100 ids
        "failed_rollout_ids": sorted(r["rollout_id"] for r in rows
                                     if r["error"] is not None and r["error"] != TRUNCATED_NOT_CRITIQUED)[:100],
        # critique.skip_truncated: responses cut by the token limit that the critic was not asked about
        "skipped_truncated": skipped,
        "leaks": leaks,
        "leakage_share": share(leaks, n_fb),
        "leakage_share_after_masking": None if leaks_after is None else share(leaks_after, n_fb),
        "mask_leaked_answer": params.mask_leaked_answer,
        "suspected_false_negatives": len(suspects),
        "suspected_false_negative_share_of_incorrect": share(len(suspects), n_incorrect),
        "templates": sorted({r["template"] for r in rows if r["template"]}),
        "control": params.control,
        "reference_noise": params.reference_noise,
        # what controls did, by kind: rows whose critic column carries "|shuffled:..." / "|noise:KIND"
        "feedback_controls": dict(sorted(Counter(
            tag.split(":")[0] if tag.startswith("shuffled") else tag
            for r in rows if "|" in r["critic"] for tag in r["critic"].split("|", 1)[1].split(",")).items())),
        **content,
        **wrong_hint_metrics(critiques),
    }


def read_inputs(prompts_path, rollouts_path, verdicts_path) -> tuple[pa.Table, pa.Table, pa.Table]:
    """``(rollouts, verdicts, prompts)``, read and validated (errors name the file)."""
    return (read_artifact(rollouts_path, "rollouts"), read_artifact(verdicts_path, "verdicts"),
            read_artifact(prompts_path, "prompts"))
