"""Update-stage training throughput: the stage's loop, packed and padded, vs a plain PyTorch loop, same run, same data.

    python bench/update.py                          # CPU, fp32, 2 threads, the default policy's shape
    python bench/update.py --shape small --rollouts 128
    python bench/update.py --device cuda --shape llama-3.2-3b --rollouts 256   # GPU (bf16)

Both train the same synthetic iteration (prompts 30..60 tokens, responses uniform in
``--min-response``..``--max-response``, 8 samples per prompt, random advantages) for the same
optimizer steps (mini-batches of ``--mini-batch-prompts`` prompts, one epoch), PPO-clip loss,
token-mean, AdamW, grad clip 1.0:

- plain:  the rows in input order, ``--plain-batch-size`` sequences per micro-batch, right-padded
          with an attention mask, ``model(ids).logits`` (the full (B, T, V) tensor), fp32
          log-softmax over all of it, then the response positions gathered; torch.optim.AdamW.
- padded: :class:`tcrlsd.update.trainer.Trainer` (DeepSpeed ZeRO-2 engine, one process) with
          ``pack_tokens: 0``: sequences sorted by length and cut by a padded-token budget
          (``--max-tokens-per-micro-batch``), the lm head only at response positions, in
          checkpointed chunks, entropy over the full vocabulary included (the plain loop skips it).
- packed: the same Trainer with ``pack_tokens`` = ``--pack-tokens``: several sequences per row, no
          padding, attention within each sequence (tcrlsd/update/packed_attention.py).
- shared: packed with ``share_prompts``: each prompt written once per micro-batch, its responses after
          it, each attending to the prompt and itself (fewer tokens through the model for the same work).

The first optimizer step's pg_loss of each method is printed (all start from the same weights, so
the losses must agree: the plain loop differs only by rounding; padded vs packed are the same
per-token numbers in another layout).

The ratios are times for the same work (the same rollouts, steps and loss). tokens/s counts the
tokens each method runs through the model (real prompt + response tokens, padding excluded; shared
counts a group's prompt once), over the training loop only
(model loading and engine set-up excluded); CPU seconds of the process are shown too (on a shared
machine they measure the work better than wall time; use ``--threads 1`` so that idle OpenMP
threads spinning do not count). The two methods alternate ``--repeats`` times and the
best run of each is shown.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SHAPES = {
    # the embedded default policy (params.yaml warmstart.model; vocabulary 512)
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=8192),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def make_iteration(folder: Path, n: int, vocab: int, samples: int, rmin: int, rmax: int, seed: int):
    import numpy as np
    import pyarrow as pa

    from tcrlsd.artifacts import write_table

    rng = random.Random(seed)
    rows, scores, advs = [], [], []
    prompt: list[int] = []
    for i in range(n):
        pid = f"p{i // samples}"
        if i % samples == 0:  # a GRPO group: its samples share the prompt
            prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(30, 60))]
        resp = [rng.randrange(3, vocab) for _ in range(rng.randint(rmin, rmax))]
        rid = f"{pid}#{i % samples}"
        rows.append(dict(rollout_id=rid, prompt_id=pid, sample_idx=i % samples, iteration=0, prompt_token_ids=prompt,
                         response_token_ids=resp, response_text="", finish_reason="length",
                         sampler_logprobs=[-float(np.log(vocab))] * len(resp)))
        scores.append(dict(rollout_id=rid, student_logprobs=[-float(np.log(vocab))] * len(resp),
                           teacher_logprobs=[-float(np.log(vocab))] * len(resp), teacher_checkpoint="x"))
        a = rng.choice([-1.0, 1.0])
        advs.append(dict(rollout_id=rid, group_advantage=a, advantages=[a] * len(resp), estimator="grpo"))
    from tcrlsd.schemas import schema_for

    for name, data in (("rollouts", rows), ("scores", scores), ("advantages", advs)):
        write_table(pa.Table.from_pylist(data, schema=schema_for(name)), folder / f"{name}.parquet", name)
    return {k: folder / f"{k}.parquet" for k in ("rollouts", "scores", "advantages")}


def make_policy(folder: Path, shape: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcrlsd.policy import save_policy, train_tokenizer

    tok = train_tokenizer(["1 + 2 = 3", "Let's think step by step."], vocab_size=300)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    save_policy(LlamaForCausalLM(cfg), tok, folder)
    return folder


def plain_loop(policy, inputs, params, device, dtype, batch_size):
    """A straightforward PPO loop: fixed-size padded batches, full logits. Returns (tokens, seconds,
    the first mini-batch's loss)."""
    import torch

    from tcrlsd.policy import load_policy
    from tcrlsd.update.batching import plan_mini_batches
    from tcrlsd.update.losses import ClipSettings, ppo_clip_loss

    model, _ = load_policy(policy, device=device, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr)
    tokens = 0
    losses = []
    start = time.perf_counter()
    for rows in plan_mini_batches(inputs.prompt_ids, params.mini_batch_prompts, seed=0, iteration=0, epoch=0,
                                  shuffle=False):
        seqs = inputs.read(rows)
        n_tok = sum(len(s.response_ids) for s in seqs)
        step_loss = 0.0
        for b in range(0, len(seqs), batch_size):
            part = seqs[b : b + batch_size]
            T = max(s.length for s in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)
            mask = torch.zeros(len(part), T, dtype=torch.long)
            resp_mask = torch.zeros(len(part), T - 1, dtype=torch.bool)
            old = torch.zeros(len(part), T - 1)
            adv = torch.zeros(len(part), T - 1)
            for i, s in enumerate(part):
                c, r = len(s.prompt_ids), len(s.response_ids)
                ids[i, : c + r] = torch.tensor(s.prompt_ids + s.response_ids)
                mask[i, : c + r] = 1
                resp_mask[i, c - 1 : c - 1 + r] = True
                old[i, c - 1 : c - 1 + r] = torch.from_numpy(s.old_logprobs)
                adv[i, c - 1 : c - 1 + r] = torch.from_numpy(s.advantages)
                tokens += c + r
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)  # (B, T-1)
            loss, _ = ppo_clip_loss(logp, old.to(device), adv.to(device), None, ClipSettings(0.2, 0.2))  # per token: no seq
            loss = (loss * resp_mask.to(device)).sum() / n_tok
            loss.backward()
            step_loss += float(loss)
        losses.append(step_loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start, losses[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--rollouts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--min-response", type=int, default=8)
    ap.add_argument("--max-response", type=int, default=96)
    ap.add_argument("--mini-batch-prompts", type=int, default=8)
    ap.add_argument("--plain-batch-size", type=int, default=16)
    ap.add_argument("--max-tokens-per-micro-batch", type=int, default=4096, help="padded method's budget")
    ap.add_argument("--pack-tokens", type=int, default=4096, help="packed method's budget (real tokens)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each method, alternated; the best is shown")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tcrlsd.update.batching import UpdateInputs
    from tcrlsd.update.params import UpdateParams
    from tcrlsd.update.stage import open_trainer

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_iteration(tmp, args.rollouts, shape["vocab_size"], args.samples, args.min_response,
                               args.max_response, seed=0)
        policy = make_policy(tmp / "policy", shape)
        inputs = UpdateInputs(**paths)
        base = dict(lr=1e-4, mini_batch_prompts=args.mini_batch_prompts, shuffle=False,
                    max_tokens_per_micro_batch=args.max_tokens_per_micro_batch, zero_stage=2, device=args.device,
                    dtype=dtype, num_threads=args.threads)
        trainers = {name: open_trainer(policy, UpdateParams(**base, pack_tokens=pack, share_prompts=share),
                                       iteration=0)[0]
                    for name, pack, share in (("padded", 0, False), ("packed", args.pack_tokens, False),
                                              ("shared", args.pack_tokens, True))}
        # Alternate the methods and keep each one's best run: the machine may be shared, and the
        # best of several runs is the least disturbed one. Each trainer keeps training its own copy.
        runs = {name: [] for name in ("plain", *trainers)}
        first_loss = {}
        for r in range(args.repeats):
            for name, trainer in trainers.items():
                trainer.state = replace(trainer.state, iteration=-1)  # train the same iteration again
                cpu = time.process_time()
                m = trainer.train_iteration(inputs)
                runs[name].append((m["seconds"], time.process_time() - cpu, m["forward_tokens"]))
                first_loss.setdefault(name, m["per_step"][0]["pg_loss"])
            cpu = time.process_time()
            tokens, secs, loss = plain_loop(policy, inputs, UpdateParams(**base), args.device, dtype,
                                            args.plain_batch_size)
            runs["plain"].append((secs, time.process_time() - cpu, tokens))
            first_loss.setdefault("plain", loss)
    best = {name: min(v) for name, v in runs.items()}
    print(f"shape={args.shape} rollouts={args.rollouts} responses {args.min_response}..{args.max_response} "
          f"device={args.device} dtype={dtype} threads={args.threads} optimizer steps={m['optimizer_steps']} "
          f"pack_tokens={args.pack_tokens} max_tokens_per_micro_batch={args.max_tokens_per_micro_batch} "
          f"best of {args.repeats}")
    print(f"{'method':8} {'tokens':>8} {'wall s':>8} {'tokens/s':>10} {'CPU s':>8} {'tokens/CPU-s':>12} {'first pg_loss':>15}")
    for name, (secs, cpu, tokens) in best.items():
        print(f"{name:8} {tokens:8d} {secs:8.2f} {tokens / secs:10.0f} {cpu:8.2f} {tokens / cpu:12.0f} "
              f"{first_loss[name]:15.9f}")
    plain = best["plain"]
    for name in trainers:
        secs, cpu, tokens = best[name]
        print(f"speed-up {name} vs plain, same work: {plain[0] / secs:.2f}x (wall), {plain[1] / cpu:.2f}x (CPU time)")
    print(f"first-step pg_loss |packed - padded| = {abs(first_loss['packed'] - first_loss['padded']):.3g}, "
          f"|shared - padded| = {abs(first_loss['shared'] - first_loss['padded']):.3g}, "
          f"|packed - plain| = {abs(first_loss['packed'] - first_loss['plain']):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
