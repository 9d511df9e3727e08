"""The bad-input corpus (tests/badinputs.py) through every entry point that reads each input.

Expected per (case, entry point): ``error`` -- a non-zero exit, one ``error:`` message naming the
damaged file (or the params key / checkpoint folder) and no traceback, and every earlier artifact
untouched (the output location holds a finished output from before, which must keep its bytes;
the input folder keeps its bytes); ``row`` -- the run completes and the bad row carries a recorded
reason while the good rows keep their results; ``ok`` -- the damage is harmless to that reader
(an extra column, a column it does not read).

The outcomes are written to docs/reliability-inputs.md: the test fails when the file is not what
this run produced (refresh it with ``TCRLSD_WRITE_DOCS=1``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from badinputs import FILES, Case, corpus
from entrypoints import READERS, available, run_entry
from harness import OUTPUTS, REPO
from tcrlsd.artifacts import read_artifact

DOC = REPO / "docs" / "reliability-inputs.md"
PARAMS_READERS = {"params-advantages-estimator": ["advantages", "recompute"], "params-critique-mode": ["critique"]}

# Damage seen as a disagreement between two files (the message may name the other one)
CROSS_FILE = {"rollouts-orphan-prompt"}

# Exceptions to "error": (case id, entry point) -> expected outcome
EXPECT = {
    **{(f"{a}-extra-column", e): "ok" for a in READERS for e in READERS[a]},
    # a column this reader never reads
    ("critiques-missing-teacher_prompt", "advantages"): "ok",
    ("critiques-missing-teacher_prompt", "recompute"): "ok",
    **{(c, e): "ok" for c in ("rollouts-invalid-utf8", "rollouts-lone-surrogate")
       for e in ("advantages", "recompute", "compare")},
    # legitimate but odd rows: graded / scored per row
    ("rollouts-empty-response", "verify"): "row",
    ("rollouts-empty-response", "critique"): "ok",
    ("rollouts-empty-response", "score"): "row",
    ("rollouts-10mb-response", "verify"): "row",
    **{("rollouts-10mb-response", e): "ok" for e in ("critique", "score", "advantages", "recompute", "compare")},
    ("grade-jsonl-mixed", "grade"): "row",
    # `tcrlsd inspect` is a viewer: it shows what a folder holds without validating it (the stages
    # do), so row-level damage is displayed, not refused; unreadable files are still errors
    **{(c, "inspect"): "ok" for c in (
        "rollouts-duplicate-id", "verdicts-duplicate-id", "critiques-duplicate-id", "scores-duplicate-id",
        "rollouts-dtype-response_token_ids", "verdicts-dtype-reward", "scores-nan", "scores-inf",
        "scores-length-mismatch", "rollouts-empty-response", "rollouts-invalid-utf8", "rollouts-lone-surrogate",
        "rollouts-10mb-response", "rollouts-orphan-prompt")},
}


@pytest.fixture
def good(reliability_iteration):
    return reliability_iteration


def _files(folder: Path) -> dict[str, bytes]:
    return {str(q.relative_to(folder)): q.read_bytes() for q in sorted(folder.rglob("*")) if q.is_file()}


def _seed_output(entry: str, good: Path, out_dir: Path) -> None:
    """Put the finished output of an earlier run where ``entry`` writes (it must survive a failure)."""
    if entry not in OUTPUTS:
        return
    src = good / OUTPUTS[entry][1]
    if src.is_dir():
        shutil.copytree(src, out_dir / src.name)
        shutil.copytree(good / f".{src.name}.resume", out_dir / f".{src.name}.resume",
                        ignore=shutil.ignore_patterns("workers", "lock"))
    else:
        shutil.copy2(src, out_dir / src.name)


def _check_row(case: Case, entry: str, out_dir: Path, message: str) -> str:
    """The per-row outcome of a ``row`` case; returns its summary for the table."""
    if entry == "grade":
        lines = [json.loads(x) for x in message.splitlines() if x.startswith("{")]
        errors = {x["line"]: x["error"] for x in lines if "error" in x}
        graded = {x["line"]: x["reason"] for x in lines if "error" not in x}
        assert graded.get(1) == "correct" and graded.get(7) == "incorrect", lines  # good lines keep their results
        assert set(errors) >= {2, 3, 4, 8}, errors
        return f"row: lines 2,3,4,8 get an error each ({errors[8]}); the good lines are graded"
    if entry == "verify":
        v = read_artifact(out_dir / "verdicts.parquet", "verdicts").to_pylist()
        bad = [r for r in v if r["rollout_id"].endswith("5#1")][0]
        assert len(v) == 16
        return f"row: graded, reason `{bad['reason']}`; the other 15 rows graded"
    if entry == "score":
        s = read_artifact(out_dir / "scores", "scores").to_pylist()
        bad = [r for r in s if r["rollout_id"].endswith("5#1")][0]
        assert bad["student_logprobs"] == [] and len(s) == 16 and all(r["student_logprobs"] for r in s if r is not bad)
        return "row: empty log-prob lists for that row; the other 15 rows scored"
    raise AssertionError(f"no row check for {entry}")


def _summary(text: str, folder: Path) -> str:
    line = next((x for x in text.splitlines() if "error:" in x), text.strip().splitlines()[-1] if text.strip() else "")
    line = line.replace(str(folder), "<iter>").replace(str(REPO), "<repo>")
    line = re.sub(r"/tmp/\S+?/(?=\S)", "<tmp>/", line)
    return (line[:220] + " ...") if len(line) > 220 else line


def test_corpus_through_every_entry_point(good, tmp_path):
    rows, problems = [], []
    for case in corpus():
        entries = READERS[case.artifact] or PARAMS_READERS[case.id]
        folder = tmp_path / case.id
        shutil.copytree(good, folder, ignore=shutil.ignore_patterns("metrics", ".*"))
        damaged = case.build(folder)
        before = _files(folder)
        for entry in entries:
            if not available(entry):
                rows.append((case.what, entry, "not run: the command does not exist yet (hook in tests/entrypoints.py)"))
                continue
            expect = EXPECT.get((case.id, entry), "error")
            out_dir = tmp_path / "out" / case.id / entry
            out_dir.mkdir(parents=True)
            if expect == "error" and case.artifact != "policy":
                _seed_output(entry, good, out_dir)
            seeded = _files(out_dir)
            rc, message = run_entry(entry, folder, out_dir)
            where = f"{case.id} via {entry}"
            try:
                assert "Traceback" not in message, f"{where}: a traceback instead of an error message:\n{message}"
                assert _files(folder) == before, f"{where}: an input file was changed"
                if expect == "error":
                    assert rc not in (0, None), f"{where}: exit status {rc}, expected an error"
                    assert "error:" in message, f"{where}: no `error:` message: {message!r}"
                    names = ([case.id.split("-")[-1]] if case.artifact == "params"  # the params key
                             else [str(damaged)] + ([str(folder / FILES[case.artifact])] if case.artifact in FILES else []))
                    if case.id in CROSS_FILE:  # rows that disagree across files: either file may be named
                        names += [str(folder / f) for f in FILES.values()]
                    assert any(re.search(re.escape(n) + r"(?![\w.-])", message) for n in names), \
                        f"{where}: the message does not name {' or '.join(names)}: {message!r}"
                    if case.artifact == "policy":  # (no earlier output: the folder may be prepared)
                        assert not list(out_dir.rglob("part-*")), f"{where}: parts written from a bad checkpoint"
                    else:
                        assert _files(out_dir) == seeded, f"{where}: the earlier output was changed"
                    rows.append((case.what, entry, "error: " + _summary(message, folder)))
                else:
                    assert rc == (1 if entry == "grade" else 0), f"{where}: exit status {rc}: {message[-2000:]}"
                    if expect == "row":
                        rows.append((case.what, entry, _check_row(case, entry, out_dir, message)))
                    else:
                        rows.append((case.what, entry, "ok: the run completes"))
            except AssertionError as exc:
                problems.append(str(exc))
    assert not problems, "\n\n".join(problems)
    _write_or_check_doc(rows)


def _write_or_check_doc(rows) -> None:
    lines = ["# Bad inputs: what each entry point does with them",
             "",
             "Produced by `tests/test_badinputs.py` (`TCRLSD_WRITE_DOCS=1 pytest tests/test_badinputs.py` rewrites",
             "it; the test fails when this file is not what the code does). Each input is one damage to a copy of",
             "a good iteration folder (`tests/badinputs.py`). `error`: non-zero exit, this message (naming the",
             "file), no traceback, the earlier output and the inputs keep their bytes. `row`: the run completes",
             "and the bad row carries a recorded reason. `ok`: harmless to that reader. `<iter>` is the folder.",
             "",
             "| input | entry point | outcome |",
             "|---|---|---|"]
    for what, entry, outcome in rows:
        cell = outcome.replace("|", "\\|")
        lines.append(f"| {what} | `{entry}` | {cell} |")
    text = "\n".join(lines) + "\n"
    if os.environ.get("TCRLSD_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, \
        f"{DOC} is not what the code does now; rerun with TCRLSD_WRITE_DOCS=1 to refresh it"
