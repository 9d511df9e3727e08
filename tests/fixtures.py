"""Tiny artifacts shared by the tests and the bench scripts: the prompt text, a synthetic prompts
table, the tiny random-weight policy, and an iteration folder written from hand-made rows.

One builder per artifact, so a schema change is made once (issue 21, item 8). The prompt template
is prepare's default (``tcrlsd.prepare.params.DEFAULT_PROMPT_TEMPLATE``, the params.yaml value),
never re-typed. Bench scripts import this module the way they import ``harness``:
``sys.path.insert(0, str(REPO / "tests"))``. It lives under tests/, not in the package: these are
test inputs, not a user feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tcrlsd.prepare.params import DEFAULT_PROMPT_TEMPLATE
from tcrlsd.prepare.stage import render_prompt
from tcrlsd.schemas import schema_for

# prepare's template without the problem: " Let's think step by step ... \boxed{}."
INSTRUCTION = DEFAULT_PROMPT_TEMPLATE.removeprefix("{problem}")
assert DEFAULT_PROMPT_TEMPLATE.startswith("{problem}"), "the fixtures assume the problem comes first"


def prompt_text(problem: str) -> str:
    """The policy prompt prepare writes for ``problem`` with the default template (no chat template)."""
    return render_prompt(problem, DEFAULT_PROMPT_TEMPLATE)


def synthetic_prompts(n_train: int, n_val: int = 0, seed: int = 7,
                      source: str | Callable[[int], str] = "synthetic") -> pa.Table:
    """A prompts table of ``n_train`` then ``n_val`` synthetic problems (``make_problems(n, seed)``),
    ids ``synthetic/<split>/<i>``, subject ``arithmetic``; ``source`` is a name or a function of i."""
    from tcrlsd.synthetic import make_problems

    rows = {f.name: [] for f in schema_for("prompts")}
    for i, p in enumerate(make_problems(n_train + n_val, seed=seed)):
        split = "train" if i < n_train else "val"
        rows["prompt_id"].append(f"synthetic/{split}/{i}")
        rows["split"].append(split)
        rows["problem"].append(p.problem)
        rows["prompt"].append(prompt_text(p.problem))
        rows["answer"].append(p.answer)
        rows["solution"].append(p.solution)
        rows["source"].append(source(i) if callable(source) else source)
        rows["level"].append(p.level)
        rows["subject"].append("arithmetic")
    return pa.Table.from_pydict(rows, schema=schema_for("prompts"))


def tiny_policy(folder: Path) -> Path:
    """A small random-weight Llama checkpoint whose tokenizer knows the synthetic task's text."""
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer
    from tcrlsd.synthetic import make_problems

    texts = [p.problem + "\n" + p.solution for p in make_problems(500, seed=123)]
    texts += [INSTRUCTION.strip(), "Feedback: the second step is wrong. Check the subtraction."]
    tok = train_tokenizer(texts, vocab_size=320)
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    return save_policy(build_tiny_llama(tok, cfg, seed=0), tok, folder)


def rollouts_table(rows: list[dict]) -> pa.Table:
    """A rollouts table of ``rows`` (dicts with at least prompt_id and response_token_ids), typed by the
    contract. Defaults: sample_idx = the row's order within its prompt, rollout_id
    ``<prompt_id>#<sample_idx>``, iteration 0, prompt_token_ids [1, 2], response_text "x", finish_reason
    "stop"; the optional sampler_logprobs column only when a row has it."""
    seen: dict[str, int] = {}
    full = []
    for r in rows:
        k = seen.get(r["prompt_id"], 0)
        seen[r["prompt_id"]] = k + 1
        row = {"sample_idx": k, "iteration": 0, "prompt_token_ids": [1, 2], "response_text": "x",
               "finish_reason": "stop", **r}
        full.append({"rollout_id": f"{row['prompt_id']}#{row['sample_idx']}", **row})
    schema = schema_for("rollouts")
    if not any("sampler_logprobs" in r for r in rows):
        schema = schema.remove(schema.get_field_index("sampler_logprobs"))
    return pa.Table.from_pylist(full, schema=schema)


def verdicts_table(rows: list[dict]) -> pa.Table:
    """A verdicts table of ``rows`` (dicts with at least rollout_id and reward), typed by the contract.
    Defaults: is_correct = reward > 0, reason correct/incorrect from it, extracted_answer none,
    verifier "test"."""
    full = [{"is_correct": r["reward"] > 0, "extracted_answer": None,
             "reason": "correct" if r["reward"] > 0 else "incorrect", "verifier": "test", **r} for r in rows]
    return pa.Table.from_pylist(full, schema=schema_for("verdicts"))


def critiques_table(rows: list[dict]) -> pa.Table:
    """A critiques table of ``rows`` (dicts with at least rollout_id), typed by the contract.
    Defaults: no feedback (mode, critic and template "none", no texts, no error, no flags)."""
    full = [{"mode": "none", "critic": "none", "feedback_text": None, "template": "none", "teacher_prompt": None,
             "error": None, "leaks_answer": False, "suspected_false_negative": False, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=schema_for("critiques"))


# ----------------------------------------------------------------------------- an iteration from rows


@dataclass
class Row:
    """One rollout of a hand-made iteration: its group, reward, per-token log-probs, feedback."""
    prompt_id: str
    reward: float
    student: list[float]
    teacher: list[float]
    feedback: bool = False
    wrong: list[list[float]] | None = None  # extra wrong-hint teacher log-probs (K' contexts), or none


def iteration_tables(rows: list[Row], iteration: int = 0) -> dict[str, pa.Table]:
    """rollouts, verdicts, critiques and scores of ``rows`` (rollout ids ``<prompt_id>#<k>``)."""
    rollouts = rollouts_table([{"prompt_id": r.prompt_id, "iteration": iteration,
                                "response_token_ids": list(range(len(r.student)))} for r in rows])
    ids = rollouts.column("rollout_id").to_pylist()
    n = len(rows)
    f32 = pa.list_(pa.float32())
    tables = {
        "rollouts": rollouts,
        "verdicts": verdicts_table([{"rollout_id": i, "reward": r.reward} for i, r in zip(ids, rows)]),
        "critiques": critiques_table([{"rollout_id": i, "mode": "critique", "critic": "test", "template": "v1",
                                       "feedback_text": "check step 2" if r.feedback else None,
                                       "teacher_prompt": "..." if r.feedback else None} for i, r in zip(ids, rows)]),
        "scores": pa.table({
            "rollout_id": ids, "student_logprobs": pa.array([r.student for r in rows], f32),
            "teacher_logprobs": pa.array([r.teacher for r in rows], f32), "teacher_checkpoint": ["policy"] * n,
        }),
    }
    if any(r.wrong is not None for r in rows):  # scores with extra_teacher_logprobs / _kinds (K' on every row)
        k = len(rows[0].wrong)
        tables["scores"] = (tables["scores"]
                            .append_column("extra_teacher_logprobs", pa.array([r.wrong for r in rows],
                                                                              pa.list_(pa.list_(pa.float32()))))
                            .append_column("extra_teacher_kinds", pa.array([["wrong_hint"] * k] * n,
                                                                           pa.list_(pa.string()))))
    return tables


def write_iteration(folder: Path, rows: list[Row], iteration: int = 0, critiques: bool = True,
                    scores_parts: int = 0) -> Path:
    """An iteration folder of ``rows`` through the artifacts module (scores as shards when scores_parts > 0)."""
    from tcrlsd.artifacts import write_artifact
    from tcrlsd.resume import ShardedOutput

    folder.mkdir(parents=True, exist_ok=True)
    for name, t in iteration_tables(rows, iteration).items():
        if name == "critiques" and not critiques:
            continue
        if name == "scores" and scores_parts:
            out = ShardedOutput(folder / "scores", "scores", scores_parts, {"test": 1})
            step = math.ceil(t.num_rows / scores_parts)
            for p in range(scores_parts):
                out.write(p, t.slice(p * step, step))
            continue
        write_artifact(t, folder / f"{name}.parquet", name)
    return folder
