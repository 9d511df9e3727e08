"""The critique stage: the teacher's feedback for each rollout, and the teacher context it goes into.

Modes (``critique.mode``), i.e. where the feedback ``f`` of the teacher ``pi(y | x, f)`` comes from:

- ``critique``       an external critic reads problem + rollout + verdict (TC-RLSD);
- ``critique_gold``  the critic also sees the gold solution;
- ``gold``           f = the gold solution itself (RLSD-gold);
- ``self``           the policy critiques its own rollout through the generation backend (RLSD-self);
- ``sibling``        f = a successful sibling rollout of the same group, never the sample itself (SDPO);
                     no feedback when no other sample of the group is correct;
- ``none``           no feedback anywhere (GRPO): teacher = student.

Which rollouts get feedback (``critique.which``): ``incorrect`` or ``all``; the default ``auto`` means
``all`` in ``gold`` and ``sibling`` modes and ``incorrect`` otherwise. Controls (``critique.control``:
``blank``, ``shuffled``) and the reference critic's noise (``critique.reference_noise``) are in
``controls``; each row records what was done to it in its ``critic`` column. Gold is a property of the problem, not of the
attempt: RLSD shows the reference solution to the teacher for every rollout, so coverage is 1.0 there;
a critique of a correct rollout has little to say, so critique modes cover the incorrect ones and
coverage equals the incorrect share.

Wrong hints (``critique.wrong_hints``, default 0): each row with feedback also gets that many extra
teacher contexts whose feedback the same critic wrote as if the rollout answered another prompt of
the iteration (``wrong_hints``; the score stage scores them, the ``rlcsd`` estimator contrasts them).

Each row's ``teacher_prompt`` is the full teacher context the score stage tokenises and puts before
the same response ids: the student's own prompt text with the feedback inserted after the problem
and the original question asked again (``configs/templates/teacher-*.txt``). The student prompt is
``prefix + problem + instruction`` (prepare's template, e.g. problem + " Let's think step by step
..."); prefix and instruction are recovered from the prompts row, so the teacher sees the same
instruction. With ``policy_chat_template_tokenizer`` the student prompt was a chat-template
rendering; it is unwrapped with that tokenizer and the teacher context is wrapped the same way.

Templates are files ``configs/templates/NAME.txt`` whose first line is ``# id: NAME@vN``; leading
``#`` lines are comments. Slots are ``${name}`` (``string.Template``): model text fills slots in one
pass and is never itself parsed as a template, so a rollout that writes ``${gold_solution}`` or
``{0}`` stays literal text.

Per-row flags and the metrics JSON: ``leaks_answer`` (the feedback contains the gold final answer as a
token, before any masking), ``suspected_false_negative`` (for a rollout the strict grader rejected:
the critic says it is right, or a relaxed grader -- formatting stripped, numeric equality -- accepts
it). Resumable and sharded through :class:`tcrlsd.resume.ShardedOutput`; model critics also keep a
per-part journal of answered rows (``.critiques.resume/journal-NNNNN.jsonl`` beside the output,
fsync'd per line) so a critic that dies mid-part loses nothing already answered; the journal is
removed once its part is written. A row whose request failed transiently (timeouts, 5xx, dropped
connections, after every attempt) is not final: its part is left unwritten, journal kept, and the
stage ends with :class:`CriticRetryLater`; a rerun asks only those rows again. Permanent failures
(a 4xx, an empty reply) are journaled, written with their ``error`` and named in the metrics.


Layout of this package: ``params``, ``protocol``, ``backends``, ``flags``, ``journal``, ``wrong_hints``, ``stage`` (see
docs/ARCHITECTURE.md). Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.critique.backends import CRITICS, GenerationCritic, ReferenceCritic, make_critic, render_chat  # noqa: F401
from tcrlsd.critique.flags import claims_correct, contains_answer, mask_answer, relaxed_equal  # noqa: F401
from tcrlsd.critique.journal import Journal, prompt_sha  # noqa: F401
from tcrlsd.critique.openai_critic import OpenAICritic  # noqa: F401
from tcrlsd.critique.params import MODES, CritiqueError, CritiqueParams  # noqa: F401
from tcrlsd.critique.protocol import (  # noqa: F401
    Critic,
    CriticAborted,
    CriticRetryLater,
    CritiqueRequest,
    OnReply,
    clean_feedback,
)
from tcrlsd.critique.stage import (  # noqa: F401
                              critique_fingerprint,
                              critique_metrics,
                              critique_rows,
                              join_inputs,
                              needs_feedback,
                              read_inputs,
                              run_critique,
)
from tcrlsd.reference_critic import CriticReply, parse_steps, reference_critique
from tcrlsd.templates import (
                              Template,
                              TemplateError,
                              default_templates_dir,
                              grader_finding,
                              load_template,
                              render_critic_prompt,
                              render_teacher_prompt,
                              split_student_prompt,
                              truncate_middle,
)
