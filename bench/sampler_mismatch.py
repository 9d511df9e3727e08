"""The sampler/scorer mismatch on CPU: responses sampled by the transformers backend in bf16 (and,
as the control, in fp32), scored by the score stage's own function in fp32.

    python bench/sampler_mismatch.py --policy models/policy-0000 --prompts data/prompts.parquet \
        [--prompts-n 32 --samples 8 --max-new-tokens 96 --threads 1]

Prints one row per sampler dtype: tokens, mean |log pi - log mu|, the k3 KL estimate, the extreme
ratios, and what update.rollout_is token / sequence with cap 2 would do (mean weight, share of
tokens at the cap). The fp32 row is the CPU default, the control (~1e-7: only float rounding between
the cached decode and the scorer's full forward); the bf16 row is what a bf16 sampler (vLLM on GPU)
does against the fp32 scorer, on this CPU's bf16 kernels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prompts", required=True, help="prompts artifact (train rows are used)")
    ap.add_argument("--prompts-n", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from tcrlsd.artifacts import read_artifact
    from tcrlsd.generate.backends import make_backend
    from tcrlsd.generation import SamplingConfig
    from tcrlsd.offpolicy import MismatchSums, rollout_is_weights
    from tcrlsd.policy import encode_prompt, load_policy, load_tokenizer
    from tcrlsd.score.logprobs import response_logprobs

    torch.set_num_threads(args.threads)
    prompts = read_artifact(args.prompts, "prompts").to_pylist()
    texts = [p["prompt"] for p in prompts if p["split"] == "train"][: args.prompts_n]
    tok = load_tokenizer(args.policy)
    ptoks = [encode_prompt(tok, t) for t in texts]
    scorer, _ = load_policy(args.policy, device="cpu", dtype="float32")
    sampling = SamplingConfig(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    print(f"policy {args.policy}, {len(ptoks)} prompts x {args.samples} samples, <= {args.max_new_tokens} tokens, "
          f"temperature {args.temperature}, {args.threads} thread(s)")
    print("| sampler dtype | tokens | mean abs log-ratio | KL k3 | max ratio | min ratio | max abs seq log-ratio "
          "| token TIS mean w | token TIS at cap | seq TIS mean w | seq TIS at cap | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        backend = make_backend("transformers", args.policy, device="cpu", dtype=dtype)
        groups = backend.generate(ptoks, args.samples, sampling)
        ctx = [p for p, g in zip(ptoks, groups) for _ in g]
        resp = [list(c.token_ids) for g in groups for c in g]
        sampler = [np.asarray(c.logprobs, dtype=np.float32) for g in groups for c in g]
        with torch.inference_mode():
            scored = response_logprobs(scorer, ctx, resp, max_tokens_per_batch=8192)
        sums = MismatchSums()
        sums.add(np.concatenate(scored), np.concatenate(sampler), [len(r) for r in resp])
        r = sums.result()
        cells = []
        for mode in ("token", "sequence"):
            w = np.concatenate([rollout_is_weights(s, q, mode, 2.0) for s, q in zip(scored, sampler)])
            cells += [f"{w.mean():.4f}", f"{(w >= 2.0).mean():.4f}"]
        print(f"| {dtype} | {r['tokens']} | {r['mean_abs_log_ratio']:.2e} | {r['kl_k3']:.2e} | {r['max_ratio']:.4f} | "
              f"{r['min_ratio']:.4f} | {r['max_abs_seq_log_ratio']:.3f} | " + " | ".join(cells) +
              f" | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
