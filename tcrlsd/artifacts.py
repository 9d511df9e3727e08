"""Reading and writing artifacts: atomic files, sharded folders, resumable stages.

An artifact ``NAME`` of an iteration folder is either ``NAME.parquet`` or a folder ``NAME/`` holding
``part-NNNNN.parquet`` shards (plus a ``_manifest.json``); readers accept both.

Nothing is ever written in place: a file goes to a temporary name in the same folder and is renamed
when complete, so a killed stage leaves either the old file or the new one, never half of one.

Resumable, sharded stages use :class:`ShardedOutput`: the work is cut into ``num_parts`` parts by a
stable plan; each finished part is written (atomically) as soon as it is done; a rerun skips the
parts already on disk, provided the manifest's fingerprint (inputs + params) still matches.
Several workers share one stage by taking ``--shard i/N``: worker i does the parts p with
p % N == i.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tcrlsd.schemas import SchemaError, validate

__all__ = [
    "artifact_path",
    "read_artifact",
    "artifact_files",
    "read_table",
    "write_table",
    "write_artifact",
    "write_json",
    "write_text",
    "ShardSpec",
    "ShardedOutput",
    "fingerprint_files",
    "content_digest",
    "checkpoint_digest",
    "AtomicParquetWriter",
]

_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
MANIFEST = "_manifest.json"
ROW_GROUP_ROWS = 1024


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_table(table: pa.Table, path: str | os.PathLike, name: str | None = None) -> Path:
    """Validate (when ``name`` is given) and write ``table`` to ``path`` atomically.

    The write options are fixed so that the same table gives the same bytes.
    """
    path = Path(path)
    if name is not None:
        table = validate(table, name, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        # Small row groups let readers stream token-level artifacts with flat memory.
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False,
                       row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class AtomicParquetWriter:
    """Stream tables into one Parquet file at a temporary name beside ``path``; renamed on success.

    A context manager: on an exception the temporary file is removed and ``path`` is untouched.
    Same write options as :func:`write_table` (same tables -> same bytes), except row groups are
    the written tables themselves.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, _tmp_name(path)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd", use_dictionary=False,
                                       write_statistics=False)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically, keys sorted, so that the same metrics give the same bytes."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", path)


def read_table(path: str | os.PathLike, name: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (validated against ``name`` when given); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file" + (f" (expected the {name} artifact)" if name else ""))
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file: {exc}") from None
    if name is not None and columns is None:
        table = validate(table, name, source=str(path))
    return table


def artifact_path(path: str | os.PathLike) -> Path:
    """Resolve an artifact given as ``X.parquet`` or ``X/`` or bare ``X`` (either existing)."""
    p = Path(path)
    if p.exists():
        return p
    if p.suffix != ".parquet" and p.with_suffix(".parquet").exists():
        return p.with_suffix(".parquet")
    if p.suffix == ".parquet" and p.with_suffix("").is_dir():
        return p.with_suffix("")
    raise FileNotFoundError(f"{p}: no such artifact (looked for {p} and its .parquet / folder form)")


def _parts(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if _PART_RE.match(q.name))


def artifact_files(path: str | os.PathLike, name: str) -> list[Path]:
    """The Parquet file(s) of artifact ``name`` at ``path``: the file itself or the folder's parts.

    A folder with a manifest must be complete (all its parts present); an incomplete one is an
    error that says how many parts are missing, so a half-finished stage is never read as whole.
    """
    p = artifact_path(path)
    if p.is_file():
        return [p]
    parts = _parts(p)
    man = p / MANIFEST
    if man.exists():
        meta = json.loads(man.read_text())
        want = meta.get("num_parts")
        have = {int(_PART_RE.match(q.name).group(1)) for q in parts}
        if want is not None and have != set(range(want)):
            missing = sorted(set(range(want)) - have)
            raise SchemaError(
                f"{p}: incomplete {name} artifact: {len(missing)} of {want} part(s) missing "
                f"(e.g. part-{missing[0]:05d}.parquet); rerun the stage to finish it"
            )
    if not parts:
        raise SchemaError(f"{p}: folder holds no part-NNNNN.parquet shards of {name}")
    return parts


def read_artifact(path: str | os.PathLike, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read artifact ``name`` from a file or a folder of shards, validated and concatenated."""
    files = artifact_files(path, name)
    if len(files) == 1 and files[0] == artifact_path(path):
        return read_table(files[0], name, columns)
    tables = [read_table(q, name if columns is None else None, columns) for q in files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if columns is None:
        table = validate(table, name, source=str(artifact_path(path)))
    return table


def write_artifact(table: pa.Table, path: str | os.PathLike, name: str) -> Path:
    """Write a whole artifact as one file (``X.parquet``), replacing a folder form if present."""
    path = Path(path)
    out = write_table(table, path, name)
    folder = path.with_suffix("")
    if folder.is_dir() and folder != path:
        shutil.rmtree(folder)
    return out


def fingerprint_files(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Cheap identity of input files (size and mtime_ns) for a manifest; folders are walked."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            st = q.stat()
            out[str(q)] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def content_digest(paths: Sequence[Path]) -> str:
    """sha256 over the names and bytes of ``paths``, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_digest(path: str | os.PathLike) -> str:
    """sha256 over the bytes of an artifact file, or of every file (sorted) in a folder.

    Content, not mtimes (unlike :func:`fingerprint_files`): a DVC checkout that restores the same
    bytes keeps finished parts valid. Hidden files (temporaries) are skipped.
    """
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) if p.is_dir() else [p]
    return content_digest(files)


@dataclass(frozen=True)
class ShardSpec:
    """``--shard i/N``: this worker is number ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "ShardSpec":
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
            raise ValueError(f"--shard must look like i/N with 0 <= i < N, got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, part: int) -> bool:
        return part % self.count == self.index


class ShardedOutput:
    """A folder artifact written part by part, resumable across kills and shareable by workers.

    ``fingerprint`` is any JSON-able description of what determines the output (params, input
    file identities). If the folder holds a manifest with another fingerprint, its parts are stale
    and are removed; otherwise finished parts are kept and :meth:`done` reports them.
    """

    def __init__(self, folder: str | os.PathLike, name: str, num_parts: int, fingerprint: dict):
        self.folder = Path(folder)
        self.name = name
        self.num_parts = int(num_parts)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if self.folder.is_file():
            raise SchemaError(f"{self.folder}: expected a folder for the sharded {name} artifact, found a file")
        single = self.folder.with_suffix(".parquet")
        if single.exists() and single != self.folder:
            single.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        man = self.folder / MANIFEST
        meta = {"artifact": name, "num_parts": self.num_parts, "fingerprint": self.fingerprint}
        if man.exists():
            try:
                old = json.loads(man.read_text())
            except json.JSONDecodeError:
                old = {}
            if old != meta:
                for q in self.folder.iterdir():
                    if q.is_file():
                        q.unlink()
        if not man.exists() or json.loads(man.read_text()) != meta:
            write_json(meta, man)
        for q in self.folder.glob(".*.tmp"):  # leftovers of a killed writer
            q.unlink(missing_ok=True)

    def part_path(self, part: int) -> Path:
        return self.folder / f"part-{part:05d}.parquet"

    def done(self, part: int) -> bool:
        return self.part_path(part).exists()

    def pending(self, shard: ShardSpec = ShardSpec()) -> list[int]:
        return [p for p in range(self.num_parts) if shard.owns(p) and not self.done(p)]

    def write(self, part: int, table: pa.Table) -> Path:
        return write_table(table, self.part_path(part), self.name)

    def complete(self) -> bool:
        return all(self.done(p) for p in range(self.num_parts))


def split_evenly(n_items: int, num_parts: int) -> list[range]:
    """Cut ``range(n_items)`` into ``num_parts`` contiguous, near-equal ranges (stable plan)."""
    num_parts = max(1, min(num_parts, max(n_items, 1)))
    base, extra = divmod(n_items, num_parts)
    out, start = [], 0
    for i in range(num_parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out
