"""Does the warm start's teacher differ from its student only where the feedback says? (issue 20)

    python bench/teacher_contexts.py --policy models/policy-0000 --prompts data/prompts.parquet \
        [--split val] [--samples 8] [--max-prompts 200] [--seed 0]

For each held-out prompt, the policy samples (temperature 1, as in RL) in three contexts, with the
same seeds:

- student:  the student prompt;
- blank:    the critique stage's teacher context with the content-free feedback
            ("There is an error in this attempt.", ``critique.control: blank``);
- critique: the same context with the reference critic's critique of the student's own first wrong
            sample of that prompt (prompts where every student sample was right are left out of it).

Printed per context: accuracy (sampled, and greedy), and the share of carry/borrow steps written
right, split at the step the critique names (the step index k of the critique of that prompt's
wrong sample) and at every other carry. A fair teacher (tcrlsd/warmstart/contexts.py) gives blank
= student everywhere, and critique = student except at step k, where it writes the carry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def carry_steps(text: str) -> list[tuple[int, bool]]:
    """(step index, written right) for each step of ``text`` that needs a carry or borrow."""
    from tcrlsd.reference_critic import parse_steps
    from tcrlsd.warmstart.demonstrator import needs_carry

    return [(i, s.result == _apply(s.left, s.op, s.right)) for i, s in enumerate(parse_steps(text, limit=16))
            if needs_carry(s.left, s.op, s.right)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from tcrlsd.answers import last_boxed
    from tcrlsd.artifacts import read_artifact
    from tcrlsd.generate.backends import derive_seed, make_backend
    from tcrlsd.generation import SamplingConfig
    from tcrlsd.policy import encode_prompt, load_tokenizer
    from tcrlsd.reference_critic import CONTENT_FREE_FEEDBACK, named_step, reference_critique
    from tcrlsd.templates import default_templates_dir, load_template, render_teacher_prompt, split_student_prompt

    torch.set_num_threads(args.threads)
    rows = [r for r in read_artifact(args.prompts, "prompts").to_pylist() if r["split"] == args.split]
    rows = sorted(rows, key=lambda r: r["prompt_id"])[: args.max_prompts]
    tok = load_tokenizer(args.policy)
    backend = make_backend("transformers", str(args.policy), device="cpu", dtype="auto")
    template = load_template(default_templates_dir(), "teacher-critique")

    def teacher(r, feedback: str) -> str:
        prefix, problem, instruction = split_student_prompt(r["prompt"], r["problem"])
        return render_teacher_prompt(template, prefix, problem, instruction, feedback)

    def run(texts: list[str], n: int, temperature: float, tag: str):
        ids = [encode_prompt(tok, t) for t in texts]
        return backend.generate(ids, n, SamplingConfig(temperature, 1.0, 96, derive_seed(args.seed, tag)))

    student = run([r["prompt"] for r in rows], args.samples, 1.0, "sampled")
    named: dict[int, int] = {}  # prompt index -> step index (0-based) the critique names
    critique_texts: dict[int, str] = {}
    for i, (r, group) in enumerate(zip(rows, student)):
        wrong = next((c.text for c in group if last_boxed(c.text) != r["answer"]), None)
        if wrong is None:
            continue
        text = reference_critique(wrong, r["solution"]).text
        k = named_step(text)
        if text and k:
            critique_texts[i], named[i] = text, k - 1
    crit_idx = sorted(critique_texts)
    contexts = {
        "student": (list(range(len(rows))), student, [r["prompt"] for r in rows]),
        "blank": (list(range(len(rows))), None, [teacher(r, CONTENT_FREE_FEEDBACK) for r in rows]),
        "critique": (crit_idx, None, [teacher(rows[i], critique_texts[i]) for i in crit_idx]),
    }
    print(f"{len(rows)} {args.split} prompts x {args.samples} samples (temperature 1); critique context on the "
          f"{len(crit_idx)} prompts with a wrong student sample whose critique names a step")
    print("| context | prompts | sampled accuracy | greedy accuracy | carries right: all | at the named step "
          "| at other carries |")
    print("|---|---|---|---|---|---|---|")
    for name, (idx, sampled, texts) in contexts.items():
        if not idx:
            print(f"| {name} | 0 | | | | | |")
            continue
        if sampled is None:
            sampled = run(texts, args.samples, 1.0, "sampled")
        else:
            sampled = [sampled[i] for i in idx]
        greedy = run(texts, 1, 0.0, "greedy")
        acc = statistics.mean(last_boxed(c.text) == rows[i]["answer"] for i, g in zip(idx, sampled) for c in g)
        gacc = statistics.mean(last_boxed(g[0].text) == rows[i]["answer"] for i, g in zip(idx, greedy))
        at, other, every = [], [], []
        for i, g in zip(idx, sampled):
            for c in g:
                for k, right in carry_steps(c.text):
                    every.append(right)
                    if i in named:
                        (at if k == named[i] else other).append(right)
        share = lambda v: f"{100 * statistics.mean(v):.1f}% (n={len(v)})" if v else ""  # noqa: E731
        print(f"| {name} | {len(idx)} | {100 * acc:.1f}% | {100 * gacc:.1f}% | {share(every)} | {share(at)} "
              f"| {share(other)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
