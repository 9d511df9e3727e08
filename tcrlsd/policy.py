"""Policy checkpoints: the embedded tiny Llama, its trained tokenizer, and safe loading of any model.

Every checkpoint, the embedded one or a real Llama/Qwen path, is a normal Hugging Face folder
loaded through ``AutoModelForCausalLM`` / ``AutoTokenizer``. Weights load from safetensors only
(``use_safetensors=True``: a folder with only a pickle ``.bin`` is refused), and
``trust_remote_code`` stays off unless the caller turns it on.

torch and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tcrlsd.errors import InputError

__all__ = [
    "TinyLlamaConfig",
    "train_tokenizer",
    "build_tiny_llama",
    "save_policy",
    "load_policy",
    "load_tokenizer",
    "load_generation_config",
    "encode_prompt",
    "resolve_dtype",
    "torch_dtype",
    "WEIGHTS_DIGEST",
]

# The update writes, beside a checkpoint's weights, their sha256 (tcrlsd.update.state.weights_digest)
# in this file. DVC tracks it even where the loop's checkpoint retention keeps the weights themselves
# out of DVC (.dvcignore; tcrlsd/loop/retention.py): the folder's DVC hash still changes with them.
WEIGHTS_DIGEST = "weights.sha256"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# The embedded tokenizer's chat template. The policy is trained on plain prompts (BOS + text, the
# response right after it), so one user message renders exactly as that plain prompt: chat paths
# (prepare's chat_template_tokenizer, chat critics, an OpenAI-compatible server's /chat/completions)
# give the policy what it was trained on. Further non-assistant messages follow after a blank line;
# an assistant message is its text and EOS. The generation prompt adds nothing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] != 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Shape of the embedded default policy (a LlamaConfig, nothing model-specific elsewhere)."""

    vocab_size: int = 384
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on ``texts``, digits split one per token.

    Byte-level means any text (critiques, LaTeX, garbage) encodes without unknown tokens; single
    digits keep arithmetic learnable for a tiny model. Returns a ``PreTrainedTokenizerFast`` with
    ``<s>``/``</s>``/``<pad>`` set, BOS prepended on encode and :data:`CHAT_TEMPLATE` as its chat template.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, config: TinyLlamaConfig = TinyLlamaConfig(), seed: int = 0):
    """A randomly initialised Llama-architecture causal LM sized by ``config``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def save_policy(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer as a Hugging Face folder, atomically (fsync'd, umask modes)."""
    from tcrlsd.artifacts import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def resolve_dtype(name: str, device: str) -> str:
    """The one dtype rule of every stage that loads a model (generate, score, evaluate, critique, update).

    ``auto`` follows the device the model actually runs on: float32 on CPU (bfloat16 matmuls there
    are slow and lose precision), bfloat16 on CUDA. Whether a GPU merely exists does not matter, so
    ``device: cpu`` on a GPU machine is float32. Aliases (fp32, bf16, fp16) keep their meaning.
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if device == "cpu":
        return "float32"
    if device == "cuda" or device.startswith("cuda:"):
        return "bfloat16"
    raise ValueError(f"dtype auto needs a resolved device (cpu, cuda or cuda:N), got {device!r}")


def torch_dtype(name: str, device: str):
    """The torch dtype of :func:`resolve_dtype`."""
    import torch

    return getattr(torch, resolve_dtype(name, device))


def _check_vocab_fits(tokenizer, path: Path) -> None:
    """A tokenizer with more ids than the model's embedding has rows belongs to another model."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return  # no config beside it (a tokenizer-only folder): nothing to compare
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise InputError(f"{path}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is {vocab}; "
                         "the tokenizer files belong to another model")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    _check_vocab_fits(tok, Path(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_generation_config(path: str | os.PathLike):
    """The checkpoint's ``generation_config.json`` as a ``GenerationConfig``, or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        return None


def load_policy(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder, safetensors only, eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.exists() and not any(p.glob("*.safetensors")):
        if (p / WEIGHTS_DIGEST).exists():
            raise FileNotFoundError(
                f"{p}: its weights were removed by the checkpoint retention (params checkpoints.keep_every; "
                f"{WEIGHTS_DIGEST} still names them): start from a kept checkpoint instead")
        raise FileNotFoundError(
            f"{p}: no *.safetensors weights; tcrlsd loads safetensors only (convert pickle .bin files first)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.to(device)
    model.eval()
    return model, load_tokenizer(path, trust_remote_code)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, adding BOS only if the text does not already start with it.

    A chat template renders the BOS itself; adding another would double it.
    """
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
