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
   (``tcrlsd.reference_critic.reference_critique``), rendered into the critique stage's ``teacher-critique``
   template by ``tcrlsd.templates.render_teacher_prompt``, i.e. exactly the ``teacher_prompt`` that
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

Layout of this package: ``params``, ``data``, ``train``, ``accuracy``, ``stage`` (see docs/ARCHITECTURE.md).
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
