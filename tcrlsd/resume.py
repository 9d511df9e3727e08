"""Resumable stages: what identifies a finished part, and the sharded folder that holds the parts.

The one fingerprint scheme of every resumable stage (:func:`stage_fingerprint`): the sha256 of the
source of the modules that compute a part (code identity), content digests of the inputs (not their
paths or mtimes), and the settings that change the output (not threads, devices, batch sizes).
:class:`ShardedOutput` keeps it in ``.NAME.resume/fingerprint.json`` beside the output folder --
never inside the tracked output, whose bytes must depend on the parts alone -- together with the
per-part journals, the digest cache and one lock file per live worker. A worker whose fingerprint
differs from the finished parts' raises :class:`StaleOutputError` and deletes nothing, unless it
runs with ``restart`` and no other worker is alive; workers tell live from dead by a lock each holds
for its lifetime.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import secrets
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from tcrlsd.artifacts import (
    MANIFEST,
    STAGE_ERRORS,
    ShardSpec,
    StaleOutputError,
    host_tag,
    finished_parts,
    remove_stale_temps,
    write_json,
    write_table,
    writer_id,
)
from tcrlsd.schemas import SchemaError

__all__ = [
    "STAGE_ERRORS",
    "StaleOutputError",
    "content_digest",
    "code_digest",
    "output_settings",
    "stage_fingerprint",
    "resume_dir",
    "StaleOutputError",
    "ShardSpec",
    "ShardedOutput",
]


# --------------------------------------------------------------------------------------------------
# Identity: content digests, code digests, the settings that matter


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` whose relative path has no hidden component (temporaries, resume state)."""
    return sorted(q for q in folder.rglob("*")
                  if q.is_file() and not any(s.startswith(".") for s in q.relative_to(folder).parts))


def _sha256_file(path: Path, cache: dict | None) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if cache is not None:
        cache[key] = h.hexdigest()
    return h.hexdigest()


_DIGEST_MEMO: dict[str, str] = {}  # per process: a file whose inode/size/mtime/ctime are unchanged


def content_digest(path: str | os.PathLike, cache: dict | None = None) -> str:
    """sha256 of a file's bytes, or of a folder (every visible file's relative path and bytes).

    Content, not paths or mtimes: ``data/x`` and ``/abs/data/x``, or a DVC checkout restoring the
    same bytes, give the same digest. Hidden names (temporaries, ``.NAME.resume``) are skipped.
    ``cache`` maps a file's (path, inode, size, mtime, ctime) to its digest (see :class:`ShardedOutput`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    memo = _DIGEST_MEMO if cache is None else cache
    if p.is_file():
        return _sha256_file(p, memo)
    h = hashlib.sha256(b"folder\0")
    for q in _visible_files(p):
        h.update(q.relative_to(p).as_posix().encode() + b"\0" + _sha256_file(q, memo).encode() + b"\n")
    return h.hexdigest()


def code_digest(modules: Sequence[str]) -> dict[str, str]:
    """``{module: sha256 of its source}``; a package counts all its ``.py`` files.

    The identity of the code that computes a part: a fix to any listed module makes the finished
    parts of the old code stale.
    """
    out = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"code_digest: no module named {name!r}")
        if spec.submodule_search_locations:
            files = sorted((Path(loc), q) for loc in spec.submodule_search_locations
                           for q in Path(loc).rglob("*.py") if "__pycache__" not in q.parts)
        else:
            files = [(Path(spec.origin).parent, Path(spec.origin))]
        h = hashlib.sha256()
        for root, q in files:
            h.update(q.relative_to(root).as_posix().encode() + b"\0" + q.read_bytes() + b"\0")
        out[name] = h.hexdigest()
    return out


def output_settings(params, ignore: Iterable[str] = ()) -> dict:
    """The fields of a params dataclass that change a stage's output: all but ``ignore``.

    ``ignore`` names performance/placement settings (threads, device, batch sizes, addresses),
    dotted for a nested params dataclass (``engine.device``); naming a field that does not exist is
    an error, so a renamed field cannot slip in unnoticed.
    """
    values = dataclasses.asdict(params)
    for key in ignore:
        *outer, last = key.split(".")
        where = values
        for part in outer:
            where = where.get(part) if isinstance(where, dict) else None
        if not isinstance(where, dict) or last not in where:
            raise KeyError(f"{type(params).__name__} has no field {key!r} (listed as not changing the output)")
        del where[last]
    return values


def stage_fingerprint(*, code: Sequence[str], settings: Mapping, inputs: Mapping[str, str | os.PathLike | None] = {},
                      cache_dir: str | os.PathLike | None = None, **extra) -> dict:
    """The one fingerprint scheme of resumable stages.

    ``code``: the modules that compute a part (:func:`code_digest`); ``settings``: what changes the
    output (:func:`output_settings`, resolved values such as the real dtype); ``inputs``: label ->
    path, by :func:`content_digest` (None = absent input); ``extra``: anything else JSON-able
    (template versions, iteration number). ``cache_dir`` (the output's :func:`resume_dir`) keeps
    ``digests.json`` so that unchanged large inputs (checkpoints) are not hashed again on a rerun.
    """
    cache = _load_cache(cache_dir)
    before = dict(cache)
    out = {
        "code": code_digest(code),
        "settings": dict(settings),
        "inputs": {k: (None if v is None else content_digest(v, cache)) for k, v in sorted(inputs.items())},
        **extra,
    }
    if cache_dir is not None and cache != before:
        live = {k: v for k, v in cache.items() if Path(k.split("|", 1)[0]).exists()}
        try:
            write_json(live, Path(cache_dir) / "digests.json")
        except OSError:
            pass  # a cache that cannot be saved costs time, not correctness
    return out


def _load_cache(cache_dir) -> dict:
    if cache_dir is None:
        return _DIGEST_MEMO
    try:
        data = json.loads((Path(cache_dir) / "digests.json").read_text())
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".") or "(everything)"]


# --------------------------------------------------------------------------------------------------
# Sharded, resumable outputs


def resume_dir(folder: str | os.PathLike) -> Path:
    """``.NAME.resume/`` beside the output folder ``NAME``: fingerprint, journals, digest cache, workers."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.resume"


def _release(fd: int, path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


class ShardedOutput:
    """A folder artifact written part by part, resumable across kills and shareable by workers.

    ``fingerprint`` is what determines the output (build it with :func:`stage_fingerprint`). The
    first worker records it in ``.NAME.resume/fingerprint.json``; a later worker with the same one
    resumes, one with another raises :class:`StaleOutputError` (nothing deleted) -- unless
    ``restart`` is set and no other live worker is writing the folder, in which case the old parts
    (and their journals) are deleted first. Parts found without any recorded fingerprint are of
    unknown origin and treated the same way.
    """

    def __init__(self, folder: str | os.PathLike, name: str, num_parts: int, fingerprint: dict,
                 restart: bool = False):
        self.folder = Path(folder)
        self.name = name
        self.num_parts = int(num_parts)
        self.fingerprint = json.loads(_canonical(fingerprint))
        self.record = {"artifact": name, "num_parts": self.num_parts, "fingerprint": self.fingerprint}
        self.digest = hashlib.sha256(_canonical(self.record).encode()).hexdigest()
        if self.folder.is_file():
            raise SchemaError(f"{self.folder}: expected a folder for the sharded {name} artifact, found a file")
        self.resume = resume_dir(self.folder)
        (self.resume / "workers").mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            others = self._live_workers()
            self._register()
            self._check(others, restart)
            single = self.folder.with_suffix(".parquet")
            if single.exists() and single != self.folder:
                single.unlink()  # the one-file form of the same artifact: replaced by this folder
            manifest = {"artifact": name, "num_parts": self.num_parts}
            man = self.folder / MANIFEST
            if not man.exists() or man.read_text() != json.dumps(manifest, indent=2, sort_keys=True) + "\n":
                write_json(manifest, man)
        remove_stale_temps(self.folder)

    # ---- workers and the init lock

    @contextmanager
    def _locked(self):
        fd = os.open(self.resume / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _register(self) -> None:
        path = self.resume / "workers" / f"{writer_id()}-{secrets.token_hex(2)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, self.digest.encode())
        self._worker = path
        self._finalizer = weakref.finalize(self, _release, fd, path)

    def close(self) -> None:
        """Unregister this worker (also done when the object is collected or the process exits)."""
        self._finalizer()

    def _live_workers(self) -> dict[str, str]:
        """``{worker file: fingerprint digest}`` of other processes writing this folder; dead ones removed."""
        live = {}
        me = f"{host_tag()}-{os.getpid()}-"
        for q in sorted((self.resume / "workers").iterdir()):
            if q.name.startswith(me):
                continue  # this process
            try:
                fd = os.open(q, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live[q.name] = q.read_text()
                os.close(fd)
                continue
            q.unlink(missing_ok=True)  # its process is gone (its lock went with it)
            os.close(fd)
        return live

    def _check(self, others: dict[str, str], restart: bool) -> None:
        fp_file = self.resume / "fingerprint.json"
        parts = finished_parts(self.folder)
        try:
            old = json.loads(fp_file.read_text()) if fp_file.exists() else None
        except ValueError:
            old = None
        disagree = [w for w, d in others.items() if d != self.digest]
        if disagree:
            raise StaleOutputError(
                f"{self.folder}: another live worker ({disagree[0]}) is writing this {self.name} artifact with "
                "other code, inputs or settings; nothing was deleted. Give both workers the same params and "
                "inputs, or wait for it to finish."
            )
        if old == self.record:
            return
        what = ("no recorded fingerprint (unknown origin)" if old is None
                else "other " + ", ".join(d.removeprefix("fingerprint.") for d in _differences(old, self.record)))
        if not parts:
            self._take_over(fp_file)  # no part was made with the old one: only its journals go
            return
        if not restart:
            raise StaleOutputError(
                f"{self.folder}: its {len(parts)} finished part(s) were made with {what}; nothing was deleted. "
                f"To start over, rerun with --restart (deletes them once no other worker is running) or "
                f"delete {self.folder} and {self.resume}."
            )
        if others:
            raise StaleOutputError(f"{self.folder}: --restart refused: other workers are running ({', '.join(others)})")
        for q in parts:
            q.unlink()
        self._take_over(fp_file)

    def _take_over(self, fp_file: Path) -> None:
        """Record this fingerprint; progress journals of another (or of none) are not ours to reuse."""
        for q in self.resume.glob("journal-*"):
            q.unlink()
        write_json(self.record, fp_file)

    # ---- parts

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

    def journal_path(self, part: int) -> Path:
        """Where a stage keeps part ``part``'s per-row progress (outside the tracked output)."""
        return self.resume / f"journal-{part:05d}.jsonl"
