"""The GPU check: score forward, update step, vLLM generation and the sampler/scorer mismatch at the
GPU preset's policy shape (Llama-3.2-3B, random weights), one table. Run by scripts/gpu_check.sh.

Phases, each its own process (GPU memory is given back between them):

1. build   a randomly initialised Llama-3.2-3B-shaped model (bf16), saved as a Hugging Face folder
           (no tokenizer: every phase works on token ids);
2. sample  vLLM (`skip_tokenizer_init`, bf16) samples `--prompts` random-id prompts of `--prompt-len`
           tokens, `--gen-len` new tokens each (ignore_eos): output tokens/s, and the sampler's
           log-prob of each sampled token. Without vLLM (the CPU dry run) transformers samples in bf16;
3. score   the score stage's forward (`tcrlsd.score.logprobs.response_logprobs`, the GPU preset's
           score.max_tokens_per_batch) on those samples in bf16: tokens/s, MFU, and the mismatch
           against the sampler (mean |log p_sampler - log p_scorer|, KL(sampler || scorer) as k1 and
           k3 estimates, max ratio p_scorer / p_sampler);
4. update  the update's DeepSpeed engine (`tcrlsd.update.engine.build_engine`, ZeRO-2, bf16 with fp32
           master weights) at the preset's update.max_tokens_per_micro_batch: forward + backward +
           AdamW step per micro-batch, tokens/s, MFU; a micro-batch that does not fit is halved (and
           reported: the preset's value would not fit this card).

MFU = model FLOPs / s / the card's dense bf16 peak; model FLOPs per token = 2 N (forward) or 6 N
(forward + backward), N = all parameters (the lm head included, attention's s^2 term left out).

    python bench/gpu_check.py --out DIR               # the real check (a GPU; ~5 minutes on an H100)
    python bench/gpu_check.py --out DIR --tiny        # the same code path on CPU with a tiny Llama
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESET = ROOT / "configs" / "gpu" / "llama3b_qwen3_4b_math.yaml"

# meta-llama/Llama-3.2-3B config.json (the shape; weights are random)
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)

# dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity)
PEAKS = {"H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12,
         "H200": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12}


def _preset() -> dict:
    import yaml

    from tcrlsd.params import load_yaml, merge

    return merge(load_yaml(ROOT / "params.yaml"), yaml.safe_load(GPU_PRESET.read_text()))


def _device(tiny: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not tiny else "cpu"


def phase_build(a) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY if a.tiny else LLAMA_3B), torch_dtype="bfloat16")
    dev = _device(a.tiny)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(a.out / "model", safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "build_s": round(time.perf_counter() - t, 1)}


def _prompts(a, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(10, vocab, a.prompt_len).tolist() for _ in range(a.prompts)]


def phase_sample(a) -> dict:
    import numpy as np

    cfg = json.loads((a.out / "model" / "config.json").read_text())
    prompts = _prompts(a, cfg["vocab_size"])
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return _sample_transformers(a, prompts)
    llm = LLM(model=str(a.out / "model"), dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              max_model_len=a.prompt_len + a.gen_len, gpu_memory_utilization=0.85)
    sp = SamplingParams(temperature=1.0, max_tokens=a.gen_len, ignore_eos=True, logprobs=0, detokenize=False,
                        seed=0)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t
    resp, lps = [], []
    for o in outs:
        c = o.outputs[0]
        resp.append(list(c.token_ids))
        lps.append([step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)])
    np.save(a.out / "samples.npy", np.array({"prompts": prompts, "responses": resp, "logprobs": lps}), allow_pickle=True)
    n = sum(map(len, resp))
    return {"sampler": "vLLM bf16", "gen_tokens": n, "gen_tokens_per_s": round(n / dt)}


def _sample_transformers(a, prompts) -> dict:
    """The CPU dry run's sampler: transformers in bf16, the same outputs as the vLLM path."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    dev = _device(a.tiny)
    model = AutoModelForCausalLM.from_pretrained(a.out / "model", dtype=torch.bfloat16).to(dev).eval()
    torch.manual_seed(0)
    ids = torch.tensor(prompts, device=dev)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.gen_len,
                             min_new_tokens=a.gen_len, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    dt = time.perf_counter() - t
    seq = out.sequences[:, ids.shape[1]:]  # (B, G)
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # (B, G, V)
    lps = logp.gather(2, seq[..., None]).squeeze(2)  # (B, G)
    np.save(a.out / "samples.npy", np.array({"prompts": prompts, "responses": seq.tolist(), "logprobs": lps.tolist()}),
            allow_pickle=True)
    return {"sampler": "transformers bf16 (vLLM not installed)", "gen_tokens": int(seq.numel()),
            "gen_tokens_per_s": round(seq.numel() / dt)}


def _peak(dev: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if dev != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def _sync(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def _load(a, device: str, dtype: str):
    """The model as tcrlsd.policy.load_policy loads it (safetensors only), without a tokenizer."""
    from transformers import AutoModelForCausalLM

    from tcrlsd.policy import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(a.out / "model", dtype=torch_dtype(dtype, device), use_safetensors=True)
    return model.to(device).eval()


def phase_score(a) -> dict:
    import numpy as np
    import torch

    from tcrlsd.score.logprobs import response_logprobs

    dev = _device(a.tiny)
    s = np.load(a.out / "samples.npy", allow_pickle=True).item()
    model = _load(a, dev, "bfloat16")
    n_params = sum(p.numel() for p in model.parameters())
    budget = _preset()["score"]["max_tokens_per_batch"]
    kw = dict(max_tokens_per_batch=budget, logits_chunk_tokens=1024)
    with torch.no_grad():
        response_logprobs(model, s["prompts"][:2], s["responses"][:2], **kw)  # warm-up
        _sync(dev)
        t = time.perf_counter()
        got = response_logprobs(model, s["prompts"], s["responses"], **kw)
        _sync(dev)
    dt = time.perf_counter() - t
    tokens = sum(len(p) + len(r) for p, r in zip(s["prompts"], s["responses"]))
    sampler = np.concatenate([np.asarray(x, dtype=np.float64) for x in s["logprobs"]])
    scorer = np.concatenate([np.asarray(x, dtype=np.float64) for x in got])
    d = scorer - sampler  # log (p_scorer / p_sampler) at tokens drawn from the sampler
    peak = _peak(dev, a.peak_tflops)
    return {"score_tokens_per_s": round(tokens / dt), "score_mfu": 2 * n_params * tokens / dt / peak if peak else None,
            "mismatch_mean_abs": float(np.abs(d).mean()), "kl_k1": float((-d).mean()),
            "kl_k3": float((np.exp(d) - 1 - d).mean()), "max_ratio": float(np.exp(d).max()),
            "score_batch_tokens": budget}


def phase_update(a) -> dict:
    import torch

    from tcrlsd.params import from_mapping
    from tcrlsd.update.engine import build_engine, init_distributed
    from tcrlsd.update.params import UpdateParams

    dev = _device(a.tiny)
    params = from_mapping(UpdateParams, _preset()["update"], "update")
    init_distributed(dev)
    model = _load(a, "cpu", "float32")
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    engine = build_engine(model, params, dev, bf16=dev == "cuda")
    tokens = a.micro_tokens or params.max_tokens_per_micro_batch
    seq = min(a.seq_len, tokens)
    notes = []
    while True:
        try:
            rows = max(1, tokens // seq)
            ids = torch.randint(10, vocab, (rows, seq), device=engine.device)
            r = torch.arange(rows, device=engine.device).repeat_interleave(seq - 1)
            c = torch.arange(seq - 1, device=engine.device).repeat(rows)
            tgt = ids[r, c + 1]
            times = []
            for _ in range(3):  # the first step is a warm-up
                _sync(dev)
                t = time.perf_counter()
                logp, ent = engine(ids, r, c, tgt)
                engine.backward(-(logp.mean() + 1e-3 * ent.mean()), scale_wrt_gas=False)
                engine.step()
                _sync(dev)
                times.append(time.perf_counter() - t)
            break
        except torch.OutOfMemoryError:
            notes.append(f"{rows * seq} tokens per micro-batch: out of memory")
            engine.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            tokens //= 2
            if tokens < seq:
                raise
    dt = sum(times[1:]) / len(times[1:])
    peak = _peak(dev, a.peak_tflops)
    done = rows * seq
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"update_tokens_per_s": round(done / dt), "update_mfu": 6 * n_params * done / dt / peak if peak else None,
            "update_micro_tokens": done, "update_preset_micro_tokens": params.max_tokens_per_micro_batch,
            "update_step_s": round(dt, 2), "update_dtype": "bf16" if dev == "cuda" else "fp32", "update_peak_gib": mem, "update_notes": notes}


PHASES = {"build": phase_build, "sample": phase_sample, "score": phase_score, "update": phase_update}
BUDGET = {"build": 120, "sample": 200, "score": 90, "update": 180}  # seconds; 590 in all


def _table(r: dict) -> str:
    f = lambda v, fmt="{:,.0f}": "n/a" if v is None else fmt.format(v)  # noqa: E731
    rows = [
        ("device", r.get("device")), ("policy parameters", f(r.get("params"))),
        (f"generation ({r.get('sampler')})", f"{f(r.get('gen_tokens_per_s'))} output tokens/s "
                                             f"({f(r.get('gen_tokens'))} tokens)"),
        ("score forward (bf16)", f"{f(r.get('score_tokens_per_s'))} tokens/s, MFU {f(r.get('score_mfu'), '{:.1%}')} "
                                 f"(batches of {f(r.get('score_batch_tokens'))} padded tokens)"),
        (f"update step (ZeRO-2, {r.get('update_dtype')})", f"{f(r.get('update_tokens_per_s'))} tokens/s, MFU "
                                       f"{f(r.get('update_mfu'), '{:.1%}')}, {f(r.get('update_step_s'), '{:.2f}')} s "
                                       f"per micro-batch of {f(r.get('update_micro_tokens'))} tokens (preset: "
                                       f"{f(r.get('update_preset_micro_tokens'))}), peak "
                                       f"{f(r.get('update_peak_gib'), '{:.1f}')} GiB"),
        ("sampler vs scorer", f"mean |dlogp| {f(r.get('mismatch_mean_abs'), '{:.4f}')}, KL k1 "
                              f"{f(r.get('kl_k1'), '{:.2e}')} k3 {f(r.get('kl_k3'), '{:.2e}')}, max ratio "
                              f"{f(r.get('max_ratio'), '{:.3f}')}"),
    ]
    rows += [("note", n) for n in r.get("update_notes", [])]
    rows += [(f"{k} failed", v) for k, v in r.get("errors", {}).items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (the model is written here)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a tiny Llama, the same code path")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=None, help="prompts sampled (3B: 512, tiny: 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (3B: 256, tiny: 8)")
    ap.add_argument("--gen-len", type=int, default=None, help="tokens generated per prompt (3B: 1024, tiny: 16)")
    ap.add_argument("--seq-len", type=int, default=None, help="update sequence length (3B: 3072, tiny: 32)")
    ap.add_argument("--micro-tokens", type=int, default=0, help="update micro-batch tokens (0: the preset's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card (default: by its name)")
    ap.add_argument("--phase-timeout", type=int, default=0,
                    help="seconds per phase (0: build 120, sample 200, score 90, update 180 = under 10 minutes; "
                         "--tiny: 300 each)")
    a = ap.parse_args()
    big = dict(prompts=512, prompt_len=256, gen_len=1024, seq_len=3072)
    small = dict(prompts=4, prompt_len=8, gen_len=16, seq_len=32)
    for k, v in (small if a.tiny else big).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.tiny and not a.micro_tokens:
        a.micro_tokens = 128
    a.out.mkdir(parents=True, exist_ok=True)
    if a.phase:  # a child process: one phase, its result as JSON on the last line
        print(json.dumps(PHASES[a.phase](a)))
        return
    import torch

    result: dict = {"device": torch.cuda.get_device_name() if _device(a.tiny) == "cuda" else "cpu", "errors": {}}
    argv = [sys.executable, __file__] + [x for x in sys.argv[1:]]
    for phase in ("build", "sample", "score", "update"):
        if phase == "score" and "sample" in result["errors"]:
            continue  # it scores the samples; the update step needs none
        t = time.perf_counter()
        limit = a.phase_timeout or (300 if a.tiny else BUDGET[phase])
        try:
            proc = subprocess.run(argv + ["--phase", phase], capture_output=True, text=True, timeout=limit,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
        except subprocess.TimeoutExpired:
            result["errors"][phase] = f"timed out after {limit} s"
            continue
        sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
        if proc.returncode != 0:
            result["errors"][phase] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            if phase == "build":
                break  # every later phase needs the model
            continue
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{phase}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    (a.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(_table(result))


if __name__ == "__main__":
    main()
