"""`tcrlsd grade`: grade one response, or a JSONL file of them, exactly as the verify stage does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def grade(
    response: Annotated[
        str | None,
        typer.Argument(help="The model response (its last \\boxed{}, or the final boxes of an answer boxed part "
                            "by part, is graded). Omit with --jsonl."),
    ] = None,
    gold: Annotated[
        str | None,
        typer.Option("--gold", help="Gold answer (a bare answer, or a solution whose final \\boxed{} answer is used)."),
    ] = None,
    grader: Annotated[
        str | None,
        typer.Option("--grader", help="Grader name: math_verify | string ({default:verify.default_grader})."),
    ] = None,
    jsonl: Annotated[
        Path | None,
        typer.Option("--jsonl", help='File of lines {"response": ..., "gold": ...[, "grader": ...]}; "-" = stdin.'),
    ] = None,
    params: Annotated[
        Path | None,
        typer.Option("--params", help="params.yaml whose 'verify' section sets the default grader, workers, timeouts "
                     "and the deadline (default: the project's params.yaml, found from the working directory)."),
    ] = None,
) -> None:
    """Print {reward, extracted_answer, reason, grader} as JSON, one object per response.

    With --jsonl: one output line per non-empty input line, in input order, each with its 1-based "line" number. A line that is not a JSON object with string "response" and "gold" gives an object with an "error" field instead, and the exit status is 1.
    """
    import json
    import sys

    from tcrlsd.params import ParamsError, section_in_force
    from tcrlsd.verify import (
        GRADERS,
        GradeRequest,
        GradingPool,
        VerifyParams,
        WorkerStartError,
    )

    try:
        vp = section_in_force("verify", VerifyParams, params, announce="grade")
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    grader = grader or vp.default_grader
    known = ", ".join(GRADERS)

    if jsonl is None:
        if response is None or gold is None:
            typer.echo("error: give RESPONSE and --gold GOLD, or --jsonl FILE", err=True)
            raise typer.Exit(2)
        if grader not in GRADERS:
            typer.echo(f"error: unknown grader {grader!r}; known: {known}", err=True)
            raise typer.Exit(2)
        items: list[tuple[int, GradeRequest | str]] = [(0, GradeRequest(grader, response, gold))]
    else:
        if response is not None or gold is not None:
            typer.echo("error: --jsonl takes no RESPONSE or --gold", err=True)
            raise typer.Exit(2)
        try:
            raw = sys.stdin.buffer.read() if str(jsonl) == "-" else jsonl.read_bytes()
        except OSError as exc:
            typer.echo(f"error: cannot read {jsonl}: {exc}", err=True)
            raise typer.Exit(2)
        # Line by line from bytes: one line that is not UTF-8 is that line's error, not the file's.
        items = [(n, _request(line, n, grader, known)) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]

    requests = [r for _, r in items if isinstance(r, GradeRequest)]
    try:
        with GradingPool.from_params(vp, max_workers=len(requests)) as pool:
            grades = iter(pool.grade(requests)) if requests else iter(())
    except WorkerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    failed = False
    for n, r in items:
        if isinstance(r, str):
            failed = True
            out = {"line": n, "error": r}
        else:
            g = next(grades)
            out = {"reward": g.reward, "extracted_answer": g.extracted_answer, "reason": g.reason, "grader": r.grader}
            if jsonl is not None:
                out = {"line": n, **out}
        typer.echo(json.dumps(out, ensure_ascii=False))
    if failed:
        raise typer.Exit(1)


def _request(raw: bytes, n: int, default_grader: str, known: str):
    """A GradeRequest for one JSONL line, or an error message (str) naming what is wrong."""
    import json

    from tcrlsd.verify import GRADERS, GradeRequest

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"line {n}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"line {n}: expected a JSON object with \"response\" and \"gold\", got {type(obj).__name__}"
    for key in ("response", "gold"):
        if not isinstance(obj.get(key), str):
            return f"line {n}: field {key!r} must be a string, got {obj.get(key)!r:.80}"
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from a \\uD800-style escape
            return f"line {n}: field {key!r} is not valid Unicode text (lone surrogate at character {exc.start})"
    name = obj.get("grader", default_grader)
    if name not in GRADERS:
        return f"line {n}: unknown grader {name!r}; known: {known}"
    return GradeRequest(name, obj["response"], obj["gold"])
