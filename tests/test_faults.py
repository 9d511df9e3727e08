"""Faults in a full iteration: the disk fills up during a write (a file-size limit on the stage's
process), a grader worker dies mid-row, the critic server fails part-way through. Each faulty run
ends with a clear error or finishes by itself; the rerun completes; at the end every artifact has
the bytes of a fault-free run, nothing half-written is kept, and the critic's answered rows were
not asked again.

The outcomes are written to docs/reliability-faults.md (refresh with ``TCRLSD_WRITE_DOCS=1``).
"""

from __future__ import annotations

import os
import re
import threading

import pytest

from critic_server import CriticServer
from harness import (
    OUTPUTS,
    REPO,
    STAGES,
    build_iteration,
    check_complete_files,
    run_stage,
    run_with_file_limit,
    snapshot,
    stage_argv,
    temporaries,
    write_params,
)

DOC = REPO / "docs" / "reliability-faults.md"
FULL_DISK_BYTES = 1500  # room for the resume fingerprint, not for a Parquet part (parts here: 1.6-2.5 KB)


class Critic:
    """The HTTP critic: answers every request, or only the first ``budget`` ones and then 500s."""

    def __init__(self):
        self.budget = None
        self.answered = 0
        self.lock = threading.Lock()

    def __call__(self, tag, attempt):
        with self.lock:
            if self.budget is not None and self.answered >= self.budget:
                return ("status", 500)
            self.answered += 1
            return ("ok",)


def _norm(text: str, d) -> str:
    line = next((x for x in text.splitlines() if "error:" in x or "unfinished:" in x), "").strip()
    line = line.replace(str(d), "<iter>")
    return re.sub(r"'[0-9a-f]{8}-\d+-[0-9a-f]{8}[^']*'", "'<tmp>'", line)


@pytest.fixture
def die_once(monkeypatch, tmp_path):
    """The first grading of a row kills its worker process (inherited by forked workers)."""
    from tcrlsd.verify import graders

    marker = tmp_path / "grader-died"
    real = dict(graders.GRADERS)

    def dying(name):
        def grade(response, gold, limits):
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real[name](response, gold, limits)
            os._exit(9)  # the worker dies mid-row, once
        return grade

    for name in real:
        monkeypatch.setitem(graders.GRADERS, name, dying(name))
    return marker


def test_full_iteration_survives_faults(tiny_policy, tmp_path, die_once):
    critic = Critic()
    rows = []
    with CriticServer(critic) as server:
        params = write_params(tmp_path, critique={
            "mode": "critique", "critic": "openai", "critic_model": "m", "base_url": server.base_url,
            "api_key_env": "TCRLSD_TEST_NO_KEY", "max_concurrency": 1, "rows_per_part": 4, "max_attempts": 2,
            "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "abort_after_failures": 3, "request_timeout_s": 10.0},
            verify={"workers": 1, "start_method": "fork", "row_deadline_s": 20.0})
        os.close(os.open(die_once, os.O_WRONLY | os.O_CREAT))  # no fault in the reference run
        ref = build_iteration(tmp_path / "ref", tiny_policy, params)
        os.unlink(die_once)
        d = tmp_path / "run"
        d.mkdir()
        for stage in STAGES:
            argv = stage_argv(stage, d, d, tiny_policy, params)
            out = d / OUTPUTS[stage][1]
            name = OUTPUTS[stage][0]
            if stage == "verify":
                assert run_stage(stage, argv) == 0  # the dead worker's row is graded again on a new one
                assert die_once.exists()
                rows.append(("a grader worker dies mid-row (os._exit)", stage,
                              "the row is graded again on a fresh worker; the run completes"))
            elif stage == "critique":
                critic.budget, critic.answered = 6, 0  # answers 6 requests, then every request fails
                rc = run_stage(stage, argv)
                assert rc == 75
                check_complete_files(out, name)
                parts = sorted(q.name for q in out.glob("part-*"))
                assert parts == ["part-00000.parquet"], parts  # 4 answered rows: a finished part
                journal = d / ".critiques.resume" / "journal-00001.jsonl"
                assert len(journal.read_text().splitlines()) == 2  # 2 more answered rows kept
                asked = dict(server.counts)
                critic.budget, critic.answered = None, 0
                assert run_stage(stage, argv) == 0
                # each answered row was asked once: the rerun asks only the 16 - 6 others
                assert sum(server.counts.values()) - sum(asked.values()) == 10
                rows.append(("the critic server fails (HTTP 500) after 6 answers", stage,
                             "exit 75 (`unfinished`): finished part kept, 2 answered rows journaled; the rerun asks "
                             "only the 10 unanswered rows"))
            else:
                rc, err = run_with_file_limit(stage, argv, FULL_DISK_BYTES, tmp_path / f"{stage}.err")
                assert rc == 2 and "Traceback" not in err, err
                assert "could not be written" in err and "File too large" in err, err
                assert f"{OUTPUTS[stage][1]}" in err and ".resume" not in err, err  # the artifact's own write
                check_complete_files(out, name)
                assert not list(out.glob("part-*")) if out.is_dir() else not out.exists()
                assert not temporaries(d), temporaries(d)
                rows.append(("the disk fills up during the write (file-size limit)", stage,
                             f"exit 2: `{_norm(err, d)}`; no partial file kept"))
                assert run_stage(stage, argv) == 0
            assert snapshot(out) == snapshot(ref / OUTPUTS[stage][1]), f"{stage}: rerun differs from the fault-free run"
        assert not temporaries(d)
    _write_or_check_doc(rows)


def _write_or_check_doc(rows) -> None:
    lines = ["# Faults in a full iteration",
             "",
             "Produced by `tests/test_faults.py` (`TCRLSD_WRITE_DOCS=1 pytest tests/test_faults.py` rewrites it).",
             "One iteration (prepare → advantages, tiny random policy, HTTP critic) with one fault per stage;",
             "after each fault the stage is rerun, and every artifact ends byte-identical to a fault-free run.",
             "Kills (SIGKILL at seeded random points) and concurrent `--shard` workers: `tests/test_kill.py`.",
             "",
             "| fault | stage | outcome |",
             "|---|---|---|"]
    for fault, stage, outcome in rows:
        cell = outcome.replace("|", "\\|")
        lines.append(f"| {fault} | `{stage}` | {cell} |")
    text = "\n".join(lines) + "\n"
    if os.environ.get("TCRLSD_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, \
        f"{DOC} is not what the code does now; rerun with TCRLSD_WRITE_DOCS=1 to refresh it"
