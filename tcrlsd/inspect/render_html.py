"""One standalone HTML page: a summary table and one card per selected sample.

No network, no script: the styles are inline, and a Content-Security-Policy of ``default-src
'none'`` forbids scripts, images, fonts and requests even if something slipped through. Every
string from the data goes through :func:`~tcrlsd.inspect.safe_text.visible` and then
``html.escape`` (text and attributes alike), so ``<script>`` in a response is shown as text.

Each response token is a ``<span>`` whose background is its Δ_t colour and whose ``title`` (shown
on hover) gives the token, log P, log Q, Δ and Â.
"""

from __future__ import annotations

import html

from tcrlsd.inspect.palette import DEFAULT_SCALE, delta_rgb, legend_stops, resolve_scale, text_rgb
from tcrlsd.inspect.safe_text import one_line, visible
from tcrlsd.inspect.views import RenderOptions, View, format_value, signal_pairs

__all__ = ["render", "render_page"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-bottom: .2em; } h3 { font-size: .95em; margin: .8em 0 .2em; color: #055; }
table.list { border-collapse: collapse; font-size: .85em; }
table.list td, table.list th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
table.list td.l, table.list th.l { text-align: left; }
.card { border: 1px solid #bbb; border-radius: 6px; padding: .6em 1em; margin: 1.2em 0; }
.pre { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .85em; background: #f7f7f7; padding: .4em; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .9em; line-height: 1.6; }
.tokens span { border-radius: 2px; }
.kv { font-size: .9em; } .kv b { color: #666; font-weight: normal; margin-left: 1em; }
.missing { color: #a60; } .flag { color: #a60; font-weight: bold; }
.legend span.sw { display: inline-block; min-width: 3.2em; padding: 0 2px; text-align: center; font-size: .8em; font-family: monospace; }
"""


def _e(s) -> str:
    """Visible-then-escaped text of any value (None → '–')."""
    if s is None:
        return "–"
    return html.escape(visible(str(s)), quote=True)


def _n(v, fmt=".3f") -> str:
    return html.escape(format_value(v, fmt))


def _rgb(c) -> str:
    return "rgb({},{},{})".format(*c)


def _legend(scale: float) -> str:
    sw = "".join(
        f'<span class="sw" style="background:{_rgb(delta_rgb(v, scale))};color:{_rgb(text_rgb(v, scale))}">{v:+.2g}</span>'
        for v in legend_stops(scale)
    )
    return (f'<div class="legend">Δ<sub>t</sub> = log Q − log P (teacher − student): '
            f'<b style="color:rgb(214,39,40)">teacher disagrees</b> {sw} '
            f'<b style="color:rgb(44,160,44)">teacher agrees</b> '
            f'(nats; saturates at ±{scale:.3g}; grey = no Δ). Hover a token for its values.</div>')


def _flags(row: dict) -> str:
    return ",".join(n for k, n in (("leaks_answer", "leak"), ("suspected_false_negative", "fn"),
                                   ("critique_error", "err")) if row.get(k))


def _list_table(rows: list[dict], anchors: dict[str, int]) -> str:
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in (
        ("rollout", "l"), ("prompt", "l"), ("r", ""), ("reason", "l"), ("fb", "l"), ("flags", "l"),
        ("Δ-gap", ""), ("len", ""), ("A", ""), ("|Â|", "")))
    body = []
    for r in rows:
        rid = _e(r["rollout_id"])
        link = f'<a href="#s{anchors[r["rollout_id"]]}">{rid}</a>' if r["rollout_id"] in anchors else rid
        body.append(
            f'<tr><td class="l">{link}</td><td class="l">{_e(r["prompt_id"])}</td><td>{_n(r["reward"], ".0f")}</td>'
            f'<td class="l">{_e(r["reason"])}</td><td class="l">{_n(r["has_feedback"])}</td>'
            f'<td class="l flag">{_flags(r)}</td><td>{_n(r["delta_gap"], "+.3f")}</td><td>{_n(r["length"])}</td>'
            f'<td>{_n(r["group_advantage"], "+.2f")}</td><td>{_n(r["adv_abs_mean"])}</td></tr>'
        )
    return f'<table class="list"><tr>{head}</tr>{"".join(body)}</table>'


def _tokens(d: dict, scale: float) -> str:
    out = []
    for t in d["tokens"]:
        shown = f"{t['id']} " if t["text"] is None else visible(t["text"]).replace("\n", "↵\n")
        label = repr(t["text"])[1:-1] if t["text"] is not None else f"id {t['id']}"
        title = (f"#{t['pos']} {visible(label)}\nlog P {_n(t['logp'], '+.4f')}\nlog Q {_n(t['logq'], '+.4f')}\n"
                 f"Δ {_n(t['delta'], '+.4f')}\nÂ {_n(t['adv'], '+.4f')}")
        out.append(f'<span style="background:{_rgb(delta_rgb(t["delta"], scale))};color:{_rgb(text_rgb(t["delta"], scale))}" '
                   f'title="{html.escape(title, quote=True)}">{html.escape(shown)}</span>')
    return f'<div class="tokens">{"".join(out)}</div>'


def _kv(pairs) -> str:
    return '<div class="kv">' + "".join(f"<b>{html.escape(k)}</b> {v}" for k, v in pairs) + "</div>"


def _card(d: dict, i: int, scale: float) -> str:
    ro, st, miss, p, v, c, a = (d["rollout"], d["stats"], d["missing"], d["prompt"], d["verdict"], d["critique"],
                                d["advantage"])
    parts = [f'<div class="card" id="s{i}"><h2>rollout {_e(d["rollout_id"])}</h2>',
             _kv([("prompt", _e(ro["prompt_id"])), ("sample", _n(ro["sample_idx"])), ("iteration", _n(ro["iteration"])),
                  ("finish", _e(ro["finish_reason"])), ("tokens", _n(st["length"]))])]

    def section(name, body, note=None):
        parts.append(f"<h3>{name}</h3>")
        if body is None:
            parts.append(f'<div class="missing">{_e(note)}</div>' if note else '<div class="kv">(none)</div>')
        else:
            parts.append(f'<div class="pre">{_e(body)}</div>')

    section("Problem", p["problem"] if p else None, f"prompts missing — {miss.get('prompts')}")
    section("Gold answer", p["answer"] if p else None, f"prompts missing — {miss.get('prompts')}")
    parts.append("<h3>Verdict</h3>")
    if v is None:
        parts.append(f'<div class="missing">verdicts missing — {_e(miss.get("verdicts"))}</div>')
    else:
        parts.append(_kv([("reward", _n(v["reward"], ".0f")), ("correct", _n(v["is_correct"])), ("reason", _e(v["reason"])),
                          ("extracted", _e(v["extracted_answer"])), ("verifier", _e(v["verifier"]))]))
    if c is None:
        section("Critique", None, f"critiques missing — {miss.get('critiques')}")
    else:
        parts.append("<h3>Critique</h3>")
        parts.append(_kv([("mode", _e(c["mode"])), ("critic", _e(c["critic"])), ("template", _e(c["template"])),
                          ("leaks answer", _n(c["leaks_answer"])),
                          ("suspected false negative", _n(c["suspected_false_negative"]))]))
        if c["error"] is not None:
            parts.append(f'<div class="missing">critic error: {_e(c["error"])}</div>')
        parts.append(f'<div class="pre">{_e(c["feedback_text"])}</div>' if c["feedback_text"] is not None
                     else '<div class="kv">(no feedback: the teacher is the student for this row)</div>')
        section("Teacher context (exact)", c["teacher_prompt"])
        for j, (kind, text) in enumerate(zip(c.get("extra_teacher_kinds") or [], c.get("extra_teacher_prompts") or [])):
            section(f"Extra teacher context {j + 1}: {_e(kind)} (exact)", text, "(no text: scored as the student)")
    parts.append("<h3>Signals</h3>")
    parts.append(_kv([(k, _e(v)) for k, v in signal_pairs(d)]))
    for name in ("scores", "advantages"):
        if name in miss:
            parts.append(f'<div class="missing">{name} missing — {_e(miss[name])}</div>')
    parts.append("<h3>Response</h3>")
    if d["tokenizer"] is None:
        parts.append('<div class="kv">(token ids; pass --policy DIR for token text)</div>')
    parts.append(_tokens(d, scale))
    if d["tokenizer"] is None:
        section("Response text (as stored)", ro["response_text"])
    parts.append("</div>")
    return "".join(parts)


def render_page(title: str, details: list[dict], rows: list[dict] | None = None, notes: list[str] = (),
                scale: float = DEFAULT_SCALE) -> str:
    """The page: ``title``, ``notes`` (plain lines), the list ``rows`` if given, then the cards."""
    body = [f"<h1>{_e(title)}</h1>"]
    body += [f'<div class="kv">{_e(n)}</div>' for n in notes]
    body.append(_legend(scale))
    if rows:
        order = {r["rollout_id"]: i for i, r in enumerate(rows)}
        details = sorted(details, key=lambda d: order.get(d["rollout_id"], len(order)))
        body.append(_list_table(rows, {d["rollout_id"]: i for i, d in enumerate(details)}))
    body += [_card(d, i, scale) for i, d in enumerate(details)]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_e(one_line(title, 200))}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


def _nums(xs, f: str) -> str:
    return " ".join("–" if x is None else format(x, f) for x in xs)


def render(view: View, opts: RenderOptions) -> str:
    """The page of ``view``: one card, or the page of rows (with the group's statistics) and a card each."""
    samples = view.samples()
    scale = resolve_scale(opts.scale, samples)
    root = view.it.root
    if view.kind == "sample":
        return render_page(f"{root}: {view.rollout_id}", samples, scale=scale)
    res = view.page
    notes = [f"{res.total} of {res.total_rows} rows match; showing {len(res.rows)} from row {res.offset + 1}"]
    notes += [f"{name}: missing — {why}" for name, why in view.it.missing.items()]
    title = str(root)
    if view.kind == "group":
        g, st = view.group, view.group["stats"]
        title += f": group {g['prompt_id']}"
        notes.insert(0, f"group {g['prompt_id']}: {st['size']} samples; rewards {_nums(st['rewards'], '.0f')}; "
                        f"A {_nums(st['group_advantages'], '+.2f')}; coverage "
                        + ("–" if st["coverage"] is None else f"{st['coverage']:.0%}"))
    return render_page(title, samples, rows=res.rows, notes=notes, scale=scale)
