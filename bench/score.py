"""Score-stage throughput: the stage's batching vs naive fixed-size padded batching, same run;
and (``--compare reuse``) the stage with the student forward vs with the sampler's log-probs reused.

    python bench/score.py                       # CPU, fp32, 2 threads, random Llama (hidden 384)
    python bench/score.py --device cuda --shape llama-3.2-3b --dtype bfloat16 --rollouts 512
    python bench/score.py --compare reuse --threads 1 [--policy models/policy-0000]

``--compare reuse``: one default-shape iteration (32 prompts x 8 samples, <= 96 new tokens) is
built by the stages themselves (tests/harness.py: prepare, generate with the transformers backend in
fp32, verify, critique with the reference critic) from ``--policy`` (default: a random-weight policy
of the warm start's shape, params.yaml ``warmstart.model``, so every response runs to the cap and
is wrong). Then :func:`tcrlsd.score.run_score`, the stage's function, scores it with
``reuse_sampler_logprobs`` false (baseline: student + teacher forward) and true (candidate: teacher
forward only), alternating, best of ``--repeats``, at each ``--feedback-shares`` (the share of rows
that keep their teacher context; 1.0 = every rollout got feedback, the candidate's worst case). It
prints the seconds of each (scoring loop, and the whole call with the model load), the forward
tokens, the ratio, and max |student reused - student forward|.

Both methods score the same synthetic rollouts (response lengths uniform in 20..1000 tokens,
prompts 40..200, half the rows with a teacher context 100..400 tokens long, teacher = the same
weights) and must agree to within float noise (printed).

- naive:     the rollouts in input order, ``--naive-batch-size`` at a time, right-padded to the
             batch's longest sequence with an attention mask; full (B, T, V) logits, fp32
             log-softmax over all of it, gather (what a straightforward implementation does).
- stage:     ``tcrlsd.score.response_logprobs``, the stage's inner loop: student and teacher
             sequences pooled, sorted by length, cut by ``max_tokens_per_batch``; no mask; the lm
             head only on response positions, in chunks.

FLOP count ("useful" work, the same for both methods, so FLOP/s ratios equal speed ratios):
per sequence of T tokens with R response tokens, 2 * N_layers_params * T (every decoder matmul,
N = attention + MLP weights of all layers) + 2 * n_layers * T^2 * d_attn (causal QK^T and AV:
half of the full 4 * T^2 * d) + 2 * H * V * R (the lm head, needed at response positions only).
Padding, masked attention and lm-head rows that are thrown away are not counted. The peak is a
measured ``torch.matmul`` of two square matrices (fp32 on CPU, the chosen dtype on GPU) with
the same thread count; on GPU MFU is also given against a stated datasheet peak.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

SHAPES = {
    # A model big enough that matmuls dominate, small enough for ~1 minute on 2 CPU cores.
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=8192),
    # Llama-3.2-3B's shape (random weights; tied embeddings like the released model).
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, no sparsity


def make_rollouts(n: int, vocab: int, seed: int):
    rng = random.Random(seed)
    contexts, responses, teacher_contexts = [], [], []
    for i in range(n):
        contexts.append([1] + [rng.randrange(3, vocab) for _ in range(rng.randint(40, 200))])
        responses.append([rng.randrange(3, vocab) for _ in range(rng.randint(20, 1000))])
        if i % 2 == 0:  # half the rollouts got feedback
            teacher_contexts.append((i, [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(100, 400))]))
    return contexts, responses, teacher_contexts


def naive_logprobs(model, contexts, responses, batch_size):
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in range(0, len(contexts), batch_size):
            ctx, resp = contexts[s : s + batch_size], responses[s : s + batch_size]
            T = max(len(c) + len(r) for c, r in zip(ctx, resp))
            ids = torch.zeros((len(ctx), T), dtype=torch.long)
            mask = torch.zeros((len(ctx), T), dtype=torch.long)
            for i, (c, r) in enumerate(zip(ctx, resp)):
                ids[i, : len(c) + len(r)] = torch.tensor(c + r)
                mask[i, : len(c) + len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V) fp32
            for i, (c, r) in enumerate(zip(ctx, resp)):
                pos = torch.arange(len(c) - 1, len(c) - 1 + len(r), device=device)
                out.append(logp[i, pos, torch.tensor(r, device=device)].cpu().numpy())
            del logits, logp
    return out


def useful_flops(cfg, seqs):
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = H // cfg.num_attention_heads
    d_q, d_kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = H * d_q + 2 * H * d_kv + d_q * H + 3 * H * cfg.intermediate_size
    total = 0
    for T, R in seqs:
        total += 2 * L * per_layer * T + 2 * L * T * T * d_q + 2 * H * cfg.vocab_size * R
    return total, L * per_layer


def matmul_peak(device: str, dtype, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _default_shape_policy(folder):
    """A random-weight policy of the warm start's shape (params.yaml ``warmstart``), tokenizer trained
    on synthetic problems as the warm start's is."""
    from pathlib import Path

    from tcrlsd.params import load_section
    from tcrlsd.policy import build_tiny_llama, save_policy, train_tokenizer
    from tcrlsd.synthetic import make_problems
    from tcrlsd.warmstart.params import WarmstartParams

    ws = load_section(Path(__file__).resolve().parents[1] / "params.yaml", "warmstart", WarmstartParams)
    texts = [p.problem + "\n" + p.solution for p in make_problems(2000, seed=123)]
    tok = train_tokenizer(texts, vocab_size=ws.vocab_size)
    return save_policy(build_tiny_llama(tok, ws.model_config(), seed=0), tok, folder)


def _keep_feedback(critiques, share: float):
    """``critiques`` with the teacher context kept on a ``share`` of the rows, spread evenly."""
    import pyarrow as pa

    n = critiques.num_rows
    keep = [int((i + 1) * share) > int(i * share) for i in range(n)]
    for col in ("feedback_text", "teacher_prompt"):
        vals = [v if k else None for v, k in zip(critiques.column(col).to_pylist(), keep)]
        critiques = critiques.set_column(critiques.schema.get_field_index(col), col, pa.array(vals, pa.string()))
    return critiques


def compare_reuse(args) -> None:
    import dataclasses
    import tempfile
    from pathlib import Path

    import numpy as np
    import pyarrow.compute as pc
    import torch

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    from harness import build_iteration, write_params

    from tcrlsd.artifacts import read_artifact
    from tcrlsd.score import ScoreParams, build_inputs, run_score

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars at every run_score call
    torch.set_num_threads(args.threads)
    shares = [float(x) for x in args.feedback_shares.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        policy = Path(args.policy) if args.policy else _default_shape_policy(d / "policy")
        source = {"name": "synthetic", "format": "synthetic", "path": None, "levels": [1, 2, 3, 4], "max_operand": 20}
        params = write_params(
            d, prepare={"sources": [source | {"split": "train", "count": args.prompts},
                                    source | {"split": "val", "count": 4}]},
            generate={"prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "num_threads": args.threads,
                      "sampling": {"max_new_tokens": args.max_new_tokens}, "engine": {"batch_size": 256, "device": "cpu"}})
        t0 = time.perf_counter()
        build_iteration(d, policy, params, stages=("prepare", "generate", "verify", "critique"))
        rollouts = read_artifact(d / "rollouts", "rollouts")
        critiques = read_artifact(d / "critiques", "critiques")
        torch.set_num_threads(args.threads)  # the in-process stages set their own
        base = dataclasses.replace(ScoreParams(), device="cpu", dtype="float32")
        n_tok = int(pc.sum(pc.list_value_length(rollouts.column("response_token_ids"))).as_py())
        print(f"policy={args.policy or 'random weights, warm start shape'} rollouts={rollouts.num_rows} "
              f"response_tokens={n_tok} threads={args.threads} (iteration built in {time.perf_counter() - t0:.1f} s)")
        print(f"{'feedback share':>14} {'method':<30} {'score s':>8} {'call s':>8} {'fwd tokens':>10} {'ratio':>6}")
        for k, share in enumerate(shares):
            inputs = build_inputs(rollouts, _keep_feedback(critiques, share))
            best = {False: (float("inf"), float("inf"), 0), True: (float("inf"), float("inf"), 0)}
            for rep in range(args.repeats + 1):  # the first round warms up (not kept)
                for reuse in (False, True):
                    out = d / f"scores-{k}-{rep}-{int(reuse)}"
                    t = time.perf_counter()
                    stats = run_score(rollouts, inputs, policy, out, dataclasses.replace(base, reuse_sampler_logprobs=reuse),
                                      progress=False)
                    call = time.perf_counter() - t
                    assert stats.extra["student_logprobs_from"] == ("sampler" if reuse else "forward")
                    if rep:
                        s, c, _ = best[reuse]
                        best[reuse] = (min(s, stats.seconds), min(c, call), stats.forward_tokens)
            student = {r: pc.list_flatten(read_artifact(d / f"scores-{k}-1-{int(r)}", "scores")
                                          .column("student_logprobs")).to_numpy(zero_copy_only=False) for r in (False, True)}
            diff = float(np.abs(student[False] - student[True]).max())
            for reuse, name in ((False, "forward (student + teacher)"), (True, "reuse (teacher only)")):
                s, c, f = best[reuse]
                ratio = f"{best[False][0] / s:>5.2f}x" if reuse else ""
                print(f"{share:>14.2f} {name:<30} {s:>8.2f} {c:>8.2f} {f:>10} {ratio:>6}")
            print(f"{'':>14} max |student reused - forward| = {diff:.2e}; call ratio {best[False][1] / best[True][1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", default="batching", choices=["batching", "reuse"],
                    help="batching: stage vs naive batching; reuse: student forward vs the sampler's log-probs")
    ap.add_argument("--policy", default=None, help="reuse: policy checkpoint (default: random weights)")
    ap.add_argument("--prompts", type=int, default=32, help="reuse: prompts (the default prompts_per_step)")
    ap.add_argument("--samples", type=int, default=8, help="reuse: samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="reuse: response cap")
    ap.add_argument("--feedback-shares", default="1.0,0.5", help="reuse: shares of rows with a teacher context")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rollouts", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    ap.add_argument("--naive-batch-size", type=int, default=8)
    ap.add_argument("--max-tokens-per-batch", type=int, default=None, help="default: the ScoreParams default")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method (best is kept)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="datasheet peak for MFU (GPU); default by name")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.compare == "reuse":
        return compare_reuse(args)

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcrlsd.policy import torch_dtype
    from tcrlsd.score import ScoreParams, response_logprobs

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/score.py: --device cuda but no CUDA device is visible")
    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype, args.device)
    budget = args.max_tokens_per_batch or ScoreParams().max_tokens_per_batch
    chunk = ScoreParams().logits_chunk_tokens
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(prev)

    contexts, responses, teacher = make_rollouts(args.rollouts, cfg.vocab_size, args.seed)
    # The same work for both: student sequences, then teacher sequences of the rows with feedback.
    all_ctx = contexts + [c for _, c in teacher]
    all_resp = responses + [responses[i] for i, _ in teacher]
    seqs = [(len(c) + len(r), len(r)) for c, r in zip(all_ctx, all_resp)]
    tokens = sum(T for T, _ in seqs)
    flops, n_body = useful_flops(cfg, seqs)
    # naive batches students and teachers separately (in input order), as the code above runs them
    naive_padded = sum(
        len(group[s : s + args.naive_batch_size]) * max(T for T, _ in group[s : s + args.naive_batch_size])
        for group in (seqs[: len(contexts)], seqs[len(contexts) :])
        for s in range(0, len(group), args.naive_batch_size)
    )
    from tcrlsd.score import plan_batches

    stage_padded = sum(len(b) * max(seqs[i][0] for i in b) for b in plan_batches([T for T, _ in seqs], budget))

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def run_naive():
        s = naive_logprobs(model, contexts, responses, args.naive_batch_size)
        t = naive_logprobs(model, [c for _, c in teacher], [responses[i] for i, _ in teacher], args.naive_batch_size)
        return s + t

    def run_stage():
        return response_logprobs(model, all_ctx, all_resp, max_tokens_per_batch=budget, logits_chunk_tokens=chunk)

    # warm-up (allocator, kernels) on a few short sequences
    response_logprobs(model, contexts[:2], [r[:16] for r in responses[:2]], max_tokens_per_batch=budget)
    times = {"naive": float("inf"), "stage": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("naive", run_naive), ("stage", run_stage)):
            sync()
            t = time.perf_counter()
            results[name] = fn()
            sync()
            times[name] = min(times[name], time.perf_counter() - t)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(results["naive"], results["stage"]))

    peak_dtype = dtype if args.device == "cuda" else torch.float32
    peak = matmul_peak(args.device, peak_dtype, 8192 if args.device == "cuda" else 2048)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{args.threads} threads'}) "
          f"shape={args.shape} dtype={args.dtype} params={n_params / 1e6:.1f}M (decoder layers {n_body / 1e6:.1f}M) "
          f"rollouts={args.rollouts} sequences={len(seqs)} real_tokens={tokens} "
          f"response_tokens={sum(R for _, R in seqs)}")
    print(f"useful work {flops / 1e12:.3f} TFLOP; measured matmul peak ({str(peak_dtype).replace('torch.', '')}) "
          f"{peak / 1e9:.1f} GFLOP/s; naive vs stage max |diff| = {diff:.2e}")
    print()
    print(f"{'method':<56} {'seconds':>8} {'tokens/s':>10} {'padding':>8} {'GFLOP/s':>9} {'% peak':>7}")
    rows = [
        (f"naive: fixed batch {args.naive_batch_size}, padded, full logits", times["naive"], naive_padded),
        (f"stage: sorted, {budget}-token budget, response-only head", times["stage"], stage_padded),
    ]
    for name, sec, padded in rows:
        print(f"{name:<56} {sec:>8.2f} {tokens / sec:>10.0f} {1 - tokens / padded:>8.1%} "
              f"{flops / sec / 1e9:>9.1f} {flops / sec / peak:>7.1%}")
    print(f"{'ratio stage / naive (tokens/s)':<56} {times['naive'] / times['stage']:>8.2f}x")
    if args.device == "cuda" and args.dtype == "bfloat16":
        gpu = torch.cuda.get_device_name()
        stated = args.peak_tflops or next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)
        if stated:
            for name, sec, _ in rows:
                print(f"MFU {name.split(':')[0]}: {flops / sec / (stated * 1e12):.1%} of a stated {stated} TFLOP/s "
                      f"({args.dtype} dense datasheet peak of {gpu})")


if __name__ == "__main__":
    main()
