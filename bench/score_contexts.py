"""The score stage with K teacher contexts per rollout: K = 1 unchanged, K = 3 about 3x the teacher work.

    python bench/score_contexts.py                      # baseline = main, K = 1 and 3, 2 threads
    python bench/score_contexts.py --baseline HEAD~3 --contexts 1,2,3 --rollouts 512

Every measurement runs ``stages/score.py`` through its CLI in a child process (the way
``bench/score_memory.py`` does: peak RSS from ``os.wait4``, wall time of the child), on the same
synthetic inputs: ``--rollouts`` rollouts of ``--prompt-tokens`` + ``--response-tokens`` random ids,
every second one with a teacher context of ~``--teacher-chars`` characters; for K > 1 each of those
rows also gets K - 1 extra contexts of the same size (``extra_teacher_prompts``, what
``critique.wrong_hints`` writes). The policy is a random Llama of bench/score.py's "small" shape
(hidden 384, 4 layers) with a small trained tokenizer.

Printed: one row per (code, K) with the child's seconds and the stage's own scoring seconds, forward tokens (from the stage's metrics), teacher
forward tokens (forward tokens minus the student's), peak RSS, and the ratios to the candidate's
K = 1; and whether the baseline's and the candidate's K = 1 scores parts are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from score_memory import run_stage  # noqa: E402  (the same child-process runner)


def make_policy(folder: Path) -> Path:
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer

    texts = ["Start with 4. Add 2. What is the result? Step 1: 4 + 2 = 6. Feedback: the second step is wrong."] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = TinyLlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=2, max_position_embeddings=2048)
    return save_policy(build_tiny_llama(tok, cfg, seed=0), tok, folder / "policy")


def make_inputs(folder: Path, n: int, vocab: int, k: int, args) -> None:
    """rollouts + critiques artifacts with K - 1 extra contexts per row with feedback (none at K = 1)."""
    import pyarrow as pa

    from tcrlsd.artifacts import write_artifact

    rng = random.Random(0)  # the same rollouts and primary contexts at every K
    ids = [f"p{i // 8}#{i % 8}" for i in range(n)]
    i32 = pa.list_(pa.int32())
    words = "Step one is wrong: four plus two is six, not seven. Check the carry. ".split()

    def text(tag: str) -> str:
        return f"Start with 4. Add 2.\n\nFeedback ({tag}):\n" + " ".join(
            rng.choice(words) for _ in range(args.teacher_chars // 6)) + "\n\nSolve it again."

    rollouts = pa.table({
        "rollout_id": ids, "prompt_id": [r.split("#")[0] for r in ids],
        "sample_idx": pa.array([i % 8 for i in range(n)], pa.int32()), "iteration": pa.array([0] * n, pa.int32()),
        "prompt_token_ids": pa.array([[1] + [rng.randrange(3, vocab) for _ in range(args.prompt_tokens - 1)]
                                      for _ in range(n)], i32),
        "response_token_ids": pa.array([[rng.randrange(3, vocab) for _ in range(args.response_tokens)]
                                        for _ in range(n)], i32),
        "response_text": ["..."] * n, "finish_reason": ["length"] * n,
    })
    teacher = [text("correct") if i % 2 else None for i in range(n)]
    extra_rng = random.Random(1)
    critiques = pa.table({
        "rollout_id": ids, "mode": ["critique"] * n, "critic": ["reference"] * n,
        "feedback_text": [None if t is None else "fb" for t in teacher], "template": ["t@v1"] * n,
        "teacher_prompt": teacher, "error": pa.array([None] * n, pa.string()), "leaks_answer": [False] * n,
        "suspected_false_negative": [False] * n,
    })
    if k > 1:
        rng = extra_rng
        strings = pa.list_(pa.string())
        critiques = (critiques
                     .append_column("extra_teacher_prompts", pa.array(
                         [[None if t is None else text(f"wrong {j}") for j in range(k - 1)] for t in teacher], strings))
                     .append_column("extra_teacher_kinds", pa.array([["wrong_hint"] * (k - 1)] * n, strings))
                     .append_column("extra_hint_prompt_ids", pa.array([[None] * (k - 1)] * n, strings)))
    write_artifact(rollouts, folder / "rollouts.parquet", "rollouts")
    write_artifact(critiques, folder / "critiques.parquet", "critiques")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--response-tokens", type=int, default=192)
    ap.add_argument("--teacher-chars", type=int, default=300)
    ap.add_argument("--contexts", default="1,3", help="comma-separated K values (the candidate runs each)")
    ap.add_argument("--baseline", default="main", help="git ref run at K = 1 for the unchanged check ('' = none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ks = [int(x) for x in args.contexts.split(",")]
    if 1 not in ks:
        ks = [1, *ks]

    with tempfile.TemporaryDirectory(prefix="score-contexts-") as tmp:
        tmp = Path(tmp)
        policy = make_policy(tmp)
        from tcrlsd.policy import load_tokenizer

        vocab = len(load_tokenizer(policy))
        runs = [("candidate", ROOT, k) for k in ks]
        if args.baseline:
            base = tmp / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            runs = [(f"baseline {args.baseline}", base, 1), *runs]
        for k in ks:
            (tmp / f"k{k}").mkdir()
            make_inputs(tmp / f"k{k}", args.rollouts, vocab, k, args)
        student_tokens = args.rollouts * (args.prompt_tokens + args.response_tokens)
        results = {}
        for name, code, k in runs:
            out = tmp / f"out-{name.split()[0]}-{k}"
            rss, seconds = run_stage(code, tmp / f"k{k}", policy, out, args.threads)
            metrics = json.loads(Path(str(out) + ".json").read_text())
            results[(name, k)] = (seconds, metrics["run"]["seconds"], metrics["run"]["forward_tokens"], rss, out)
        print(f"rollouts {args.rollouts} ({args.prompt_tokens} prompt + {args.response_tokens} response tokens), "
              f"half with feedback (~{args.teacher_chars} chars a context); {args.threads} threads; "
              f"policy: random Llama hidden 384, 4 layers")
        print(f"{'code':<20}{'K':>3}{'process s':>10}{'scoring s':>10}{'fwd tokens':>12}{'teacher tok':>13}"
              f"{'peak MiB':>10}{'scoring / K=1':>15}{'teacher tok / K=1':>19}")
        _, c1, f1 = results[("candidate", 1)][:3]
        for (name, k), (sec, scoring, fwd, rss, _) in results.items():
            print(f"{name:<20}{k:>3}{sec:>10.1f}{scoring:>10.1f}{fwd:>12}{fwd - student_tokens:>13}{rss:>10.0f}"
                  f"{scoring / c1:>15.2f}{(fwd - student_tokens) / (f1 - student_tokens):>19.2f}")
        print("process s: the whole child (imports, model load, scoring, metrics); scoring s: the stage's own "
              "forward-pass time (metrics run.seconds)")
        if args.baseline:
            parts = [sorted(p.read_bytes() for p in results[key][4].glob("part-*.parquet"))
                     for key in ((f"baseline {args.baseline}", 1), ("candidate", 1))]
            print(f"K = 1 scores parts byte-identical to {args.baseline}: {parts[0] == parts[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
