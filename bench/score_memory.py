"""Peak memory (RSS) of the score stage at 1x and 4x the rollouts: baseline code vs this checkout.

    python bench/score_memory.py                               # this checkout only
    python bench/score_memory.py --baseline 646499e            # also a git ref, same inputs, same run

The stage runs through its CLI (``stages/score.py``) in a child process per measurement, and the
child's peak resident set size is read from ``os.wait4`` (``ru_maxrss``: that child alone). The
baseline is ``git archive REF`` unpacked into a temporary folder and run with ``PYTHONPATH`` set to
it, on the very same inputs.

Inputs: synthetic rollouts (prompt ``--prompt-tokens`` ids, response ``--response-tokens`` ids,
random ids of the policy's vocabulary), every second one with a teacher context of about
``--teacher-chars`` characters of text; a tiny random Llama (1 layer, hidden 32) so the forward
passes are cheap and memory is about the data, not the model. ``rows_per_part`` is the stage's
default (512): what the stage holds per part is the same at 1x and 4x; what it holds for the whole
iteration grows 4x.

Printed per code version: peak RSS at 1x and 4x, the growth (4x minus 1x) against the growth of
the rollouts' token data (Arrow int32 bytes), and the baseline / candidate ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_policy(folder: Path) -> Path:
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer

    texts = ["Start with 4. Add 2. What is the result? Step 1: 4 + 2 = 6. Feedback: the second step is wrong."] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=2048)
    return save_policy(build_tiny_llama(tok, cfg, seed=0), tok, folder / "policy")


def make_inputs(folder: Path, n: int, vocab: int, args) -> int:
    """rollouts + critiques artifacts of ``n`` rows; returns the rollouts' token-data bytes (int32)."""
    import pyarrow as pa

    from tcrlsd.artifacts import write_artifact

    rng = random.Random(n)
    ids = [f"p{i // 8}#{i % 8}" for i in range(n)]
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt_tokens - 1)] for _ in range(n)]
    responses = [[rng.randrange(3, vocab) for _ in range(args.response_tokens)] for _ in range(n)]
    words = "Step one is wrong: four plus two is six, not seven. Check the carry. ".split()
    feedback = [" ".join(rng.choice(words) for _ in range(args.teacher_chars // 6)) if i % 2 else None
                for i in range(n)]
    i32 = pa.list_(pa.int32())
    rollouts = pa.table({
        "rollout_id": ids, "prompt_id": [r.split("#")[0] for r in ids],
        "sample_idx": pa.array([i % 8 for i in range(n)], pa.int32()),
        "iteration": pa.array([0] * n, pa.int32()),
        "prompt_token_ids": pa.array(prompts, i32), "response_token_ids": pa.array(responses, i32),
        "response_text": ["..."] * n, "finish_reason": ["length"] * n,
    })
    critiques = pa.table({
        "rollout_id": ids, "mode": ["critique"] * n, "critic": ["reference"] * n, "feedback_text": feedback,
        "template": ["t@v1"] * n,
        "teacher_prompt": [None if f is None else f"Start with 4. Add 2.\n\nFeedback:\n{f}\n\nSolve it again."
                           for f in feedback],
        "error": pa.array([None] * n, pa.string()), "leaks_answer": [False] * n,
        "suspected_false_negative": [False] * n,
    })
    write_artifact(rollouts, folder / "rollouts.parquet", "rollouts")
    write_artifact(critiques, folder / "critiques.parquet", "critiques")
    return 4 * n * (args.prompt_tokens + args.response_tokens)


def run_stage(code: Path, data: Path, policy: Path, out: Path, threads: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``stages/score.py`` run from the checkout at ``code``."""
    params = data / "params.yaml"
    params.write_text("score:\n  device: cpu\n  dtype: float32\n  max_tokens_per_batch: 32768\n")
    cmd = [sys.executable, str(code / "stages" / "score.py"), "--params", str(params),
           "--rollouts", str(data / "rollouts.parquet"), "--critiques", str(data / "critiques.parquet"),
           "--policy", str(policy), "--out", str(out), "--metrics", str(out) + ".json", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{code}: score stage failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=4096, help="rollouts at 1x (4x runs 4 times as many)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--response-tokens", type=int, default=192)
    ap.add_argument("--teacher-chars", type=int, default=300)
    ap.add_argument("--baseline", default=None, help="git ref of the baseline code (default: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="score-memory-") as tmp:
        tmp = Path(tmp)
        policy = make_policy(tmp)
        from tcrlsd.policy import load_tokenizer

        vocab = len(load_tokenizer(policy))
        codes = {"candidate": ROOT}
        if args.baseline:
            base = tmp / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            codes = {f"baseline {args.baseline}": base, **codes}
        data_bytes = {}
        for scale in (1, 4):
            d = tmp / f"x{scale}"
            d.mkdir()
            data_bytes[scale] = make_inputs(d, args.rollouts * scale, vocab, args)
        print(f"rollouts 1x = {args.rollouts} ({args.prompt_tokens} prompt + {args.response_tokens} response "
              f"tokens each), 4x = {4 * args.rollouts}; token data (int32) {data_bytes[1] / 2**20:.1f} / "
              f"{data_bytes[4] / 2**20:.1f} MiB")
        print(f"{'code':<22}{'1x MiB':>9}{'4x MiB':>9}{'growth':>9}{'growth/data':>13}{'1x s':>7}{'4x s':>7}")
        results = {}
        for name, code in codes.items():
            (r1, s1), (r4, s4) = (run_stage(code, tmp / f"x{k}", policy, tmp / f"out-{len(results)}-{k}", args.threads)
                                  for k in (1, 4))
            results[name] = (r1, r4)
            growth = r4 - r1
            print(f"{name:<22}{r1:>9.0f}{r4:>9.0f}{growth:>9.0f}"
                  f"{growth / ((data_bytes[4] - data_bytes[1]) / 2**20):>13.2f}{s1:>7.1f}{s4:>7.1f}")
        if len(results) == 2:
            (b1, b4), (c1, c4) = results.values()
            print(f"peak RSS baseline / candidate: 1x {b1 / c1:.2f}x, 4x {b4 / c4:.2f}x; "
                  f"growth 1x->4x: baseline {b4 - b1:.0f} MiB, candidate {c4 - c1:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
