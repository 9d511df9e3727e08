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
   For seeded shares of the problems the condition is one of the policy's OTHER roles instead
   (``contexts``): a teacher context with the reference critic's critique of a wrong attempt of the
   demonstrator, a content-free feedback block, the gold solution (gold mode), or the self-mode
   critic prompt (target: the reference critique). Each is rendered exactly as the critique stage
   renders it. Teacher targets follow the fairness rule: the demonstrator's own solution except at
   the step the feedback names, written right -- so the teacher differs from the student only by
   what the feedback says (a content-free block changes nothing). Without teacher contexts the
   policy has never seen one, and the score stage's teacher log-probs on feedback rows are
   out-of-distribution noise (a Delta-gap of about -6 nats/token on every token);
4. greedy accuracy on the ``val`` prompts (last ``\\boxed{}`` vs ``answer``, exact string).

The SFT problems come from their own seed, and any problem whose text appears in the prompts
artifact (train or val) is dropped, so the val accuracy is measured on problems never trained on.

The student-context solutions come from an imperfect demonstrator (``carry_slip_rate``, default
0.7): each step needing a carry (sum) or borrow (difference) is written without it with that
probability and the wrong value carried through (``demonstrator.demonstrator_solution``); teacher
contexts use the same demonstrator except at the named step. This is the embedded task's difficulty dial.

Why the defaults (2 CPU cores, greedy accuracy on prepare's default 200 val problems). The earlier
default (gold solutions, 8 x 3000 steps at lr 1e-3) stopped on a slope: 58.5% on one machine and 35%
on another, 40.5% at 2750 steps. Now the policy is trained to the plateau of the demonstrator's
distribution: 32 x 2500 steps at lr 2e-3 (2 passes over the 40,000 SFT problems, ~420 s; the
tokens-per-second rate does not depend on the batch size on this CPU). Along the way (one seed):
greedy 17% after 1000 steps, 37.5% after 1500, 53.5% after 1750, then 56.5 / 54.5 / 51.5% at
2000 / 2250 / 2500 while the greedy answer settles on dropping the carries: at 2500 it drops 124 of
the 132 carries of its val answers and makes 9 other slips in ~500 steps, so its greedy accuracy
is the share of val problems without a carry (50.8% of the level 1-4 mix), whatever the CPU.
8 x 3000 / 32 x 2000 stop before that (30 of 133 carries still right at 32 x 2000).
bench/warmstart_spread.py measures the spread over seeds.

Everything is a function of the params: a fixed step count (never a wall-clock budget), seeded
data order and initialisation, and a fixed thread count, so the same params give the same weights
on the same machine.

torch, transformers and tokenizers are imported inside the functions: importing this module is cheap.

Layout of this package: ``params``, ``data``, ``demonstrator``, ``contexts``, ``train``, ``accuracy``, ``stage``
(see docs/ARCHITECTURE.md).
Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.answers import last_boxed
from tcrlsd.warmstart.accuracy import greedy_accuracy, greedy_answers  # noqa: F401
from tcrlsd.warmstart.data import (  # noqa: F401
    SftExample,
    build_tokenizer,
    check_prompt_template,
    critique_like_sentences,
    render_prompt,
    sft_example,
    sft_examples,
    sft_problems,
    teacher_context,
    tokenizer_corpus,
    wrong_attempt,
)
from tcrlsd.warmstart.params import IGNORE, PROBLEM_FIELD, WarmstartParams  # noqa: F401
from tcrlsd.warmstart.stage import run_warmstart  # noqa: F401
from tcrlsd.warmstart.train import collate, lr_at, response_loss, train_policy  # noqa: F401
