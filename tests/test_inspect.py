"""`tcrlsd inspect` through its CLI on a fixture iteration written with the schemas.

The fixture: 3 prompts x 4 samples, a byte-level BPE tokenizer (tokenizers only) whose ids are the
real response_token_ids, sharded rollouts and critiques, scores in tiny row groups (so one-row
lookups cross row groups). One response, its critique and its problem carry injection text:
rich markup, ANSI SGR, an OSC 8 hyperlink, a C1 CSI, a bidi override and <script>.
Expected values (filters, sort orders, Δ-gaps) are recomputed here from the written arrays.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tcrlsd.artifacts import write_artifact, write_table
from tcrlsd.cli import app
from tcrlsd.schemas import schema_for, validate

INJECT = "[bold red]x[/] \x1b[31mRED\x1b[0m \x1b]8;;http://evil\x07link\x1b]8;;\x07 \x9b2J \u202eevil <script>alert(1)</script>"
REPO = Path(__file__).resolve().parents[1]

# (prompt, sample) -> (reason, feedback?, row Δ offset, flags)
VERDICT = {
    ("p0", 0): "correct", ("p0", 1): "correct", ("p0", 2): "incorrect", ("p0", 3): "no_answer",
    ("p1", 0): "correct", ("p1", 1): "incorrect", ("p1", 2): "incorrect", ("p1", 3): "incorrect",
    ("p2", 0): "correct", ("p2", 1): "correct", ("p2", 2): "correct", ("p2", 3): "correct",
}
ROW_DELTA = {"p0#2": -1.5, "p1#1": -0.5, "p1#2": -2.0, "p1#3": 0.3}
FEEDBACK = {"p0#2": "Check the subtraction in step 2; the result is 7.", "p1#1": "Step 1 multiplies instead of adding.",
            "p1#2": "Your answer ignores the last step. " + INJECT, "p1#3": "Looks right to me actually."}


def _tokenizer(texts, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def build_iteration(root: Path) -> dict:
    """Write data/prompts.parquet, data/iter-0000/* and models/tiny/tokenizer.json under ``root``."""
    rng = np.random.default_rng(0)
    problems = {"p0": "Start with 4. Add 3. What is the result?", "p1": "Compute 3 * 4. " + INJECT,
                "p2": "What is 1 + 2?"}
    answers = {"p0": "7", "p1": "12", "p2": "3"}
    responses = {}
    for (p, k), reason in VERDICT.items():
        rid = f"{p}#{k}"
        body = f"Step 1: we compute carefully for sample {k}.\nStep 2: more work" + " and more" * (k + 2 * (p == "p2"))
        responses[rid] = (body + f". The answer is \\boxed{{{answers[p] if reason == 'correct' else 5}}}."
                          if reason != "no_answer" else body + ".")
    responses["p1#2"] = "I think " + INJECT + " so \\boxed{5}"
    tok = _tokenizer(list(responses.values()) + list(problems.values()) + list(FEEDBACK.values()),
                     root / "models" / "tiny")
    data = root / "data"
    prompts = pa.table({
        "prompt_id": list(problems), "split": ["train"] * 3, "problem": list(problems.values()),
        "prompt": [f"Q: {v}\nA:" for v in problems.values()], "answer": list(answers.values()),
        "solution": [None] * 3, "source": ["synthetic"] * 3, "level": pa.array([1, 2, None], pa.int32()),
        "subject": [None] * 3,
    })
    write_artifact(prompts, data / "prompts.parquet", "prompts")
    it = data / "iter-0000"
    rows, verdicts, crits, scores, advs = [], [], [], [], []
    for p in ("p0", "p1", "p2"):
        rewards = np.array([1.0 if VERDICT[(p, k)] == "correct" else 0.0 for k in range(4)])
        A = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)
        for k in range(4):
            rid = f"{p}#{k}"
            ids = tok.encode(responses[rid]).ids
            rows.append(dict(rollout_id=rid, prompt_id=p, sample_idx=k, iteration=0, prompt_token_ids=[1, 2, 3],
                             response_token_ids=ids, response_text=responses[rid],
                             finish_reason="length" if rid == "p0#3" else "stop", sampler_logprobs=[-1.0] * len(ids)))
            reason = VERDICT[(p, k)]
            verdicts.append(dict(rollout_id=rid, reward=float(reason == "correct"), is_correct=reason == "correct",
                                 extracted_answer=None if reason == "no_answer" else ("5" if reason != "correct" else answers[p]),
                                 reason=reason, verifier="math_verify"))
            fb = FEEDBACK.get(rid)
            crits.append(dict(rollout_id=rid, mode="critique", critic="reference", feedback_text=fb, template="v1",
                              teacher_prompt=None if fb is None else f"Problem: {problems[p]}\nFeedback: {fb}\nAnswer:",
                              error="critic timed out after 3 tries" if rid == "p0#3" else None,
                              leaks_answer=rid == "p0#2", suspected_false_negative=rid == "p1#3"))
            logp = -rng.uniform(0.05, 3.0, len(ids)).astype(np.float32)
            delta = (ROW_DELTA.get(rid, 0.0) + (rng.uniform(-1, 1, len(ids)) if fb else np.zeros(len(ids)))).astype(np.float32)
            logq = (logp + delta).astype(np.float32) if fb else logp
            scores.append(dict(rollout_id=rid, student_logprobs=logp.tolist(), teacher_logprobs=logq.tolist(),
                               teacher_checkpoint="models/tiny"))
            d = logq.astype(np.float64) - logp
            advs.append(dict(rollout_id=rid, group_advantage=float(A[k]),
                             advantages=(A[k] * 0.7 + 0.3 * d).astype(np.float32).tolist(), estimator="rlsd_add"))

    def table(name, rs):
        return validate(pa.Table.from_pylist(rs, schema=schema_for(name)), name)

    write_table(table("rollouts", rows[:8]), it / "rollouts" / "part-00000.parquet", "rollouts")
    write_table(table("rollouts", rows[8:]), it / "rollouts" / "part-00001.parquet", "rollouts")
    write_artifact(table("verdicts", verdicts), it / "verdicts.parquet", "verdicts")
    for i in range(3):
        write_table(table("critiques", crits[4 * i: 4 * i + 4]), it / "critiques" / f"part-{i:05d}.parquet", "critiques")
    (it / "critiques" / "_manifest.json").write_text(json.dumps({"artifact": "critiques", "num_parts": 3}))
    (it / "scores").mkdir()
    pq.write_table(table("scores", scores), it / "scores" / "part-00000.parquet", row_group_size=2)
    write_artifact(table("advantages", advs), it / "advantages.parquet", "advantages")
    return {"root": root, "iter": it, "rows": rows, "verdicts": verdicts, "crits": crits, "scores": scores,
            "advs": advs, "problems": problems}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_iteration(tmp_path_factory.mktemp("inspect"))


def run(*args, env=None):
    res = CliRunner().invoke(app, ["inspect", *map(str, args)], env=env)
    return res


def jsonl(*args) -> list[dict]:
    res = run(*args, "--format", "jsonl")
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines()]


def _ids(rows):
    return [r["rollout_id"] for r in rows]


def _gap(fx, rid):
    s = next(x for x in fx["scores"] if x["rollout_id"] == rid)
    return float(np.mean(np.array(s["teacher_logprobs"], np.float64)) - np.mean(np.array(s["student_logprobs"], np.float64)))


ALL = [f"{p}#{k}" for p in ("p0", "p1", "p2") for k in range(4)]


# ----------------------------------------------------------------------------- the list


def test_list_table_shows_every_row_and_field(fx):
    res = run(fx["iter"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    for rid in ALL:
        assert rid in out
    assert "12 matching (12 in the iteration)" in out
    line = next(l for l in out.splitlines() if "p0#2" in l)  # leak flag, feedback, Δ-gap, length
    assert "leak" in line and "yes" in line and f"{_gap(fx, 'p0#2'):+.3f}" in line
    assert str(len(fx["rows"][2]["response_token_ids"])) in line
    assert "fn" in next(l for l in out.splitlines() if "p1#3" in l)
    assert "err" in next(l for l in out.splitlines() if "p0#3" in l)


def test_list_jsonl_fields_match_the_data(fx):
    rows = jsonl(fx["iter"])
    assert _ids(rows) == ALL
    for r, ro, v, a in zip(rows, fx["rows"], fx["verdicts"], fx["advs"]):
        assert r["length"] == len(ro["response_token_ids"])
        assert r["reward"] == v["reward"] and r["reason"] == v["reason"]
        assert r["delta_gap"] == pytest.approx(_gap(fx, r["rollout_id"]), abs=1e-5)
        assert r["adv_abs_mean"] == pytest.approx(np.mean(np.abs(a["advantages"])), abs=1e-6)
        assert r["group_advantage"] == pytest.approx(a["group_advantage"])
        assert r["has_feedback"] == (r["rollout_id"] in FEEDBACK)


@pytest.mark.parametrize("args, expected", [
    (["--correct"], [r for r in ALL if VERDICT[(r[:2], int(r[-1]))] == "correct"]),
    (["--incorrect"], [r for r in ALL if VERDICT[(r[:2], int(r[-1]))] != "correct"]),
    (["--feedback"], sorted(FEEDBACK)),
    (["--no-feedback"], [r for r in ALL if r not in FEEDBACK]),
    (["--reason", "no_answer"], ["p0#3"]),
    (["--reason", "no_answer", "--reason", "correct"], ["p0#0", "p0#1", "p0#3", "p1#0", "p2#0", "p2#1", "p2#2", "p2#3"]),
    (["--prompt", "p1"], ["p1#0", "p1#1", "p1#2", "p1#3"]),
    (["--flagged"], ["p0#2", "p1#3"]),
    (["--search", "SUBTRACTION"], ["p0#2"]),  # in the critique only, any case
    (["--search", "<script>"], ["p1#2"]),  # in the response and the critique
    (["--incorrect", "--feedback", "--prompt", "p1"], ["p1#1", "p1#2", "p1#3"]),
])
def test_filters(fx, args, expected):
    assert _ids(jsonl(fx["iter"], *args)) == expected


@pytest.mark.parametrize("key, desc", [("delta", False), ("delta", True), ("length", True), ("adv", False)])
def test_sorts(fx, key, desc):
    def value(rid):
        i = ALL.index(rid)
        if key == "delta":
            return _gap(fx, rid)
        if key == "length":
            return len(fx["rows"][i]["response_token_ids"])
        return float(np.mean(np.abs(np.array(fx["advs"][i]["advantages"], np.float64))))

    got = _ids(jsonl(fx["iter"], "--sort", key, *(["--desc"] if desc else [])))
    vals = [value(r) for r in got]
    assert sorted(got) == sorted(ALL)
    assert all((a >= b - 1e-6) if desc else (a <= b + 1e-6) for a, b in zip(vals, vals[1:])), vals
    if key == "delta" and not desc:
        assert got[0] == "p1#2"  # the row the teacher disagrees with most


def test_paging_and_limit(fx):
    assert _ids(jsonl(fx["iter"], "--limit", "5", "--page", "2")) == ALL[5:10]
    assert _ids(jsonl(fx["iter"], "--limit", "5", "--page", "3")) == ALL[10:]
    res = run(fx["iter"], "--limit", "5", "--page", "2")
    assert res.exit_code == 0 and "rows 6–10 of 12 matching" in res.stdout and "--page 3" in res.stdout
    assert "p0#4" not in res.stdout and "p2#3" not in res.stdout


def test_table_to_a_file_is_plain_text(fx, tmp_path):
    out = tmp_path / "list.txt"
    res = run(fx["iter"], "--out", out, env={"FORCE_COLOR": "1"})
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "\x1b" not in text and all(rid in text for rid in ALL) and "12 matching" in text


def test_bad_options_are_clear_errors(fx):
    for args, msg in ((["--sort", "size"], "unknown sort key 'size'"), (["--id", "nope"], "no rollout with rollout_id 'nope'"),
                      (["--prompt", "p9"], "no rollouts with prompt_id 'p9'"), (["--format", "pdf"], "--format must be"),
                      (["--id", "p0#1", "--prompt", "p0"], "not both"), (["--scale", "0"], "--scale must be > 0"),
                      (["--scale", "big"], "--scale must be a number of nats or 'auto'")):
        res = run(fx["iter"], *args)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)


# ----------------------------------------------------------------------------- one sample, one group


def test_one_sample_terminal(fx):
    res = run(fx["iter"], "--id", "p0#2", "--tokens")  # tokenizer found from teacher_checkpoint
    assert res.exit_code == 0, res.output
    out = res.stdout
    for want in ("Start with 4. Add 3.", "Gold answer", "incorrect", "extracted 5", "Check the subtraction",
                 "Teacher context (exact)", "Feedback: Check the subtraction", "teacher disagrees", "teacher agrees",
                 "leaks answer yes", f"A {fx['advs'][2]['group_advantage']:+.4f}", "estimator rlsd_add",
                 "Step 1: we compute"):
        assert want in out, want
    assert "pass --policy" not in out  # token text, not ids


def test_group_view(fx):
    res = run(fx["iter"], "--prompt", "p1")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "group p1" in out and "rewards 1 0 0 0" in out and "coverage 75%" in out
    assert "Compute 3 * 4." in out
    A = [a["group_advantage"] for a in fx["advs"][4:8]]
    assert "A " + " ".join(f"{a:+.2f}" for a in A) in out
    assert "[bold red]x[/]" in out and "\x1b" not in out


# ----------------------------------------------------------------------------- untrusted text


def _assert_inert_terminal(raw: str):
    assert "\x1b]8;;http://evil" not in raw and "\x1b[31mRED" not in raw and "\x9b" not in raw and "\u202e" not in raw
    plain = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # rich's own styling
    assert "\x1b" not in plain
    for shown in ("[bold red]x[/]", "\\x1b[31mRED", "\\x1b]8;;http://evil\\x07", "\\x9b2J", "\\u202eevil",
                  "<script>alert(1)</script>"):
        assert shown in plain, shown


def test_injection_terminal_plain_and_coloured(fx):
    res = run(fx["iter"], "--id", "p1#2")
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout
    _assert_inert_terminal(res.stdout)
    assert res.stdout.count("[bold red]x[/]") >= 3  # problem, critique, teacher context (tokens are split)
    res = run(fx["iter"], "--id", "p1#2", env={"FORCE_COLOR": "1", "COLORTERM": "truecolor", "COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    assert "\x1b[" in res.stdout and "48;2;" in res.stdout  # coloured tokens (truecolor backgrounds)
    _assert_inert_terminal(res.stdout)
    res = run(fx["iter"], "--search", "script", env={"FORCE_COLOR": "1", "COLUMNS": "100"})
    assert res.exit_code == 0 and "\x1b]" not in res.stdout


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = set(), [], []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_html_page(fx, tmp_path):
    out = tmp_path / "page.html"
    res = run(fx["iter"], "--format", "html", "--out", out)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    p = _Tags()
    p.feed(page)
    assert p.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "div", "span", "table",
                      "tr", "th", "td", "a", "b", "sub"}, p.tags
    assert all(v.startswith("#") for k, v in p.attrs if k in ("href", "src", "action"))
    assert "default-src 'none'" in page
    assert page.count('class="card"') == 12
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "\x1b" not in page and "\x9b" not in page and "\u202e" not in page
    text = "".join(p.text)
    assert "[bold red]x[/]" in text and "\\x1b]8;;http://evil\\x07" in text
    titles = [v for k, v in p.attrs if k == "title"]
    assert len(titles) == sum(len(r["response_token_ids"]) for r in fx["rows"])
    assert all("log P" in t and "log Q" in t and "Δ" in t and "Â" in t for t in titles)
    assert "teacher disagrees" in text and "teacher agrees" in text
    res = run(fx["iter"], "--prompt", "p1", "--format", "html")  # a group: its statistics, its 4 cards
    assert res.exit_code == 0 and "rewards 1 0 0 0" in res.stdout and "coverage 75%" in res.stdout
    assert res.stdout.count('class="card"') == 4
    # one sample, no --out: the page on stdout
    res = run(fx["iter"], "--id", "p1#2", "--format", "html")
    assert res.exit_code == 0 and res.stdout.startswith("<!DOCTYPE html>") and res.stdout.count('class="card"') == 1


def test_jsonl_sample_roundtrips_text_and_tokens(fx, tmp_path):
    out = tmp_path / "s.jsonl"
    res = run(fx["iter"], "--id", "p1#2", "--format", "jsonl", "--out", out)
    assert res.exit_code == 0, res.output
    raw = out.read_text()
    assert "\x1b" not in raw and "\x9b" not in raw and "\u202e" not in raw and raw.count("\n") == 1
    (d,) = [json.loads(raw)]
    assert d["rollout"]["response_text"] == fx["rows"][6]["response_text"]  # exact text back
    assert d["critique"]["feedback_text"] == FEEDBACK["p1#2"] and d["prompt"]["problem"] == fx["problems"]["p1"]
    toks = d["tokens"]
    assert [t["id"] for t in toks] == fx["rows"][6]["response_token_ids"]
    assert "".join(t["text"] for t in toks) == fx["rows"][6]["response_text"]
    s, a = fx["scores"][6], fx["advs"][6]
    np.testing.assert_allclose([t["delta"] for t in toks],
                               np.array(s["teacher_logprobs"], np.float64) - s["student_logprobs"], atol=1e-6)
    assert [t["adv"] for t in toks] == pytest.approx(a["advantages"])
    assert d["stats"]["delta_gap"] == pytest.approx(_gap(fx, "p1#2"), abs=1e-6)
    rows = jsonl(fx["iter"], "--prompt", "p2", "--tokens")
    assert [len(r["tokens"]) for r in rows] == [len(r["response_token_ids"]) for r in fx["rows"][8:]]


# ----------------------------------------------------------------------------- missing artifacts


def test_missing_artifacts(fx, tmp_path):
    it = tmp_path / "data" / "iter-0000"
    shutil.copytree(fx["iter"], it)
    shutil.rmtree(it / "scores")
    (it / "advantages.parquet").unlink()
    (it / "critiques" / "part-00001.parquet").unlink()  # incomplete: 2 of 3 parts
    res = run(it)
    assert res.exit_code == 0, res.output
    assert "critiques: missing" in res.stdout and "1 of 3 part(s) missing" in res.stdout
    assert "scores: missing" in res.stdout and "advantages: missing" in res.stdout
    rows = jsonl(it)
    assert [r["length"] for r in rows] == [len(r["response_token_ids"]) for r in fx["rows"]]  # from token ids
    assert all(r["delta_gap"] is None and r["has_feedback"] is None for r in rows)
    assert _ids(jsonl(it, "--incorrect")) == [r for r in ALL if VERDICT[(r[:2], int(r[-1]))] != "correct"]
    res = run(it, "--id", "p1#2")  # no scores: no tokenizer found, token ids + the stored text
    assert res.exit_code == 0, res.output
    for want in ("critiques missing", "scores missing", "advantages missing", "pass --policy DIR", "Response text (as stored)"):
        assert want in res.stdout, want
    assert "prompts missing" in res.stdout  # tmp_path/data has no prompts.parquet
    res = run(it, "--id", "p1#2", "--policy", fx["root"] / "models" / "tiny", "--prompts", fx["root"] / "data" / "prompts.parquet")
    assert res.exit_code == 0 and "pass --policy" not in res.stdout and "Compute 3 * 4." in res.stdout
    res = run(it, "--feedback")
    assert res.exit_code == 2 and "--feedback/--no-feedback needs the critiques artifact" in res.output
    res = run(it, "--sort", "adv")
    assert res.exit_code == 2 and "needs the advantages artifact" in res.output
    res = run(it, "--prompt", "p0")
    assert res.exit_code == 0 and "coverage –" in res.stdout
    shutil.rmtree(it / "rollouts")
    res = run(it)
    assert res.exit_code == 2 and "no usable rollouts artifact" in res.output


def test_unreadable_or_wrong_artifacts_are_named(fx, tmp_path):
    it = tmp_path / "data" / "iter-0000"
    shutil.copytree(fx["iter"], it)
    (it / "verdicts.parquet").write_bytes(b"not parquet at all")
    res = run(it)
    assert res.exit_code == 2 and "verdicts.parquet: not a readable Parquet file (verdicts artifact)" in res.output
    v = pa.Table.from_pylist(fx["verdicts"]).drop_columns(["reason"])
    pq.write_table(v, it / "verdicts.parquet")
    res = run(it)
    assert res.exit_code == 2 and "verdicts.parquet: the verdicts artifact has no column(s) reason" in res.output


def test_token_table_escapes_token_text(fx):
    res = run(fx["iter"], "--id", "p1#2", "--tokens")
    assert res.exit_code == 0, res.output
    table = res.stdout[res.stdout.rindex(" tokens"):]  # the per-token table comes last
    esc_shown = chr(92) + "x1b"  # the four characters backslash x 1 b
    assert chr(27) not in res.stdout and esc_shown in table
    n = len(fx["rows"][6]["response_token_ids"])
    assert sum(1 for line in table.splitlines() if line.startswith("│")) == n  # one line per token


def test_inspect_imports_no_torch(fx):
    code = ("import sys; from typer.testing import CliRunner; from tcrlsd.cli import app; "
            f"r = CliRunner().invoke(app, ['inspect', {str(fx['iter'])!r}, '--id', 'p0#2']); "
            "assert r.exit_code == 0, r.output; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_scale_auto_is_the_95th_percentile_of_abs_delta(fx):
    s = fx["scores"][5]  # p1#1
    d = np.sort(np.abs(np.array(s["teacher_logprobs"], np.float64) - np.array(s["student_logprobs"], np.float64)))
    want = d[min(len(d) - 1, int(0.95 * len(d)))]
    res = run(fx["iter"], "--id", "p1#1", "--scale", "auto", "--format", "html")
    assert res.exit_code == 0, res.output
    assert f"saturates at ±{want:.3g};" in res.stdout
    res = run(fx["iter"], "--id", "p1#1", "--scale", "0.5")
    assert res.exit_code == 0 and "saturates at ±0.5 nats" in res.stdout
