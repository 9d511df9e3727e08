"""Warm-starting the embedded default policy: tokenizer, tiny Llama, supervised fine-tuning, eval.

The default pipeline needs a policy that is neither hopeless nor perfect on the synthetic task, so
that GRPO groups mix right and wrong answers. This module builds one from nothing, on a CPU:

1. a byte-level BPE tokenizer trained on the task text (synthetic problems and solutions, the prompt
   template, and plain-English critique-like sentences, so the teacher contexts of the critique
   stage tokenize into words rather than bytes);
2. a randomly initialised tiny Llama (``tcrlsd.policy.build_tiny_llama``);
3. supervised next-token training on the RESPONSE tokens only, conditioned on the prompt exactly as
   the generate stage presents it: ``encode_prompt(tokenizer, prompt_text)`` followed by the
   solution tokenised without special tokens (it starts with ``response_prefix``) and EOS. The
   generate stage appends sampled ids right after the prompt ids, so this is the format the model
   must produce there;
   For a seeded ``teacher_context_fraction`` of the problems the condition is a TEACHER context
   instead: a synthetic wrong attempt (one step's result off by a slip of 1..10 or a carry error of
   10, the wrong value carried through the later steps), the reference critic's feedback on it
   (``tcrlsd.critics.reference_critique``), rendered into the critique stage's ``teacher-critique``
   template by ``tcrlsd.critique.render_teacher_prompt``, i.e. exactly the ``teacher_prompt`` that
   stage writes; the target is still the correct solution. Without these the policy has never seen
   a teacher context, and the score stage's teacher log-probs on feedback rows are out-of-distribution
   noise (a Delta-gap of about -6 nats/token on every token);
4. greedy accuracy on the ``val`` prompts (last ``\\boxed{}`` vs ``answer``, exact string).

The SFT problems come from their own seed, and any problem whose text appears in the prompts
artifact (train or val) is dropped, so the val accuracy is measured on problems never trained on.

Why the defaults (measured on 2 CPU cores, greedy accuracy on held-out levels 1-4): at equal
tokens, many small batches beat few large ones by far (8 x 4000 steps at lr 2e-3: 80%; 16 x 2000:
26%; 32 x 600 never learned to copy the operands). At 8 x 2500 steps, lr 1e-3 gave 35%, 1.5e-3
24%, 3e-3 11% (the higher rates learn to look the operands up later and less reliably; 1e-2
diverged). On prepare's default val set, 8 x 2500 / 2750 / 3000 steps at 1e-3 gave 31.5% / 28% /
67%: the step count changes the whole cosine schedule, so nearby counts are not ordered; 3000
(the default) is the one whose curve had settled (final loss 0.04 against 0.10).
With teacher_context_fraction 0.25 (same seed, lr, batch): 3000 steps gave 58.5% (L1-L4 74 / 72 / 48 /
40%), 2750 gave 40.5%, about 190 s of training for 2750 steps on 2 idle cores (teacher contexts are
about twice as long as student prompts); on the default pipeline the Delta-gap went from -6.0 to
-0.04 nats/token, with Delta clearly negative on the digits of the step the critique names.

Everything is a function of the params: a fixed step count (never a wall-clock budget), seeded
data order and initialisation, and a fixed thread count, so the same params give the same weights
on the same machine.

torch, transformers and tokenizers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from tcrlsd.policy import TinyLlamaConfig
from tcrlsd.synthetic import Problem, make_problems

__all__ = [
    "WarmstartParams",
    "SftExample",
    "render_prompt",
    "check_prompt_template",
    "tokenizer_corpus",
    "critique_like_sentences",
    "build_tokenizer",
    "sft_problems",
    "sft_example",
    "wrong_attempt",
    "teacher_context",
    "sft_examples",
    "collate",
    "response_loss",
    "lr_at",
    "train_policy",
    "last_boxed",
    "greedy_answers",
    "greedy_accuracy",
    "run_warmstart",
]

PROBLEM_FIELD = "{problem}"
IGNORE = -100  # label of positions that carry no loss (prompt and padding)


@dataclass(frozen=True)
class WarmstartParams:
    """The ``warmstart`` section of params.yaml (each key is documented there)."""

    seed: int = 1_000_003
    # task (the SFT corpus; the val prompts come from the prepare stage)
    sft_problems: int = 40_000
    levels: tuple[int, ...] = (1, 2, 3, 4)
    max_operand: int = 20
    prompt_template: str = "{problem} Let's think step by step and output the final answer within \\boxed{}."
    response_prefix: str = "\n"
    # tokenizer
    vocab_size: int = 512
    tokenizer_problems: int = 4000
    # share of SFT problems shown in a teacher context (problem + critique of a wrong attempt)
    teacher_context_fraction: float = 0.25
    # model shape (a LlamaConfig); its vocab_size is the trained tokenizer's, set above
    model: TinyLlamaConfig = TinyLlamaConfig()
    # optimisation
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    num_threads: int = 2
    # evaluation
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 64

    def __post_init__(self):
        if PROBLEM_FIELD not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {PROBLEM_FIELD}; got {self.prompt_template!r}")
        if not self.levels or any(level < 1 for level in self.levels):
            raise ValueError(f"levels must be a non-empty list of integers >= 1; got {list(self.levels)}")
        for name in ("steps", "batch_size", "sft_problems", "vocab_size", "eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.teacher_context_fraction <= 1:
            raise ValueError(f"teacher_context_fraction must be in [0, 1]; got {self.teacher_context_fraction}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}]; got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1; got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")

    def model_config(self) -> TinyLlamaConfig:
        return dataclasses.replace(self.model, vocab_size=self.vocab_size)


# --------------------------------------------------------------------------------------------------
# Text


def render_prompt(template: str, problem: str) -> str:
    """The policy input for ``problem``: ``template`` with ``{problem}`` replaced.

    Plain replacement, not ``str.format``: the template holds ``\\boxed{}``, whose braces are text.
    """
    return template.replace(PROBLEM_FIELD, problem)


def check_prompt_template(template: str, problems: Sequence[str], prompts: Sequence[str], source: str) -> None:
    """Fail if the prompts artifact was rendered with another template than the SFT corpus uses.

    The warm-started model only learns to answer after prompts of the exact form it was trained on.
    """
    for row, (problem, prompt) in enumerate(zip(problems, prompts)):
        want = render_prompt(template, problem)
        if prompt != want:
            raise ValueError(
                f"{source}: row {row}: column 'prompt' is {prompt!r}, but warmstart.prompt_template renders "
                f"{want!r}; set warmstart.prompt_template to the template the prepare stage used"
            )


_CRITIQUE_PHRASES = (
    "Here is feedback on your earlier attempt:",
    "The following is feedback from your unsuccessful earlier attempt:",
    "Here is a reference solution:",
    "Correct solution:",
    "Solve the original question.",
    "Correctly solve the original question.",
    "Now solve the problem again in your own way.",
    "Your final answer is correct.",
    "Your final answer is wrong.",
    "The final answer is missing: write it inside \\boxed{}.",
    "The response stops before giving a final answer.",
    "You used the wrong number from the question.",
    "You skipped a step of the question.",
    "Check each step before you write the final answer.",
    "The problem asks for the result after every operation, in order.",
    "Feedback: the answer is not in the expected format.",
    "Each step must continue from the result of the step before it.",
    "Carry the corrected result into the steps after it.",
    "All steps are right and the boxed answer is the result of the last step; I find no error in this attempt.",
    "You are reviewing a student's attempt at a math problem.",
    "Point to the first step where the attempt goes wrong, say what is wrong with it and how to fix that step.",
)
_OP_WORDS = {"+": "adding", "-": "subtracting", "*": "multiplying by"}


def critique_like_sentences(problems: Iterable[Problem], seed: int) -> list[str]:
    """Plain-English feedback of the kind a critic writes about a wrong step, for the tokenizer.

    e.g. "Step 2 is wrong: 19 * 3 is 57, not 54." -- not training data for the model, only text the
    tokenizer should encode into words.
    """
    rng = random.Random(seed)
    out = list(_CRITIQUE_PHRASES)
    for p in problems:
        k = rng.randrange(len(p.steps))
        a, op, b, r = p.steps[k]
        wrong = r + rng.choice([-10, -2, -1, 1, 2, 10]) if r > 10 else r + 1
        out.append(f"Step {k + 1} is wrong: {a} {op} {b} is {r}, not {wrong}.")
        out.append(f"In step {k + 1} you made a mistake when {_OP_WORDS[op]} {b}; the correct value is {r}.")
        out.append(f"The final answer should be {p.answer}, not {wrong}. The first {k} steps are correct.")
    return out


def tokenizer_corpus(params: WarmstartParams) -> list[str]:
    """Task text the tokenizer is trained on: problems, solutions, the template, critiques."""
    problems = make_problems(params.tokenizer_problems, seed=params.seed + 1, levels=params.levels,
                             max_operand=params.max_operand)
    texts = [render_prompt(params.prompt_template, p.problem) + params.response_prefix + p.solution for p in problems]
    texts += critique_like_sentences(problems[: max(1, len(problems) // 4)], seed=params.seed + 2)
    return texts


def build_tokenizer(params: WarmstartParams):
    from tcrlsd.policy import train_tokenizer

    return train_tokenizer(tokenizer_corpus(params), vocab_size=params.vocab_size)


# --------------------------------------------------------------------------------------------------
# SFT data


@dataclass(frozen=True)
class SftExample:
    input_ids: tuple[int, ...]  # prompt ids + response ids
    labels: tuple[int, ...]  # IGNORE on the prompt, the response ids (EOS included) after it
    prompt_len: int
    teacher_context: bool = False  # the prompt is a teacher context (problem + feedback), not the student's


def _norm(text: str) -> str:
    return " ".join(text.split())


def sft_problems(params: WarmstartParams, exclude: Iterable[str] = ()) -> list[Problem]:
    """The SFT corpus: ``sft_problems`` problems from this section's seed, minus ``exclude`` texts."""
    banned = {_norm(t) for t in exclude}
    problems = make_problems(params.sft_problems, seed=params.seed, levels=params.levels, max_operand=params.max_operand)
    kept = [p for p in problems if _norm(p.problem) not in banned]
    if not kept:
        raise ValueError("every SFT problem also appears in the prompts file; raise warmstart.sft_problems")
    return kept


def sft_example(tokenizer, prompt_text: str, response_text: str) -> SftExample:
    """One training sequence: prompt ids as the generate stage builds them, then the response + EOS.

    Prompt and response are tokenised separately, exactly as generation sees them (prompt ids, then
    the sampled ids appended), so no merge across the boundary can differ between train and sample.
    """
    from tcrlsd.policy import encode_prompt

    prompt = encode_prompt(tokenizer, prompt_text)
    response = list(tokenizer(response_text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return SftExample(tuple(prompt + response), tuple([IGNORE] * len(prompt) + response), len(prompt))


def wrong_attempt(problem: Problem, rng: random.Random) -> str:
    """A plausible WRONG solution of ``problem``, the way the tiny policy errs.

    One step gets a wrong result -- a carry error (off by 10) or an arithmetic slip of 1..10 either
    way -- and the wrong value is carried through the remaining steps, which are computed right from
    it; the last result is boxed. Values stay >= 0 (the draw is retried; the last try is clamped).
    """
    from tcrlsd.synthetic import solution_steps

    steps = problem.steps
    for attempt in range(20):
        k = rng.randrange(len(steps))
        a, op, b, r = steps[k]
        delta = rng.choice((-10, 10)) if rng.random() < 0.4 else rng.choice((-1, 1)) * rng.randint(1, 10)
        wrong = r + delta
        if wrong < 0:
            if attempt < 19:
                continue
            wrong = r + abs(delta)
        out = list(steps[:k]) + [(a, op, b, wrong)]
        value = wrong
        for _, op2, b2, _ in steps[k + 1:]:
            nxt = value + b2 if op2 == "+" else value - b2 if op2 == "-" else value * b2
            out.append((value, op2, b2, nxt))
            value = nxt
        if value >= 0 or attempt == 19:
            return solution_steps(out, value)
    raise AssertionError("unreachable")


def teacher_context(prompt_template: str, problem: Problem, attempt: str, template=None) -> tuple[str, str]:
    """``(teacher_prompt, feedback)`` for a wrong ``attempt`` at ``problem``, as the critique stage makes them.

    The feedback is the reference critic's (:func:`tcrlsd.critics.reference_critique`, final answer not
    revealed: the default), and the context is rendered by the critique stage's own
    :func:`tcrlsd.critique.render_teacher_prompt` with its ``teacher-critique`` template (default
    templates folder unless ``template`` is given), from the student prompt split as it splits it.
    """
    from tcrlsd.critics import reference_critique
    from tcrlsd.critique import default_templates_dir, load_template, render_teacher_prompt, split_student_prompt

    reply = reference_critique(attempt, problem.solution)
    if reply.text is None:
        raise ValueError(f"reference critic gave no feedback for a synthetic attempt: {reply.error}")
    if template is None:
        template = load_template(default_templates_dir(), "teacher-critique")
    prefix, text, instruction = split_student_prompt(render_prompt(prompt_template, problem.problem), problem.problem)
    return render_teacher_prompt(template, prefix, text, instruction, reply.text), reply.text


def sft_examples(tokenizer, params: WarmstartParams, problems: Sequence[Problem]) -> list[SftExample]:
    """The SFT sequences: the correct solution after the student prompt or, for a seeded
    ``teacher_context_fraction`` of the problems, after a teacher context (problem + reference critique
    of a synthetic wrong attempt), so the policy can play the teacher of the critique/score stages.
    Either way the loss is on the solution tokens only.
    """
    rng = random.Random(params.seed + 3)
    template = None
    out = []
    for p in problems:
        response = params.response_prefix + p.solution
        if params.teacher_context_fraction > 0 and rng.random() < params.teacher_context_fraction:
            if template is None:
                from tcrlsd.critique import default_templates_dir, load_template

                template = load_template(default_templates_dir(), "teacher-critique")
            prompt, _ = teacher_context(params.prompt_template, p, wrong_attempt(p, rng), template)
            out.append(dataclasses.replace(sft_example(tokenizer, prompt, response), teacher_context=True))
        else:
            out.append(sft_example(tokenizer, render_prompt(params.prompt_template, p.problem), response))
    return out


def collate(examples: Sequence[SftExample], pad_id: int):
    """Right-padded ``(input_ids, attention_mask, labels)`` tensors, each (B, T)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, mask, labels


def response_loss(logits, labels):
    """Token-mean next-token cross-entropy over the positions whose label is not IGNORE.

    logits (B, T, V) predict the token at t+1 from position t; labels (B, T) hold the token at t
    (IGNORE on prompt and padding), so the prompt carries no loss and the first response token is
    predicted from the last prompt position.
    """
    import torch.nn.functional as F

    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def lr_at(step: int, params: WarmstartParams) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    span = max(1, params.steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / span)
    floor = params.lr * params.min_lr_ratio
    return floor + (params.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Training


def _param_groups(model, weight_decay: float):
    """Weight decay on matrices only (not norms; the tied embedding counts as a matrix)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _chunks(values: list[float], n: int) -> list[list[float]]:
    size = max(1, math.ceil(len(values) / n))
    return [values[i: i + size] for i in range(0, len(values), size)]


def _length_bucketed_batches(examples: Sequence[SftExample], batch_size: int, gen, pool: int = 64) -> list[list[int]]:
    """One pass over ``examples`` as batches of similar length (less padding), in a seeded order.

    A random permutation is cut into pools of ``pool`` batches; each pool is sorted by length and cut
    into batches; the batches are shuffled. Returned as a stack: the caller pops from the end.
    """
    import torch

    perm = torch.randperm(len(examples), generator=gen).tolist()
    batches: list[list[int]] = []
    step = batch_size * pool
    for lo in range(0, len(perm), step):
        chunk = sorted(perm[lo: lo + step], key=lambda i: (len(examples[i].input_ids), i))
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches  # drop ragged tails
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def train_policy(params: WarmstartParams, exclude: Iterable[str] = (), progress: bool = True):
    """Build the tokenizer and tiny Llama and train it; returns ``(model, tokenizer, stats)``.

    Batches are drawn without replacement from the SFT corpus in a seeded order (a new permutation
    per pass), right-padded; the loss is :func:`response_loss`.
    """
    import torch
    from tqdm import tqdm

    from tcrlsd.policy import build_tiny_llama

    if params.num_threads > 0:
        torch.set_num_threads(params.num_threads)
    tokenizer = build_tokenizer(params)
    problems = sft_problems(params, exclude)
    examples = sft_examples(tokenizer, params, problems)
    n_teacher = sum(e.teacher_context for e in examples)
    model = build_tiny_llama(tokenizer, params.model_config(), seed=params.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        _param_groups(model, params.weight_decay), lr=params.lr,
        betas=(params.adam_beta1, params.adam_beta2), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(params.seed)
    order: list[list[int]] = []
    tokens = response_tokens = 0
    losses: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(params.steps), desc="warmstart", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if not order:
            order = _length_bucketed_batches(examples, params.batch_size, gen)
        batch = [examples[i] for i in order.pop()]
        ids, mask, labels = collate(batch, tokenizer.pad_token_id)  # (B, T) each
        for group in opt.param_groups:
            group["lr"] = lr_at(step, params)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        loss = response_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        tokens += int(mask.sum())
        response_tokens += int((labels != IGNORE).sum())
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == params.steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    model.eval()
    tail = losses[-min(50, len(losses)):]
    stats = {
        "parameters": n_params,
        "sft_examples": len(examples),
        "teacher_context_examples": n_teacher,
        "steps": params.steps,
        "train_tokens": tokens,
        "train_response_tokens": response_tokens,
        "train_seconds": round(elapsed, 2),
        "train_cpu_seconds": round(time.process_time() - start_cpu, 2),
        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        "final_loss": round(sum(tail) / len(tail), 5),
        # mean loss of each tenth of training: the learning curve, for a glance in the metrics
        "loss_curve": [round(sum(c) / len(c), 4) for c in _chunks(losses, 10)],
        "vocab_size": len(tokenizer),
    }
    return model, tokenizer, stats


# --------------------------------------------------------------------------------------------------
# Evaluation


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces handled), or None."""
    key = "\\boxed{"
    start = text.rfind(key)
    while start != -1:
        depth, i = 1, start + len(key)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(key): i - 1].strip()
        start = text.rfind(key, 0, start)  # unclosed: fall back to an earlier, closed one
    return None


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                   progress: bool = False) -> list[str]:
    """Greedy completions (special tokens skipped) of ``prompts``, batched with left padding.

    Prompts are encoded with ``encode_prompt`` like the generate stage, and batched in length order
    (less padding); the result is in the input order.
    """
    import torch
    from tqdm import tqdm

    from tcrlsd.policy import encode_prompt

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for idx in tqdm(batches, desc="greedy eval", disable=not progress, dynamic_ncols=True):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )  # (B, T + new)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True)
    return out


def greedy_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    levels: Sequence[int | None], max_new_tokens: int, batch_size: int,
                    progress: bool = False) -> dict:
    """Greedy accuracy overall and per level: last ``\\boxed{}`` equals ``answer`` exactly."""
    texts = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    correct = [last_boxed(t) == str(a).strip() for t, a in zip(texts, answers)]
    per_level: dict[str, list[bool]] = {}
    for ok, level in zip(correct, levels):
        per_level.setdefault(str(level), []).append(ok)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "accuracy_by_level": {k: sum(v) / len(v) for k, v in sorted(per_level.items())},
        "n_by_level": {k: len(v) for k, v in sorted(per_level.items())},
    }


# --------------------------------------------------------------------------------------------------
# The stage


def run_warmstart(params: WarmstartParams, prompts, source: str = "prompts", progress: bool = True):
    """Train on the SFT corpus (minus every problem in ``prompts``) and evaluate on its val split.

    ``prompts`` is the validated prompts table. Returns ``(model, tokenizer, metrics)``.
    """
    problems = prompts.column("problem").to_pylist()
    splits = prompts.column("split").to_pylist()
    val = [i for i, s in enumerate(splits) if s == "val"]
    if not val:
        raise ValueError(f"{source}: no rows with split == 'val'; warmstart evaluates on the val prompts")
    val_prompts = [prompts.column("prompt")[i].as_py() for i in val]
    check_prompt_template(params.prompt_template, [problems[i] for i in val], val_prompts, source)
    model, tokenizer, stats = train_policy(params, exclude=problems, progress=progress)
    start, start_cpu = time.perf_counter(), time.process_time()
    metrics = greedy_accuracy(
        model, tokenizer, val_prompts,
        [prompts.column("answer")[i].as_py() for i in val],
        [prompts.column("level")[i].as_py() for i in val],
        params.eval_max_new_tokens, params.eval_batch_size, progress,
    )
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    metrics["eval_cpu_seconds"] = round(time.process_time() - start_cpu, 2)
    metrics.update(stats)
    metrics["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}
    return model, tokenizer, metrics
