"""Find an iteration's artifacts and read them by column: lazy polars scans for lists, row-group
reads for single rows.

An iteration folder holds ``rollouts``, ``verdicts``, ``critiques``, ``scores`` and ``advantages``,
each as ``NAME.parquet`` or a folder of ``part-NNNNN.parquet`` shards (``tcrlsd.artifacts``); the
prompts are one file, by default the folder's parent's ``prompts.parquet`` (``data/prompts.parquet``
for ``data/iter-0000``). Only rollouts are required: the other artifacts may be missing (a run
stopped after verify, a folder copied without its scores) or incomplete (a stage killed half way),
and :class:`Iteration` records why in ``missing`` so that the views show what exists and say
what does not.

Why two read paths: a list touches a few columns of every row, which a lazy scan with projection
pushdown reads without the heavy ones (token ids, texts); one sample needs every column of one
row, which :meth:`Iteration.rows` reads from only the row group holding it (artifacts are written
in row groups of 1,024 rows), instead of decoding the token columns of the whole iteration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tcrlsd.artifacts import artifact_files
from tcrlsd.errors import TcrlsdError
from tcrlsd.schemas import SchemaError

__all__ = ["ARTIFACTS", "InspectError", "Iteration"]

# The per-rollout artifacts of an iteration folder, in pipeline order. rollouts is required.
ARTIFACTS = ("rollouts", "verdicts", "critiques", "scores", "advantages")


class InspectError(TcrlsdError, ValueError):
    """The iteration folder cannot answer the request (missing folder, column, id)."""


def _find(path: Path, name: str) -> tuple[tuple[Path, ...] | None, str | None]:
    """(files, None) when artifact ``name`` exists at ``path`` (file or folder), else (None, why)."""
    try:
        return tuple(artifact_files(path, name)), None
    except FileNotFoundError:
        return None, f"not found ({path.name}.parquet or {path.name}/)"
    except SchemaError as exc:  # an incomplete or empty shard folder
        return None, str(exc)


@dataclass(frozen=True)
class Iteration:
    """The artifacts found in one iteration folder (plus the prompts file), and what is missing."""

    root: Path
    files: dict[str, tuple[Path, ...]]  # artifact name -> its Parquet file(s), only those present
    missing: dict[str, str] = field(default_factory=dict)  # artifact name -> why it is not usable
    _schemas: dict[str, dict[str, pa.DataType]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, iter_dir: str | os.PathLike, prompts: str | os.PathLike | None = None) -> "Iteration":
        root = Path(iter_dir)
        if not root.is_dir():
            raise InspectError(f"{root}: no such iteration folder")
        files: dict[str, tuple[Path, ...]] = {}
        missing: dict[str, str] = {}
        for name in ARTIFACTS:
            found, why = _find(root / name, name)
            if found is None:
                missing[name] = why
            else:
                files[name] = found
        if "rollouts" not in files:
            raise InspectError(f"{root}: no usable rollouts artifact: {missing['rollouts']}; is this an iteration folder?")
        prompts_path = Path(prompts) if prompts is not None else root.parent / "prompts.parquet"
        if prompts_path.is_file():
            files["prompts"] = (prompts_path,)
        else:
            missing["prompts"] = f"{prompts_path}: no such file (give --prompts FILE)"
        return cls(root, files, missing)

    def has(self, name: str) -> bool:
        return name in self.files

    def schema(self, name: str) -> dict[str, pa.DataType]:
        """Column name -> type of artifact ``name`` (from the first file's footer; cheap)."""
        if name not in self._schemas:
            path = self.files[name][0]
            try:
                sch = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InspectError(f"{path}: not a readable Parquet file ({name} artifact): {exc}") from None
            self._schemas[name] = {f.name: f.type for f in sch}
        return self._schemas[name]

    def _check_columns(self, name: str, columns: list[str]) -> None:
        have = self.schema(name)
        lacking = [c for c in columns if c not in have]
        if lacking:
            raise InspectError(
                f"{self.files[name][0]}: the {name} artifact has no column(s) {', '.join(lacking)}; "
                f"found: {', '.join(have)}"
            )

    def scan(self, name: str, columns: list[str]) -> pl.LazyFrame:
        """A lazy frame of ``columns`` of artifact ``name``; nothing is read until collected."""
        self._check_columns(name, columns)
        return pl.scan_parquet([str(f) for f in self.files[name]]).select(columns)

    def rows(self, name: str, key: str, values: list[str], columns: list[str] | None = None) -> dict[str, dict]:
        """Rows of artifact ``name`` whose ``key`` is in ``values``, as ``{key value: row dict}``.

        Reads the key column of every file, then only the row groups that hold a wanted row.
        ``columns=None`` means all columns. Values not found are absent from the result.
        """
        wanted = set(values)
        if columns is not None:
            columns = list(dict.fromkeys([key, *columns]))
            self._check_columns(name, columns)
        else:
            self._check_columns(name, [key])
        out: dict[str, dict] = {}
        for path in self.files[name]:
            try:
                pf = pq.ParquetFile(path)
                keys = pf.read(columns=[key]).column(key).to_pylist()
            except (pa.ArrowInvalid, OSError) as exc:
                raise InspectError(f"{path}: not a readable Parquet file ({name} artifact): {exc}") from None
            hits = [i for i, k in enumerate(keys) if k in wanted and k not in out]
            if not hits:
                continue
            bounds, start = [], 0  # (first row, row count) of each row group
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                bounds.append((start, n))
                start += n
            groups = sorted({next(g for g, (s, n) in enumerate(bounds) if s <= i < s + n) for i in hits})
            table = pf.read_row_groups(groups, columns=columns)
            first, offset = {}, 0  # where each selected row group starts in ``table``
            for g in groups:
                first[g] = offset
                offset += bounds[g][1]
            for i in hits:
                g = next(g for g in groups if bounds[g][0] <= i < bounds[g][0] + bounds[g][1])
                row = table.slice(first[g] + i - bounds[g][0], 1).to_pylist()[0]
                out[row[key]] = row
            if len(out) == len(wanted):
                break
        return out
