"""The per-part journal of answered rows (model critics), fsync'd line by line.

It lives in the output's resume folder (``.critiques.resume/journal-NNNNN.jsonl``), outside the
tracked artifact. A line holds a row's feedback, or the permanent error it failed with; transient
failures are not journaled, so a rerun asks those rows again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# One part


class Journal:
    """Append-only JSONL of answered rows of one part; every line fsync'd before it counts."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, dict] = {}
        if path.exists():
            raw = path.read_bytes()
            for line in raw.split(b"\n"):
                try:
                    rec = json.loads(line)
                except ValueError:  # a torn last line from a kill mid-write
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("rollout_id"), str):
                    self.answers[rec["rollout_id"]] = rec
            if raw and not raw.endswith(b"\n"):
                with open(path, "ab") as f:
                    f.write(b"\n")
        self._file = None

    def get(self, rollout_id: str, prompt_sha: str) -> tuple[str | None, str | None] | None:
        """``(feedback_text, error)`` of a final answer to this prompt (text, or a permanent error)."""
        rec = self.answers.get(rollout_id)
        if not rec or rec.get("prompt_sha") != prompt_sha:
            return None
        if isinstance(rec.get("feedback_text"), str):
            return rec["feedback_text"], None
        if isinstance(rec.get("error"), str):
            return None, rec["error"]
        return None

    def add(self, rollout_id: str, prompt_sha: str, text: str | None, error: str | None = None) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        line = json.dumps({"rollout_id": rollout_id, "prompt_sha": prompt_sha, "feedback_text": text,
                           **({"error": error} if text is None else {})}, ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
