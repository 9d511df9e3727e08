"""`tcrlsd inspect`: browse an iteration's samples (list, one sample, one group) in the terminal,
as one HTML page, or as JSON Lines. The library is tcrlsd.inspect; it is imported inside the
command so that the rest of the CLI does not pay for polars.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _write(text: str, out: Path | None) -> None:
    """To stdout, or to ``out`` atomically."""
    if out is None:
        sys.stdout.write(text)
        return
    from tcrlsd.artifacts import write_text

    write_text(text, out)
    typer.echo(f"wrote {out}", err=True)


def inspect(
    iter_dir: Annotated[Path, typer.Argument(help="Iteration folder, e.g. data/iter-0000.")],
    rollout_id: Annotated[Optional[str], typer.Option("--id", help="Show this one sample in full.")] = None,
    prompt_id: Annotated[
        Optional[str], typer.Option("--prompt", help="Only this prompt's rows; the table shows the whole group.")
    ] = None,
    correct: Annotated[Optional[bool], typer.Option("--correct/--incorrect", help="Only right / wrong rows.")] = None,
    feedback: Annotated[
        Optional[bool], typer.Option("--feedback/--no-feedback", help="Only rows with / without feedback.")
    ] = None,
    reason: Annotated[
        Optional[list[str]], typer.Option("--reason", help="Only this verdict reason (repeatable): correct, incorrect, "
                                          "no_answer, unparsable, timeout.")
    ] = None,
    flagged: Annotated[
        bool, typer.Option("--flagged", help="Only rows flagged leaks_answer or suspected_false_negative.")
    ] = False,
    search: Annotated[
        Optional[str], typer.Option("--search", help="Only rows whose response or critique contains TEXT (any case).")
    ] = None,
    sort: Annotated[
        Optional[str], typer.Option("--sort", help="delta (Δ-gap) | length | adv (mean |Â|); ascending unless --desc.")
    ] = None,
    desc: Annotated[bool, typer.Option("--desc", help="Sort descending.")] = False,
    page: Annotated[int, typer.Option("--page", min=1, help="Page number (pages of --limit rows).")] = 1,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=0, help="Rows per page; 0 = all (default 50; jsonl: all).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | html | jsonl")] = "table",
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Write the output here (default: stdout); table: plain text.")
    ] = None,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="table: a per-token table too; jsonl: full rows with tokens.")
    ] = False,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="prompts Parquet (default: ITER_DIR/../prompts.parquet).")
    ] = None,
    policy: Annotated[
        Optional[Path], typer.Option("--policy", help="Policy folder whose tokenizer.json gives token text "
                                     "(default: the scores' teacher_checkpoint if it exists).")
    ] = None,
    scale: Annotated[
        str, typer.Option("--scale", help="|Δ_t| in nats at which the colour saturates, or 'auto' (the 95th "
                          "percentile of |Δ_t| over the tokens shown).")
    ] = "2",
) -> None:
    """Browse an iteration's samples and see which tokens the teacher disagreed with.

    The list (filters, sort, pages), one sample with each response token
    coloured by the teacher's opinion Δ_t = log Q − log P (red: the teacher
    disagrees, green: it agrees), or one GRPO group side by side. Missing
    critiques / scores / advantages are shown as missing; model text is shown
    literally (no markup, escape sequence or HTML is interpreted).
    """
    if scale != "auto":
        try:
            scale = float(scale)
        except ValueError:
            raise _fail(f"--scale must be a number of nats or 'auto', got {scale!r}") from None
        if not scale > 0:
            raise _fail(f"--scale must be > 0, got {scale}")

    from tcrlsd.inspect.formats import FORMATS
    from tcrlsd.inspect.load import InspectError, Iteration
    from tcrlsd.inspect.views import Filters, RenderOptions, build_view
    from tcrlsd.schemas import SchemaError

    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if limit is None:
        limit = 0 if fmt == "jsonl" else 50
    filters = Filters(correct=correct, feedback=feedback, reasons=tuple(reason or ()), flagged=flagged, search=search)
    try:
        if policy is not None and not policy.exists():
            raise InspectError(f"--policy {policy}: no such folder")
        it = Iteration.open(iter_dir, prompts)
        view = build_view(it, rollout_id, prompt_id, filters, sort, desc, page, limit or None, policy)
        text = FORMATS[fmt](view, RenderOptions(scale=scale, tokens=tokens, plain=out is not None))
    except (InspectError, SchemaError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _write(text, out)
