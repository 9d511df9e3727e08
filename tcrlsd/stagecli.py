"""The contract every ``stages/<name>.py`` keeps, written once.

- **Arguments.** :func:`stage_parser` builds the parser: the script's docstring as its help, then
  ``--params`` (default ``params.yaml``: DVC runs every stage in the project root) and ``--preset``
  (a params-shaped YAML deep-merged over it, as ``tcrlsd preset`` would write it) for every stage
  that reads params. Paths of inputs and outputs are always arguments (dvc.yaml writes them once);
  ``--out`` is the artifact, ``--metrics`` the detail JSON.
- **Errors.** :func:`run_stage` runs the stage's body. An expected error -- one of the project's own
  (:class:`tcrlsd.errors.TcrlsdError`: bad params, a damaged input naming its file / row / column, a
  resume conflict) or an ``OSError`` (a missing or unwritable file, a full disk) -- is printed as one
  ``<stage>: error: <message>`` line on stderr and the exit status is 2. Anything else is a bug
  (here or inside numpy, pyarrow, torch): it is not caught, so Python prints the traceback and
  exits with status 1. A stage may map further errors to their own status (critique: a critic that
  went down -> 75, rerun later).
- **Start-up.** A per-iteration stage ends with ``sys.exit(process_main(main))``: run as its own
  process (as DVC runs it), it hides pandas first (:mod:`tcrlsd.startup`: pyarrow and DVCLive would
  import it, 0.4-0.5 s of every stage process); ``main`` called in-process (the tests) changes
  nothing global. prepare and warmstart keep the plain ``main()``: they run once, and prepare's
  ``hf:`` sources need pandas (Hugging Face ``datasets``).
- **Metrics.** :func:`write_metrics` writes the stage's detail JSON atomically when ``--metrics`` was
  given (the one place a stage's metrics reach disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping

from tcrlsd.artifacts import STAGE_ERRORS, write_json
from tcrlsd.startup import hide_pandas

__all__ = ["DEFAULT_PARAMS", "EXIT_ERROR", "stage_parser", "run_stage", "process_main", "write_metrics"]

DEFAULT_PARAMS = "params.yaml"
EXIT_ERROR = 2  # an expected error: one `error:` line (a traceback exits with 1)


def stage_parser(doc: str | None, *, sections: tuple[str, ...] = (), preset: bool = True) -> argparse.ArgumentParser:
    """The stage's parser with its docstring as help, and ``--params`` / ``--preset`` when it reads
    the params ``sections`` (none: a stage that reads no params, like summarize)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sections:
        names = ", ".join(f"`{s}`" for s in sections)
        ap.add_argument("--params", default=DEFAULT_PARAMS,
                        help=f"params file (section{'s' if len(sections) > 1 else ''} {names}); default %(default)s")
        if preset:
            ap.add_argument("--preset", default=None, help="params-shaped YAML merged over --params")
    return ap


def run_stage(name: str, body: Callable[[], int | None], *,
              exits: Mapping[type[BaseException] | tuple[type[BaseException], ...], tuple[int, str]] | None = None) -> int:
    """``body()``'s exit status (None = 0); an expected error -> one ``<name>: error: ...`` line, 2.

    ``exits`` maps further exception types to ``(status, word)``: ``<name>: <word>: <message>``
    and that status (checked before the expected errors).
    """
    try:
        rc = body()
    except BaseException as exc:  # noqa: BLE001 -- re-raised unless it is one the contract reports
        for types, (status, word) in (exits or {}).items():
            if isinstance(exc, types):
                _say(name, word, exc)
                return status
        if isinstance(exc, STAGE_ERRORS):
            _say(name, "error", exc)
            return EXIT_ERROR
        raise
    return 0 if rc is None else rc


def process_main(main: Callable[[], int]) -> int:
    """``main()`` as the body of a stage's own process, pandas hidden first (:mod:`tcrlsd.startup`)
    unless the environment sets ``TCRLSD_STAGE_PANDAS=1`` (code of one's own that a stage runs, a
    custom critic say, needs pandas: without it that import would fail as if pandas were absent)."""
    if os.environ.get("TCRLSD_STAGE_PANDAS", "") != "1":
        hide_pandas()
    return main()


def _say(name: str, word: str, exc: BaseException) -> None:
    print(f"{name}: {word}: {exc}", file=sys.stderr)


def write_metrics(metrics: dict, path: str | os.PathLike | None) -> None:
    """Write the stage's detail metrics JSON to ``path`` (atomically); nothing when no path was given."""
    if path:
        write_json(metrics, path)
