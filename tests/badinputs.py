"""The bad-input corpus: each case writes one damaged input into a copy of a good iteration folder.

A case is ``(id, artifact, what, build)``: ``build(folder)`` damages ``artifact`` (``prompts``,
``rollouts``, ``verdicts``, ``critiques``, ``scores``, ``params``, ``policy``, or ``jsonl`` for
``tcrlsd grade --jsonl``) in ``folder`` in place. The folder's layout is tests/harness.py's
iteration (``prompts.parquet``, ``rollouts/``, ``verdicts.parquet``, ``critiques/``, ``scores/``,
``advantages.parquet``, ``params.yaml``, ``policy/``). test_badinputs.py runs every case through
every entry point that reads the damaged input and checks the outcome.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tcrlsd.artifacts import PARQUET_OPTIONS, artifact_files

# The file of each artifact that a case damages (a folder artifact: its first part).
FILES = {"prompts": "prompts.parquet", "rollouts": "rollouts", "verdicts": "verdicts.parquet",
         "critiques": "critiques", "scores": "scores"}


@dataclass(frozen=True)
class Case:
    id: str
    artifact: str
    what: str  # the row of the docs table: what is wrong with the input
    build: Callable[[Path], Path]  # damages the folder; returns the damaged file


def target(folder: Path, artifact: str) -> Path:
    return artifact_files(folder / FILES[artifact], artifact)[0]


def _rewrite(folder: Path, artifact: str, change: Callable[[pa.Table], pa.Table]) -> Path:
    path = target(folder, artifact)
    table = change(pq.read_table(path))
    pq.write_table(table, path, **PARQUET_OPTIONS)  # deliberately not validated: this is the damage
    return path


def _set(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding exactly these bytes (pyarrow would refuse to build it from str)."""
    offsets, pos = [0], 0
    for v in values:
        pos += len(v)
        offsets.append(pos)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]),
                                  pa.py_buffer(b"".join(values))])


def _text_column(table: pa.Table, name: str, bad: bytes) -> pa.Table:
    vals = [v.encode() for v in table.column(name).to_pylist()]
    vals[1] = vals[1][:3] + bad + vals[1][3:]
    return _set(table, name, _invalid_utf8(vals))


# ----------------------------------------------------------------------------- file-level damage


def truncated(artifact):
    def build(folder):
        path = target(folder, artifact)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
        return path
    return Case(f"{artifact}-truncated", artifact, f"{artifact}: Parquet file cut at 60 %", build)


def not_parquet(artifact):
    def build(folder):
        path = target(folder, artifact)
        path.write_text("prompt_id,answer\nnot,parquet\n")
        return path
    return Case(f"{artifact}-not-parquet", artifact, f"{artifact}: a CSV text under the Parquet name", build)


def missing_column(artifact, column):
    return Case(f"{artifact}-missing-{column}", artifact, f"{artifact}: required column `{column}` dropped",
                lambda folder: _rewrite(folder, artifact, lambda t: t.drop_columns([column])))


def extra_column(artifact):
    return Case(f"{artifact}-extra-column", artifact, f"{artifact}: an extra column (allowed, carried along)",
                lambda folder: _rewrite(folder, artifact,
                                        lambda t: t.append_column("zz_extra", pa.array(["x"] * t.num_rows))))


def wrong_dtype(artifact, column, array_of):
    return Case(f"{artifact}-dtype-{column}", artifact, f"{artifact}: `{column}` stored with the wrong type",
                lambda folder: _rewrite(folder, artifact, lambda t: _set(t, column, array_of(t))))


def duplicate_id(artifact):
    return Case(f"{artifact}-duplicate-id", artifact, f"{artifact}: the first row twice (duplicate id)",
                lambda folder: _rewrite(folder, artifact, lambda t: pa.concat_tables([t, t.slice(0, 1)])))


# ----------------------------------------------------------------------------- row-level damage


def _scores_value(value: float):
    def change(t):
        rows = t.column("teacher_logprobs").to_pylist()
        k = next(i for i, r in enumerate(rows) if r)
        rows[k] = [value] + rows[k][1:]
        return _set(t, "teacher_logprobs", pa.array(rows, t.schema.field("teacher_logprobs").type))
    return change


def _shorter_logprobs(t):
    rows = t.column("student_logprobs").to_pylist()
    k = next(i for i, r in enumerate(rows) if r)
    rows[k] = rows[k][:-1]
    return _set(t, "student_logprobs", pa.array(rows, t.schema.field("student_logprobs").type))


def _empty_response(t):
    ids = t.column("response_token_ids").to_pylist()
    ids[1] = []
    text = t.column("response_text").to_pylist()
    text[1] = ""
    t = _set(_set(t, "response_token_ids", pa.array(ids, pa.list_(pa.int32()))), "response_text",
             pa.array(text, pa.string()))
    if "sampler_logprobs" in t.column_names:  # one sampler log-prob per response id: none
        lp = t.column("sampler_logprobs").to_pylist()
        lp[1] = []
        t = _set(t, "sampler_logprobs", pa.array(lp, pa.list_(pa.float32())))
    return t


def _huge_response(t):
    text = t.column("response_text").to_pylist()
    text[1] = ("12 + 7 = 19\n" * 900_000)[: 10 * 2**20] + "\\boxed{19}"  # 10 MiB of text, a final answer
    return _set(t, "response_text", pa.array(text, pa.string()))


def _orphan_prompt(t):
    pids = t.column("prompt_id").to_pylist()
    rids = t.column("rollout_id").to_pylist()
    pids[1], rids[1] = "nowhere/0", "nowhere/0#0"
    return _set(_set(t, "prompt_id", pa.array(pids, pa.string())), "rollout_id", pa.array(rids, pa.string()))


# ----------------------------------------------------------------------------- params and models


def _params(section, key, value, what):
    def build(folder):
        path = folder / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params.setdefault(section, {})[key] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path
    return Case(f"params-{section}-{key}", "params", what, build)


def _missing_model(folder):
    shutil.rmtree(folder / "policy")
    return folder / "policy"


def _pickle_only(folder):
    pol = folder / "policy"
    for q in pol.glob("*.safetensors"):
        q.unlink()
    (pol / "pytorch_model.bin").write_bytes(b"\x80\x04pickled weights would run code on load")
    return pol


def _vocab_mismatch(folder):
    """The tokenizer of another model, with more tokens than the policy's embedding has rows."""
    from tcrlsd.policy import load_tokenizer, train_tokenizer
    from tcrlsd.synthetic import make_problems

    pol = folder / "policy"
    n = len(load_tokenizer(pol))
    texts = [p.problem + "\n" + p.solution for p in make_problems(300, seed=9)]
    bigger = train_tokenizer(texts + [f"word{i} " * 3 for i in range(2000)], vocab_size=n + 200)
    for q in pol.iterdir():
        if q.name.startswith(("tokenizer", "special_tokens")):
            q.unlink()
    bigger.save_pretrained(pol)
    return pol


# ----------------------------------------------------------------------------- grade --jsonl


def _jsonl(folder):
    path = folder / "grade.jsonl"
    lines = [
        json.dumps({"response": "so \\boxed{4}", "gold": "4"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"response": 5, "gold": "4"}),
        json.dumps({"response": "lone \ud800 surrogate \\boxed{4}", "gold": "4"}),
        json.dumps({"response": "x" * (10 * 2**20) + "\\boxed{4}", "gold": "4"}),
        json.dumps({"response": "\\boxed{5}", "gold": "4"}),
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"response": "bad \xff utf8 \\\\boxed{4}", "gold": "4"}\n'
    path.write_bytes(data)
    return path


def corpus() -> list[Case]:
    cases: list[Case] = []
    for art in ("prompts", "rollouts", "verdicts", "critiques", "scores"):
        cases += [truncated(art), not_parquet(art), extra_column(art), duplicate_id(art)]
    cases += [
        missing_column("prompts", "answer"),
        missing_column("rollouts", "response_token_ids"),
        missing_column("verdicts", "reward"),
        missing_column("critiques", "teacher_prompt"),
        missing_column("scores", "teacher_logprobs"),
        wrong_dtype("prompts", "level", lambda t: pa.array([str(v) for v in t.column("level").to_pylist()])),
        wrong_dtype("rollouts", "response_token_ids",
                    lambda t: pa.array([[str(x) for x in r] for r in t.column("response_token_ids").to_pylist()])),
        wrong_dtype("verdicts", "reward", lambda t: pa.array([str(v) for v in t.column("reward").to_pylist()])),
        wrong_dtype("scores", "student_logprobs",
                    lambda t: pa.array([[str(x) for x in r] for r in t.column("student_logprobs").to_pylist()])),
        Case("scores-nan", "scores", "scores: a NaN teacher log-prob",
             lambda f: _rewrite(f, "scores", _scores_value(float("nan")))),
        Case("scores-inf", "scores", "scores: a -inf teacher log-prob",
             lambda f: _rewrite(f, "scores", _scores_value(float("-inf")))),
        Case("scores-length-mismatch", "scores", "scores: a log-prob list one shorter than its response",
             lambda f: _rewrite(f, "scores", _shorter_logprobs)),
        Case("rollouts-empty-response", "rollouts", "rollouts: an empty response (no tokens, no text)",
             lambda f: _rewrite(f, "rollouts", _empty_response)),
        Case("rollouts-invalid-utf8", "rollouts", "rollouts: invalid UTF-8 bytes in response_text",
             lambda f: _rewrite(f, "rollouts", lambda t: _text_column(t, "response_text", b"\xff\xfe"))),
        Case("rollouts-lone-surrogate", "rollouts", "rollouts: a lone surrogate (WTF-8 bytes) in response_text",
             lambda f: _rewrite(f, "rollouts", lambda t: _text_column(t, "response_text", b"\xed\xa0\x80"))),
        Case("rollouts-10mb-response", "rollouts", "rollouts: a 10 MiB response_text",
             lambda f: _rewrite(f, "rollouts", _huge_response)),
        Case("rollouts-orphan-prompt", "rollouts", "rollouts: a rollout whose prompt_id is not in prompts",
             lambda f: _rewrite(f, "rollouts", _orphan_prompt)),
        _params("advantages", "estimator", "nope", "params: unknown advantages.estimator"),
        _params("critique", "mode", "nope", "params: unknown critique.mode"),
        Case("policy-missing", "policy", "policy: the checkpoint folder does not exist", _missing_model),
        Case("policy-pickle-only", "policy", "policy: pickle weights only (no safetensors)", _pickle_only),
        Case("policy-vocab-mismatch", "policy", "policy: a tokenizer with more tokens than the model's embedding",
             _vocab_mismatch),
        Case("grade-jsonl-mixed", "jsonl", "grade --jsonl: bad JSON, non-objects, wrong types, lone surrogate, "
             "10 MiB response, invalid UTF-8 line, beside good lines", _jsonl),
    ]
    return cases
