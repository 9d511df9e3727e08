"""Score stage: student and teacher log-probs of every sampled response token.

For each rollout (x, y) with optional feedback f (from the critique stage):

    student_logprobs[t] = log pi_S(y_t | x, y_<t)       input: prompt_token_ids + response_token_ids
    teacher_logprobs[t] = log pi_T(y_t | c, y_<t)       input: encode_prompt(teacher_prompt) + response_token_ids

where c is the rendered teacher context (problem + feedback). The response ids are the sampled
ones, never re-tokenised text. Rows without feedback get teacher = student, copied, with no second
forward pass (Delta_t = 0 there, as in the method note).

Several teacher contexts (K > 1): when the critiques carry ``extra_teacher_prompts`` (K - 1 per
row, ``critique.wrong_hints``), each extra context is scored the same way into
``extra_teacher_logprobs[j]`` (``teacher_logprobs`` stays the primary context); an extra context
without text is the student's copy, by the rule above. All contexts of a part share one pool of
sequences: K contexts cost K teacher passes over the part's rows with feedback, and memory stays
bounded by one part. At K = 1 nothing changes: same sequences, same order, same bytes.

Which weights play the teacher is a param: ``current`` (the student's checkpoint, the method note),
``lagged`` (a copy the update stage refreshes every K iterations, as RLSD's scripts do) or ``ema``
(a moving average kept by the update stage, as SDPO does). For the last two the teacher is the one
the update kept in the policy's folder (``<policy>/teacher``, :mod:`tcrlsd.teachers`; the policy
itself before the first update), or ``--teacher-policy``; the student always is the current
policy. ``teacher_checkpoint`` records that folder (the policy path for ``current``) on every row,
rows without feedback included, whose teacher values are the student's by the rule above.

The student's log-probs may need no forward at all: the generate stage computed them while sampling.
Where the rollouts' ``sampler_logprobs`` are the same numbers (transformers backend, float32 on CPU,
temperature 1 / top_p 1 or greedy, the very checkpoint scored: :mod:`tcrlsd.score.reuse`), they are
taken as ``student_logprobs`` and only the teacher sequences run (``score.reuse_sampler_logprobs``).

How the forward passes are laid out (the part a reader should check):

- Sequences are sorted by length (longest first, stable) and cut greedily into batches whose
  padded size ``batch_size * longest`` stays within ``max_tokens_per_batch``; a sequence longer
  than the budget runs alone. With ``current`` the student and teacher sequences share one pool.
- Padding goes on the right and no attention mask is passed: under causal attention a real token
  attends only to earlier positions, which are all real, so right padding cannot change a real
  token's output and the fused causal attention kernel stays usable.
- The log-prob of response token t comes from the logits at position ``len(context) + t - 1``.
  Only those positions go through the lm head: the decoder's hidden states are gathered at the
  response positions first, then projected in chunks of ``logits_chunk_tokens`` rows, so a full
  (B, T, V) logits tensor is never built. The projection itself runs in fp32 (hidden states and
  head weight cast up, then the architecture's logit scale / soft-cap from
  ``tcrlsd.lm_head.LOGIT_POSTPROCESS``): bf16 logits cast afterwards would be rounded by about as
  much as the Delta-gap. At load, ``tcrlsd.lm_head.check_head_path`` compares this path with
  ``model(ids).logits`` on one short sequence and refuses, naming the architecture, a model whose
  forward does something else. The update stage runs the same head (:mod:`tcrlsd.lm_head`).
- The response ids include the stop id of a "stop" rollout: "stop here" gets a log-prob (and so a
  Delta and an advantage) like every other action.
- Output is written part by part (``rows_per_part`` rollouts each, contiguous in input order)
  through :class:`tcrlsd.resume.ShardedOutput`. Memory is bounded by one part: the inputs stay
  Arrow columns and a part's rows become Python lists (and its teacher prompts token ids) only
  when it is scored; the metrics read the artifact back one part file at a time. A killed run
  resumes at the first missing part, and ``--shard i/N`` workers split the parts.

torch and transformers are imported inside functions: importing this module is cheap.


Layout of this package: ``params``, ``logprobs``, ``inputs``, ``reuse``, ``metrics``, ``stage`` (see
docs/ARCHITECTURE.md). Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.score.inputs import (  # noqa: F401
    PartInputs,
    ScoringInputs,
    build_inputs,
    check_vocab,
    encode_teacher_context,
    score_part,
)
from tcrlsd.score.logprobs import plan_batches, response_logprobs  # noqa: F401
from tcrlsd.score.metrics import artifact_metrics, score_metrics  # noqa: F401
from tcrlsd.score.params import TEACHER_MODES, ScoreError, ScoreParams  # noqa: F401
from tcrlsd.score.reuse import StudentSource, student_source  # noqa: F401
from tcrlsd.score.stage import ScoreRunStats, run_score, teacher_checkpoint_for  # noqa: F401
