"""The terminal view (rich): the list, one sample with Δ-coloured tokens, one group.

Untrusted text only ever reaches rich as :class:`rich.text.Text` built from
:func:`~tcrlsd.inspect.safe_text.visible` (control characters shown as ``\\x1b`` etc.), never as a
markup string: ``[bold red]`` in a response is printed as those characters. Static labels are
Text too, so no string from the data is parsed as markup anywhere.
"""

from __future__ import annotations

from rich.console import Console
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Text

from tcrlsd.inspect.palette import DEFAULT_SCALE, delta_rgb, legend_stops, resolve_scale, text_rgb
from tcrlsd.inspect.safe_text import one_line, visible
from tcrlsd.inspect.views import ListResult, RenderOptions, View, format_value, signal_pairs

__all__ = ["render", "make_console", "render_list", "render_sample", "render_group", "legend"]


def make_console(plain: bool = False) -> Console:
    """A console that never highlights or interprets strings. Colour and width follow stdout (and
    rich's FORCE_COLOR / NO_COLOR / COLUMNS); 120 columns when stdout is not a terminal or when
    ``plain`` (text for a file: no colour)."""
    opts = dict(highlight=False, emoji=False, markup=False)
    if plain:
        return Console(width=120, color_system=None, force_terminal=False, **opts)
    console = Console(**opts)
    return console if console.is_terminal else Console(width=120, **opts)


def render(view: View, opts: RenderOptions) -> str:
    """The terminal text (with the console's colour codes) of ``view``."""
    console = make_console(opts.plain)
    with console.capture() as cap:
        if view.kind == "sample":
            (d,) = view.samples()
            render_sample(console, d, resolve_scale(opts.scale, [d]), token_table=opts.tokens)
        elif view.kind == "group":
            render_group(console, view.group)
        else:
            render_list(console, view.page, str(view.it.root), view.page_number, view.page_size)
    return cap.get()


_num = format_value


def _flags(row: dict) -> str:
    out = [name for key, name in (("leaks_answer", "leak"), ("suspected_false_negative", "fn"),
                                  ("critique_error", "err")) if row.get(key)]
    return ",".join(out)


def _style(delta, scale) -> Style:
    return Style(color="rgb({},{},{})".format(*text_rgb(delta, scale)),
                 bgcolor="rgb({},{},{})".format(*delta_rgb(delta, scale)))


def legend(scale: float = DEFAULT_SCALE) -> Text:
    t = Text("Δ_t = log Q − log P (teacher − student):  ")
    t.append("teacher disagrees ", Style(color="rgb(214,39,40)", bold=True))
    for v in legend_stops(scale):
        t.append(f" {v:+.2g} ", _style(v, scale))
    t.append(" teacher agrees", Style(color="rgb(44,160,44)", bold=True))
    t.append(f"   (saturates at ±{scale:.3g} nats; grey = no Δ)")
    return t


def _missing(console: Console, missing: dict[str, str]) -> None:
    for name, why in missing.items():
        console.print(Text(f"{name}: missing — {why}", style="yellow"))


def render_list(console: Console, res: ListResult, title: str, page: int, limit: int | None) -> None:
    table = Table(title=Text(title), show_lines=False, pad_edge=False, expand=False)
    for name, just in (("rollout", "left"), ("prompt", "left"), ("r", "right"), ("reason", "left"),
                       ("fb", "left"), ("flags", "left"), ("Δ-gap", "right"), ("len", "right"),
                       ("A", "right"), ("|Â|", "right")):
        table.add_column(Text(name), justify=just, overflow="fold" if name == "rollout" else "ellipsis",
                         no_wrap=name != "rollout")
    for row in res.rows:
        table.add_row(
            Text(one_line(row["rollout_id"])), Text(one_line(row["prompt_id"])), Text(_num(row["reward"], ".0f")),
            Text(one_line(row["reason"]) if row["reason"] is not None else "–"), Text(_num(row["has_feedback"])),
            Text(_flags(row), style="bold yellow"), Text(_num(row["delta_gap"], "+.3f")), Text(_num(row["length"])),
            Text(_num(row["group_advantage"], "+.2f")), Text(_num(row["adv_abs_mean"], ".3f")),
        )
    console.print(table)
    shown_to = res.offset + len(res.rows)
    foot = f"rows {res.offset + 1 if res.rows else 0}–{shown_to} of {res.total} matching ({res.total_rows} in the iteration)"
    if limit and shown_to < res.total:
        pages = -(-res.total // limit)
        foot += f"; page {page}/{pages}, next: --page {page + 1}"
    console.print(Text(foot, style="dim"))
    _missing(console, res.missing)


def _section(console: Console, name: str, body: str | None, missing_note: str | None = None) -> None:
    console.print(Text(name, style="bold cyan"))
    if body is None:
        console.print(Text(missing_note or "(none)", style="yellow" if missing_note else "dim"))
    else:
        console.print(Text(visible(body)))


def _kv(pairs) -> Text:
    t = Text()
    for i, (k, v) in enumerate(pairs):
        if i:
            t.append("   ")
        t.append(f"{k} ", style="dim")
        t.append(v if isinstance(v, str) else _num(v))
    return t


def _token_text(d: dict, scale: float) -> Text:
    t = Text()
    for tok in d["tokens"]:
        if tok["text"] is None:
            piece = f"{tok['id']} "
        else:
            piece = visible(tok["text"]).replace("\n", "↵\n")
        t.append(piece, _style(tok["delta"], scale))
    return t


def _token_table(d: dict) -> Table:
    table = Table(title=Text("tokens"), pad_edge=False)
    for name in ("pos", "id", "token", "log P", "log Q", "Δ", "Â"):
        table.add_column(Text(name), justify="left" if name == "token" else "right")
    for tok in d["tokens"]:
        table.add_row(Text(str(tok["pos"])), Text(str(tok["id"])),
                      Text(visible(repr(tok["text"])[1:-1]) if tok["text"] is not None else "–"),
                      *(Text(_num(tok[k], "+.3f")) for k in ("logp", "logq", "delta", "adv")))
    return table


def render_sample(console: Console, d: dict, scale: float = DEFAULT_SCALE, token_table: bool = False) -> None:
    ro, st, miss = d["rollout"], d["stats"], d["missing"]
    console.print(Rule(Text(f"rollout {one_line(d['rollout_id'])}")))
    console.print(_kv([("prompt", one_line(ro["prompt_id"])), ("sample", ro["sample_idx"]), ("iteration", ro["iteration"]),
                       ("finish", one_line(ro["finish_reason"])), ("tokens", st["length"]),
                       ("prompt tokens", st["prompt_tokens"])]))
    p = d["prompt"]
    _section(console, "Problem", p["problem"] if p else None, f"prompts missing — {miss.get('prompts')}")
    _section(console, "Gold answer", p["answer"] if p else None, f"prompts missing — {miss.get('prompts')}")
    console.print(Text("Verdict", style="bold cyan"))
    v = d["verdict"]
    if v is None:
        console.print(Text(f"verdicts missing — {miss.get('verdicts')}", style="yellow"))
    else:
        console.print(_kv([("reward", _num(v["reward"], ".0f")), ("correct", v["is_correct"]),
                           ("reason", one_line(v["reason"])),
                           ("extracted", one_line(v["extracted_answer"]) if v["extracted_answer"] is not None else "–"),
                           ("verifier", one_line(v["verifier"]))]))
    c = d["critique"]
    if c is None:
        _section(console, "Critique", None, f"critiques missing — {miss.get('critiques')}")
    else:
        console.print(Text("Critique", style="bold cyan"))
        console.print(_kv([("mode", one_line(c["mode"])), ("critic", one_line(c["critic"])),
                           ("template", one_line(c["template"])), ("leaks answer", c["leaks_answer"]),
                           ("suspected false negative", c["suspected_false_negative"])]))
        if c["error"] is not None:
            console.print(Text("critic error: " + visible(c["error"]), style="red"))
        console.print(Text(visible(c["feedback_text"])) if c["feedback_text"] is not None
                      else Text("(no feedback: the teacher is the student for this row)", style="dim"))
        _section(console, "Teacher context (exact)", c["teacher_prompt"])
        for j, (kind, text) in enumerate(zip(c.get("extra_teacher_kinds") or [], c.get("extra_teacher_prompts") or [])):
            _section(console, f"Extra teacher context {j + 1}: {one_line(kind)} (exact)", text,
                     "(no text: scored as the student)")
    console.print(Text("Signals", style="bold cyan"))
    console.print(_kv([(k, one_line(v)) for k, v in signal_pairs(d)]))
    for name in ("scores", "advantages"):
        if name in miss:
            console.print(Text(f"{name} missing — {miss[name]}", style="yellow"))
    console.print(Text("Response", style="bold cyan"))
    console.print(legend(scale))
    if d["tokenizer"] is None:
        console.print(Text("(token ids; pass --policy DIR for token text)", style="dim"))
    console.print(_token_text(d, scale))
    if d["tokenizer"] is None:
        _section(console, "Response text (as stored)", d["rollout"]["response_text"])
    if token_table:
        console.print(_token_table(d))


def render_group(console: Console, g: dict) -> None:
    st = g["stats"]
    console.print(Rule(Text(f"group {one_line(g['prompt_id'])}")))
    p = g["prompt"]
    _section(console, "Problem", p["problem"] if p else None, f"prompts missing — {g['missing'].get('prompts')}")
    _section(console, "Gold answer", p["answer"] if p else None, f"prompts missing — {g['missing'].get('prompts')}")
    console.print(_kv([
        ("samples", st["size"]), ("shown", st["shown"]),
        ("rewards", " ".join(_num(r, ".0f") for r in st["rewards"])), ("mean reward", _num(st["reward_mean"], ".3f")),
        ("A", " ".join(_num(a, "+.2f") for a in st["group_advantages"])),
        ("coverage", _num(st["coverage"], ".0%") if st["coverage"] is not None else "–"),
    ]))
    table = Table(pad_edge=False, show_lines=True)
    for name in ("#", "r", "reason", "answer", "A", "fb", "flags", "Δ-gap", "|Â|", "len", "response (end)"):
        table.add_column(Text(name), justify="right" if name in ("#", "r", "A", "Δ-gap", "|Â|", "len") else "left",
                         overflow="fold")
    for row in g["rows"]:
        ans = row["extracted_answer"]
        table.add_row(
            Text(str(row["sample_idx"])), Text(_num(row["reward"], ".0f")),
            Text(one_line(row["reason"]) if row["reason"] is not None else "–"),
            Text(one_line(ans, 16) if ans is not None else "–"), Text(_num(row["group_advantage"], "+.2f")),
            Text(_num(row["has_feedback"])), Text(_flags(row), style="bold yellow"),
            Text(_num(row["delta_gap"], "+.3f")), Text(_num(row["adv_abs_mean"], ".3f")), Text(_num(row["length"])),
            Text(one_line(row["response_text"][-60:])),
        )
    console.print(table)
    _missing(console, {k: v for k, v in g["missing"].items() if k != "prompts"})
    console.print(Text("one sample in full: --id ROLLOUT_ID (ids are PROMPT_ID#SAMPLE_IDX)", style="dim"))
