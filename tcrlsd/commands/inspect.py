"""`tcrlsd inspect`: browse an iteration's samples (list, one sample, one group) in the terminal,
as one HTML page, or as JSON Lines. The library is tcrlsd.inspect; it is imported inside the
command so that the rest of the CLI does not pay for polars.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

FORMATS = ("table", "html", "jsonl")


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _write(text: str, out: Path | None) -> None:
    """To stdout, or to ``out`` atomically (temporary name in the same folder, then rename)."""
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    out: Annotated[Optional[Path], typer.Option("--out", help="Write html / jsonl here (default: stdout).")] = None,
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
    """Browse an iteration's samples: the list (filters, sort, pages), one sample with each response
    token coloured by the teacher's opinion Δ_t = log Q − log P (red: the teacher disagrees, green:
    it agrees), or one GRPO group side by side. Missing critiques / scores / advantages are shown
    as missing; model text is shown literally (no markup, escape sequence or HTML is interpreted).
    """
    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if rollout_id is not None and prompt_id is not None:
        raise _fail("give --id or --prompt, not both")
    if out is not None and fmt == "table":
        raise _fail("--out is for --format html or jsonl")
    if scale != "auto":
        try:
            scale = float(scale)
        except ValueError:
            raise _fail(f"--scale must be a number of nats or 'auto', got {scale!r}") from None
        if not scale > 0:
            raise _fail(f"--scale must be > 0, got {scale}")

    from tcrlsd.inspect.load import InspectError, Iteration
    from tcrlsd.inspect.views import Filters, group, list_samples
    from tcrlsd.schemas import SchemaError

    if limit is None:
        limit = 0 if fmt == "jsonl" else 50
    page_size = limit or None
    filters = Filters(correct=correct, feedback=feedback, reasons=tuple(reason or ()), prompt_id=prompt_id,
                      flagged=flagged, search=search)
    try:
        it = Iteration.open(iter_dir, prompts)
        if policy is not None and not policy.exists():
            raise InspectError(f"--policy {policy}: no such folder")
        if rollout_id is not None:
            _one(it, rollout_id, fmt, out, tokens, policy, scale)
        elif prompt_id is not None and fmt == "table":
            from tcrlsd.inspect.render_terminal import make_console, render_group

            render_group(make_console(), group(it, prompt_id, filters, sort, desc))
        else:
            offset = (page - 1) * (page_size or 0)
            res = list_samples(it, filters, sort, desc, offset, page_size)
            _many(it, res, fmt, out, tokens, policy, scale, page, page_size, prompt_id)
    except (InspectError, SchemaError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _one(it, rollout_id, fmt, out, tokens, policy, scale) -> None:
    from tcrlsd.inspect.views import details

    (d,) = details(it, [rollout_id], policy)
    scale = _scale(scale, [d])
    if fmt == "table":
        from tcrlsd.inspect.render_terminal import make_console, render_sample

        render_sample(make_console(), d, scale, token_table=tokens)
    elif fmt == "html":
        from tcrlsd.inspect.render_html import render_page

        _write(render_page(f"{it.root}: {rollout_id}", [d], scale=scale), out)
    else:
        from tcrlsd.inspect.render_jsonl import render_lines

        _write(render_lines([d]), out)


def _many(it, res, fmt, out, tokens, policy, scale, page, page_size, prompt_id) -> None:
    from tcrlsd.inspect.views import details

    if fmt == "table":
        from tcrlsd.inspect.render_terminal import make_console, render_list

        render_list(make_console(), res, f"{it.root}", page, page_size)
        return
    ids = [r["rollout_id"] for r in res.rows]
    if fmt == "jsonl":
        from tcrlsd.inspect.render_jsonl import render_lines

        _write(render_lines(details(it, ids, policy) if tokens else res.rows), out)
        return
    from tcrlsd.inspect.render_html import render_page

    cards = details(it, ids, policy)
    scale = _scale(scale, cards)

    notes = [f"{res.total} of {res.total_rows} rows match; showing {len(ids)} from row {res.offset + 1}"]
    notes += [f"{name}: missing — {why}" for name, why in it.missing.items()]
    if prompt_id is not None:
        from tcrlsd.inspect.views import group

        st = group(it, prompt_id)["stats"]

        def fmt_list(xs, f):
            return " ".join("–" if x is None else format(x, f) for x in xs)

        notes.insert(0, f"group {prompt_id}: {st['size']} samples; rewards {fmt_list(st['rewards'], '.0f')}; "
                        f"A {fmt_list(st['group_advantages'], '+.2f')}; coverage "
                        + ("–" if st["coverage"] is None else f"{st['coverage']:.0%}"))
    title = f"{it.root}" + (f": group {prompt_id}" if prompt_id is not None else "")
    _write(render_page(title, cards, rows=res.rows, notes=notes, scale=scale), out)


def _scale(scale, samples: list[dict]) -> float:
    """A number stays; 'auto' = the 95th percentile of |Δ_t| over the samples' tokens (2 if none)."""
    if scale != "auto":
        return scale
    deltas = sorted(abs(t["delta"]) for d in samples for t in d["tokens"] if t["delta"] is not None)
    if not deltas or deltas[-1] == 0:
        return 2.0
    return max(deltas[min(len(deltas) - 1, int(0.95 * len(deltas)))], 1e-6)
