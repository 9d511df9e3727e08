"""The one "final answer of a text" extractor (tcrlsd.answers) and that every stage uses it."""

from __future__ import annotations

import pytest

from tcrlsd.answers import final_answer, last_boxed, last_number

# The case issue 10 names: three extractors used to give None, "1" and "1" here.
HEDGED = "\\boxed{1} and \\boxed{2"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{5}$.", "5"),
        ("5 + 3 = 8\nThe answer is \\boxed{8}.", "8"),
        # nested braces: the box ends at its own closing brace
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("$\\boxed{\\text{(A)}, \\{1, 2\\}}$", "\\text{(A)}, \\{1, 2\\}"),  # escaped braces are not groups
        # several boxes: the last one (verl's convention; MATH500 test/number_theory/459 needs it)
        ("first $\\boxed{3}$, then $\\boxed{4}$", "4"),
        ("\\boxed{1} then \\fbox{2}", "2"),
        # a box inside a box belongs to the outer one
        ("$\\boxed{1 + \\boxed{2}}$", "1 + \\boxed{2}"),
        # no braces (MATH train/algebra/24014 writes this): up to the next $ or line end
        ("our answer is $\\boxed 2$.", "2"),
        ("x = \\boxed 9\nnext line", "9"),
        ("\\boxed {x}", "x"),  # space before the brace
        ("\\fbox{7}", "7"),
        ("$\\boxed{ 12 }$", "12"),  # stripped
        ("$\\boxed{}$", ""),  # present but empty: the caller treats it as no answer
        # the last box never closed (truncated or hedged): no answer, never the earlier one
        (HEDGED, None),
        ("\\boxed{3} then a broken $\\boxed{4", None),
        ("$\\boxed{unclosed", None),
        ("no box here, answer 5", None),
        ("\\boxed", None),
        ("\\boxedsomething{3}", None),  # another macro, not \boxed
        ("\\boxedx{3}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_number_and_final_answer():
    assert last_number("it costs $1,234.50, not 7") == "7"
    assert last_number("total 1,234.50") == "1,234.50"
    assert last_number("no digits") is None
    assert final_answer("so 3 + 4 = 7", number_fallback=True) == "7"  # no box at all: the last number
    assert final_answer("so 3 + 4 = 7") is None
    assert final_answer("\\boxed{6}, or 7", number_fallback=True) == "6"
    # an unclosed box is no answer, even for the number fallback (the 2 was abandoned or cut off)
    assert final_answer(HEDGED, number_fallback=True) is None


def test_long_text_is_linear():
    import time

    text = "x" * 1_000_000 + "\\boxed{" + "{" * 10 + "}" * 10 + "7}" + " y" * 100_000
    start = time.perf_counter()
    assert last_boxed(text) == "{" * 10 + "}" * 10 + "7"
    assert last_boxed("\\boxed{" + "a" * 1_000_000) is None
    assert time.perf_counter() - start < 5.0


def test_every_stage_uses_the_one_extractor():
    """The hedged text has one answer (none) in prepare, warmstart, verify and critique."""
    import tcrlsd.answers as answers
    import tcrlsd.critique.stage
    import tcrlsd.prepare
    import tcrlsd.prepare.sources
    import tcrlsd.reference_critic
    import tcrlsd.verify.graders
    import tcrlsd.verify.pool
    import tcrlsd.warmstart.accuracy

    for mod in (tcrlsd.warmstart.accuracy, tcrlsd.verify.pool, tcrlsd.critique.stage, tcrlsd.reference_critic):
        assert mod.last_boxed is answers.last_boxed, mod.__name__
    # gold answers and the math_verify grader read the final boxes (an answer of several parts),
    # whose last one is last_boxed's (tests/test_grader_corpus.py checks that on random texts)
    assert tcrlsd.verify.graders.final_boxes is answers.final_boxes
    assert tcrlsd.verify.graders.final_boxed_answer is answers.final_boxed_answer
    assert tcrlsd.prepare.sources.final_boxed_answer is answers.final_boxed_answer
    assert tcrlsd.prepare.extract_boxed is answers.final_boxed_answer
    # verify: both graders see no answer (the string grader does not fall back to the trailing 2)
    from tcrlsd.verify.graders import GradeLimits, grade_math_verify, grade_string

    assert grade_string(HEDGED, "2", GradeLimits()).reason == "no_answer"
    assert grade_string(HEDGED, "1", GradeLimits()).reason == "no_answer"
    assert grade_math_verify(HEDGED, "1", GradeLimits()).reason == "no_answer"
    # prepare: a MATH solution ending that way has no gold answer (skipped and counted)
    from tcrlsd.prepare.params import SourceParams
    from tcrlsd.prepare.sources import RawRecord, math_row

    src = SourceParams(name="math", format="math", split="train", path="x.jsonl")
    row = math_row(src, "x", RawRecord(0, "x.jsonl:1", {"problem": "p", "solution": HEDGED, "level": "Level 1",
                                                           "type": "Algebra"}))
    assert row.answer is None
    # critique: the reference critic reads no boxed answer
    from tcrlsd.reference_critic import reference_critique

    reply = reference_critique("3 + 4 = 7\n" + HEDGED.replace("1", "7"), "3 + 4 = 7\nThe answer is \\boxed{7}.")
    assert "not written in \\boxed{}" in reply.text
