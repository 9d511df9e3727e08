"""Every entry point that reads an artifact, run in this process on an iteration folder.

``run_entry(name, folder, out_dir)`` returns ``(status, message)``: the exit status and the
entry point's stderr (stages, ``tcrlsd`` commands). ``READERS`` says which entry points read
which input. ``inspect`` is listed only once ``tcrlsd inspect`` exists (see ``INSPECT_HOOK``).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from harness import OUTPUTS, run_stage, stage_argv

STAGE_ENTRIES = ("generate", "verify", "critique", "score", "advantages")

# The hook for `tcrlsd inspect` (a later issue): the command line that inspects an iteration folder.
# When the command exists on main, the corpus runs it on every artifact it reads; until then the
# cases list it as "not yet available" in the table.
INSPECT_HOOK = ["inspect", "{folder}"]


def _has_command(name: str) -> bool:
    from tcrlsd.cli import COMMANDS

    return any(c[2] == name for c in COMMANDS)


READERS = {
    "prompts": ["generate", "verify", "critique"],
    "rollouts": ["verify", "critique", "score", "advantages", "recompute", "compare", "inspect"],
    "verdicts": ["critique", "advantages", "recompute", "compare", "inspect"],
    "critiques": ["score", "advantages", "recompute", "inspect"],
    "scores": ["advantages", "recompute", "compare", "inspect"],
    "params": [],  # per case: the stage whose section is damaged
    "policy": ["generate", "score"],
    "jsonl": ["grade"],
}


def available(entry: str) -> bool:
    return entry in STAGE_ENTRIES or _has_command(entry)


def _cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from tcrlsd.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=True)
    err = result.stderr if result.stderr_bytes is not None else ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        err += "".join(traceback.format_exception(result.exception))
    return result.exit_code, err + ("" if result.exit_code == 0 else result.stdout)


def run_entry(entry: str, folder: Path, out_dir: Path) -> tuple[int, str]:
    """Run ``entry`` reading ``folder`` (inputs, ``params.yaml``, ``policy/``), writing into ``out_dir``."""
    if entry in STAGE_ENTRIES:
        argv = stage_argv(entry, out_dir, folder, folder / "policy", folder / "params.yaml",
                          out=out_dir / OUTPUTS[entry][1])
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            try:
                rc = run_stage(entry, argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
            except BaseException:  # noqa: BLE001 -- an escaped exception is what the corpus is looking for
                import traceback

                traceback.print_exc(file=sys.stderr)
                rc = 1
        return rc, buf.getvalue()
    if entry == "grade":
        return _cli(["grade", "--jsonl", str(folder / "grade.jsonl"), "--params", str(folder / "params.yaml")])
    if entry == "recompute":
        return _cli(["recompute", str(folder), "--params", str(folder / "params.yaml"), "--json",
                     "--out", str(out_dir / "recomputed.parquet")])
    if entry == "compare":
        return _cli(["compare", str(folder), "--params", str(folder / "params.yaml"), "--json"])
    if entry == "inspect":
        return _cli([a.format(folder=folder) for a in INSPECT_HOOK])
    raise KeyError(entry)
