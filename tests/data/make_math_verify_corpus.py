"""Regenerate ``tests/data/math_verify_corpus.jsonl`` from a checkout of huggingface/Math-Verify.

The corpus is the gold/prediction pairs (with the expected verdict) that Math-Verify's own test
suite checks, turned into ``tcrlsd grade --jsonl`` input: each line has ``response`` (the test's
prediction put in ``\\boxed{...}``, see :func:`boxed_response`) and ``gold`` (the test's gold as
written), plus ``id`` (file::test[row]), ``prediction`` (as written in the test) and ``expected``
(1 = the test asserts the pair is equivalent, 0 = not).

How to regenerate (offline once the checkout exists)::

    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify
    git -C /tmp/Math-Verify checkout 5d148cfaaf99214c2e4ffb4bc497ab042c592a7a
    python tests/data/make_math_verify_corpus.py /tmp/Math-Verify \
        --out tests/data/math_verify_corpus.jsonl

``--commit SHA`` names the commit when the checkout is not a git work tree (an exported tree).
The script never imports or runs Math-Verify's test code: it reads the test files with
:mod:`ast` and takes only literal parameter tables, so the corpus is data, not code.

Which test rows are taken. A test case is kept when it is a ``gold``/``pred``/expected triple that
Math-Verify compares with its default comparison settings and with LaTeX extraction enabled:

- the check is ``compare_strings(gold, pred, ...)`` (their helper in ``tests/test_all.py``) or
  ``verify(parse(gold), parse(pred))``;
- float rounding is the default 6 digits, ``strict`` is True and ``allow_set_relation_comp`` is
  False (tcrlsd grades with these defaults; a row testing another setting is not about the
  grader's default behaviour);
- ``"latex"`` is among its match types (rows checked with plain-expression extraction only test
  free-text number extraction, which a boxed answer does not exercise).

At commit 5d148cf this keeps 242 of the 269 gold/prediction rows. The rest are listed with their
reason on stderr.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}
SETTINGS = tuple(DEFAULTS)
GOLD_NAMES = ("gold",)
PRED_NAMES = ("pred",)
EXPECTED_NAMES = ("expected", "result")


class CorpusError(Exception):
    pass


def _parametrize(func: ast.FunctionDef) -> tuple[list[str], ast.expr] | None:
    """(argument names, the node of the value table) of ``@pytest.mark.parametrize``, or None."""
    for dec in func.decorator_list:
        if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "parametrize"
                and len(dec.args) >= 2):
            names = ast.literal_eval(dec.args[0])
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            return list(names), dec.args[1]
    return None


def _helper_defaults(module: ast.Module) -> dict | None:
    """The keyword defaults of a ``compare_strings`` defined in this module, or None."""
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "compare_strings":
            args = node.args.args
            defaults = node.args.defaults
            out = {}
            for arg, default in zip(args[len(args) - len(defaults):], defaults):
                out[arg.arg] = ast.literal_eval(default)
            return out
    return None


def _check_call(func: ast.FunctionDef) -> tuple[str, dict[str, ast.expr]] | None:
    """How the test compares: ('compare_strings', keyword nodes) or ('verify', {}), else None."""
    for node in ast.walk(func):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "compare_strings":
            return "compare_strings", {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if node.func.id == "verify" and not node.keywords and all(
            isinstance(a, ast.Call) and isinstance(a.func, ast.Name) and a.func.id == "parse" and len(a.args) == 1
            and not a.keywords for a in node.args
        ):
            return "verify", {}
    return None


def _setting(value_node: ast.expr | None, default, row: dict):
    """A comparison setting: a literal, a test parameter of this row, or the helper's default."""
    if value_node is None:
        return default
    if isinstance(value_node, ast.Name) and value_node.id in row:
        return row[value_node.id]
    return ast.literal_eval(value_node)


def extract(tests_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(kept rows, [(id, why skipped)]) from every ``test_*.py`` of ``tests_dir``, in file order."""
    files = sorted(tests_dir.glob("test_*.py"))
    if not files:
        raise CorpusError(f"{tests_dir}: no test_*.py files (is this Math-Verify's tests/ folder?)")
    helper = None
    for f in files:
        helper = helper or _helper_defaults(ast.parse(f.read_text(encoding="utf-8")))
    if helper is None:
        raise CorpusError(f"{tests_dir}: no compare_strings helper found; the test layout changed")
    kept, skipped = [], []
    for f in files:
        module = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for func in module.body:
            if not isinstance(func, ast.FunctionDef) or not func.name.startswith("test_"):
                continue
            spec = _parametrize(func)
            if spec is None:
                continue
            names, table = spec
            gold_key = next((n for n in names if n in GOLD_NAMES), None)
            pred_key = next((n for n in names if n in PRED_NAMES), None)
            exp_key = next((n for n in names if n in EXPECTED_NAMES), None)
            if not (gold_key and pred_key and exp_key):
                continue  # not a gold/prediction comparison (e.g. extraction-only tests)
            check = _check_call(func)
            if not isinstance(table, (ast.List, ast.Tuple)):
                raise CorpusError(f"{f.name}::{func.name}: parameter table is not a literal list")
            for index, row_node in enumerate(table.elts):
                case_id = f"{f.name}::{func.name}[{index}]"
                try:
                    values = ast.literal_eval(row_node)
                except ValueError:
                    skipped.append((case_id, "parameters are not literals (computed in the test file)"))
                    continue
                row = dict(zip(names, values))
                if check is None:
                    skipped.append((case_id, "comparison is neither compare_strings nor verify(parse, parse)"))
                    continue
                kind, kws = check
                if kind == "verify":
                    settings = dict(DEFAULTS)
                else:
                    settings = {k: _setting(kws.get(k), helper.get(k, DEFAULTS[k]), row) for k in SETTINGS}
                why = []
                if "latex" not in settings["match_types"]:
                    why.append(f"match_types={settings['match_types']} (no LaTeX extraction)")
                for k in ("precision", "strict", "allow_set_relation_comp"):
                    if settings[k] != DEFAULTS[k]:
                        why.append(f"{k}={settings[k]!r} (default {DEFAULTS[k]!r})")
                if why:
                    skipped.append((case_id, "; ".join(why)))
                    continue
                gold, pred, expected = row[gold_key], row[pred_key], int(row[exp_key])
                response = boxed_response(pred)
                kept.append({"id": case_id, "response": response, "gold": gold, "prediction": pred,
                             "expected": expected})
    return kept, skipped


_DOLLAR_RE = re.compile(r"(?<!\\)\$")
# Math delimiters a whole prediction may be wrapped in, longest opener first ($$ before $).
_SPANS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def boxed_response(pred: str) -> str:
    """The test's prediction as a boxed model answer.

    - Already holds a ``\\boxed``: used as written (these are whole model outputs).
    - One math span (``$x$``, ``$$x$$``, ``\\(x\\)``, ``\\[x\\]``): the box goes inside the
      delimiters, ``$\\boxed{x}$``, the way a model writes a boxed answer.
    - Anything else (a bare answer such as ``28 percent``, or a sentence with math in it such as
      ``Answer $ 9 $``): the whole text in one box.
    """
    if "\\boxed" in pred:
        return pred
    s = pred.strip()
    for opener, closer in _SPANS:
        if len(s) >= len(opener) + len(closer) and s.startswith(opener) and s.endswith(closer):
            inner = s[len(opener):len(s) - len(closer)]
            nested = _DOLLAR_RE.search(inner) if opener.startswith("$") else (opener in inner or closer in inner)
            if not nested and inner.strip():
                return opener + "\\boxed{" + inner.strip() + "}" + closer
            break
    return "\\boxed{" + pred + "}"


def _commit_of(checkout: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="a checkout of huggingface/Math-Verify (its tests/ folder is read)")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    ap.add_argument("--commit", help="commit of the checkout (default: git rev-parse HEAD in it)")
    args = ap.parse_args(argv)
    commit = args.commit or _commit_of(args.checkout)
    if not commit:
        print(f"error: {args.checkout} is not a git work tree; give --commit SHA", file=sys.stderr)
        return 2
    try:
        kept, skipped = extract(args.checkout / "tests")
    except (CorpusError, OSError, SyntaxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in kept:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    for case_id, why in skipped:
        print(f"skipped {case_id}: {why}", file=sys.stderr)
    print(f"{len(kept)} pairs written to {args.out} (commit {commit}); {len(skipped)} skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
