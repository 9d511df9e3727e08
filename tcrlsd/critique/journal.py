"""The per-part journal of answered rows (model critics), fsync'd line by line."""

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

    def get(self, rollout_id: str, prompt_sha: str) -> str | None:
        rec = self.answers.get(rollout_id)
        if rec and rec.get("prompt_sha") == prompt_sha and isinstance(rec.get("feedback_text"), str):
            return rec["feedback_text"]
        return None

    def add(self, rollout_id: str, prompt_sha: str, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        line = json.dumps({"rollout_id": rollout_id, "prompt_sha": prompt_sha, "feedback_text": text},
                          ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
