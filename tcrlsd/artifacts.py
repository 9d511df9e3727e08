"""Reading and writing artifacts: atomic files, sharded folders, resumable stages.

An artifact ``NAME`` of an iteration folder is either ``NAME.parquet`` or a folder ``NAME/`` holding
``part-NNNNN.parquet`` shards plus ``_manifest.json`` (artifact name and part count only, so the
folder's bytes -- and its DVC hash -- depend on the parts alone); readers accept both.

Nothing is ever written in place. A file goes to a temporary name unique to its writer
(``.NAME.<host>-<pid>-<random>-<n>.tmp``, same folder, created with the permissions the umask
gives), is fsync'd, renamed over the final name, and the folder is fsync'd: a killed or crashed
writer leaves the old file or the new one, never half of one. Leftover temporary files are deleted
only when provably stale (their writer's process is gone).

Resumable, sharded stages (``ShardedOutput``, ``stage_fingerprint``: the one resume scheme) are in
:mod:`tcrlsd.resume`, built on the writers here.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tcrlsd.errors import InputError, TcrlsdError
from tcrlsd.schemas import SchemaError, validate

__all__ = [
    "artifact_path",
    "read_artifact",
    "artifact_files",
    "read_table",
    "check_utf8",
    "write_table",
    "write_artifact",
    "write_json",
    "write_text",
    "atomic_write",
    "atomic_dir",
    "AtomicParquetWriter",
    "remove_stale_temps",
    "writer_id",
    "StaleOutputError",
    "STAGE_ERRORS",
    "ShardSpec",
    "split_evenly",
]

_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
MANIFEST = "_manifest.json"
ROW_GROUP_ROWS = 1024
# Fixed write options: the same table gives the same bytes.
PARQUET_OPTIONS = dict(compression="zstd", use_dictionary=False, write_statistics=False)


class StaleOutputError(TcrlsdError, RuntimeError):
    """Finished parts on disk were made with another fingerprint (or a live worker disagrees)."""


# What a stage reports as ``<stage>: error: <message>`` with exit status 2 instead of a traceback
# (tcrlsd.stagecli): the project's own errors (bad params and inputs, resume conflicts: every
# message names the file, row, column or key) and files that are missing, unreadable or cannot be
# written (a full disk included). Not ValueError as such: a bug inside numpy or pyarrow keeps its
# traceback.
STAGE_ERRORS = (TcrlsdError, OSError)


# --------------------------------------------------------------------------------------------------
# Writers and their temporary files


_WRITER: dict = {"pid": None}
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})-\d+\.tmp$")


def host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def writer_id() -> str:
    """``<host>-<pid>-<random>`` of this process (a forked child gets its own)."""
    pid = os.getpid()
    if _WRITER["pid"] != pid:
        _WRITER.update(pid=pid, id=f"{host_tag()}-{pid}-{secrets.token_hex(4)}", count=itertools.count())
    return _WRITER["id"]


def _temp_path(path: Path) -> Path:
    wid = writer_id()
    return path.parent / f".{path.name}.{wid}-{next(_WRITER['count'])}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_is_stale(name: str) -> bool:
    """A temporary file is stale when its writer ran on this host and that process is gone."""
    m = _TMP_RE.match(name)
    if not m or m.group("host") != host_tag():
        return False  # another host's writer may be alive: never ours to delete
    pid = int(m.group("pid"))
    if pid == os.getpid():  # this process: stale unless it is one of our own open writes
        return f"{m.group('host')}-{pid}-{m.group('rand')}" != writer_id()
    return not _pid_alive(pid)


def remove_stale_temps(folder: str | os.PathLike, final_name: str | None = None) -> list[Path]:
    """Delete the provably stale temporary files in ``folder`` (of ``final_name`` only, when given)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for q in folder.iterdir():
        m = _TMP_RE.match(q.name)
        if m and (final_name is None or m.group("final") == final_name) and _temp_is_stale(q.name):
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                q.unlink(missing_ok=True)
            removed.append(q)
    return removed


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, only where /proc is missing
    os.umask(mask)
    return mask


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP) or not directory:  # some filesystems refuse dir fsync
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsync'd and renamed to ``path``.

    The temporary file is created (empty) with mode 0666 & ~umask, so the final file gets the
    permissions the user's umask gives. On any exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = _temp_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a file-size limit, a read-only folder: say which file
        tmp.unlink(missing_ok=True)
        if str(path) in str(exc):
            raise
        detail = exc.strerror or str(exc)
        raise OSError(exc.errno, f"{path}: could not be written ({detail}); the previous file, if any, is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success its files are fsync'd and it replaces ``path``.

    The folder is created with mode 0777 & ~umask. An existing ``path`` is swapped out in one
    atomic exchange where the system has one (a kill leaves the old folder or the new one), then
    deleted. On any exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = _temp_path(path)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        for q in sorted(tmp.rglob("*")):
            _fsync_path(q, directory=q.is_dir())
        _fsync_path(tmp, directory=True)
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old folder
        else:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(path.parent, directory=True)


def write_table(table: pa.Table, path: str | os.PathLike, name: str | None = None) -> Path:
    """Validate (when ``name`` is given) and write ``table`` to ``path`` atomically (same table, same bytes)."""
    path = Path(path)
    if name is not None:
        table = validate(table, name, source=str(path))
    with atomic_write(path) as tmp:
        # Small row groups let readers stream token-level artifacts with flat memory.
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, **PARQUET_OPTIONS)
    return path


class AtomicParquetWriter:
    """A ParquetWriter streaming row groups to a temporary name, renamed to ``path`` only on success."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self._ctx = atomic_write(path)
        self.path = Path(path)
        self.tmp = self._ctx.__enter__()
        try:
            self.writer = pq.ParquetWriter(self.tmp, schema, **PARQUET_OPTIONS)
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)  # row groups = the written tables (the caller sizes them)

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.writer.close()
        except BaseException as close_exc:
            if exc_type is None:
                exc_type, exc, tb = type(close_exc), close_exc, close_exc.__traceback__
        if exc_type is None:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(exc_type, exc, tb)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically, keys sorted, so that the same metrics give the same bytes."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", path)


# --------------------------------------------------------------------------------------------------
# Readers


def read_table(path: str | os.PathLike, name: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (validated against ``name`` when given); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file" + (f" (expected the {name} artifact)" if name else ""))
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file: {exc}") from None
    check_utf8(table, str(path))
    if name is not None and columns is None:
        table = validate(table, name, source=str(path))
    return table


def check_utf8(table: pa.Table, source: str) -> None:
    """Every string value must be valid UTF-8 (Parquet readers do not check; Python decoding would
    fail later, far from the file). The error names the file, column and row."""
    for name, column in zip(table.column_names, table.columns):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        offset = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                for i, value in enumerate(chunk.view(pa.binary() if pa.types.is_string(chunk.type)
                                                     else pa.large_binary()).to_pylist()):
                    try:
                        None if value is None else value.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise SchemaError(
                            f"{source}: column {name!r}, row {offset + i}: not valid UTF-8 ({exc.reason} at byte "
                            f"{exc.start}; e.g. a lone surrogate or a cut multi-byte character)") from None
                raise SchemaError(f"{source}: column {name!r}: invalid string data") from None
            offset += len(chunk)


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


def finished_parts(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if _PART_RE.match(q.name))


def artifact_files(path: str | os.PathLike, name: str) -> list[Path]:
    """The Parquet file(s) of artifact ``name`` at ``path``: the file itself or the folder's parts.

    A folder with a manifest must be complete (all its parts present); an incomplete one is an
    error that says how many parts are missing, so a half-finished stage is never read as whole.
    """
    p = artifact_path(path)
    if p.is_file():
        return [p]
    parts = finished_parts(p)
    man = p / MANIFEST
    if man.exists():
        try:
            meta = json.loads(man.read_text())
            want = meta.get("num_parts") if isinstance(meta, dict) else None
        except (ValueError, UnicodeDecodeError):
            raise SchemaError(f"{man}: not a JSON manifest (expected {{\"artifact\", \"num_parts\"}})") from None
        have = {int(_PART_RE.match(q.name).group(1)) for q in parts}
        if isinstance(want, int) and have != set(range(want)):
            missing = sorted(set(range(want)) - have)
            if not missing:
                raise SchemaError(f"{p}: {name} artifact holds parts beyond its manifest's {want}")
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


# --------------------------------------------------------------------------------------------------
# Sharding


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
            raise InputError(f"--shard must look like i/N with 0 <= i < N, got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, part: int) -> bool:
        return part % self.count == self.index


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
