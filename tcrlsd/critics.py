"""Critic backends: one registry, name -> factory, every factory returning a :class:`Critic`.

A critic turns :class:`CritiqueRequest` records (a rendered critic prompt plus the structured row it
came from) into :class:`CriticReply` records (feedback text, or the reason there is none). Backends:

- ``reference``: the embedded default for the synthetic task. No model: it parses the rollout's step
  lines (``a op b = r``) and the gold step-by-step solution (:mod:`tcrlsd.synthetic` format) and
  names the FIRST wrong step in plain words. Deterministic. It reads the structured row, not the
  rendered prompt. Leakage policy: it states the right result of a wrong intermediate step (that is
  what a good critic does), but never the right result of the LAST step nor the value to box, since
  both are the gold final answer -- unless ``reference_reveal_final_answer`` is on. An intermediate
  result can still equal the final answer by coincidence; the leakage metric counts those honestly.
- ``transformers`` / ``vllm``: any chat model path, through the generation backends of
  :mod:`tcrlsd.generate_backends`; the prompt is rendered with the critic tokenizer's chat template
  when it has one. ``self`` mode uses the same class with the policy checkpoint.
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``, ...): a thread pool
  of ``max_concurrency`` requests, a per-request socket timeout, retries with exponential backoff and
  jitter seeded from (seed, rollout_id, attempt). The API key is read from the environment variable
  named by ``api_key_env`` at call time, sent only in the Authorization header, and scrubbed from
  any error text; it is never stored on the object, in a file, a log or an error.

Replies from model critics are cleaned: a ``<think>...</think>`` block (reasoning models) is
dropped, whitespace is stripped, and the text is cut to ``max_feedback_chars``.

torch, transformers and vllm are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
import http.client
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from tcrlsd.generation import SamplingConfig
from tcrlsd.prepare import extract_boxed

if TYPE_CHECKING:  # pragma: no cover
    from tcrlsd.critique import CritiqueParams

__all__ = [
    "CRITICS",
    "REFERENCE_CRITIC_ID",
    "Critic",
    "CriticReply",
    "CritiqueRequest",
    "CriticAborted",
    "GenerationCritic",
    "OpenAICritic",
    "ReferenceCritic",
    "Step",
    "clean_feedback",
    "make_critic",
    "parse_steps",
    "reference_critique",
]

# The reference critic's phrasing has a version id like a template file (recorded in `template`).
REFERENCE_CRITIC_ID = "reference-critic@v1"


@dataclass(frozen=True)
class CritiqueRequest:
    """One rollout to critique: the rendered prompt (what a model critic reads) and its row."""

    rollout_id: str
    prompt: str  # rendered critic prompt (one user message); response already truncated inside
    problem: str
    response_text: str  # the full response (the reference critic reads it directly)
    gold_solution: str | None
    gold_answer: str
    is_correct: bool
    extracted_answer: str | None


@dataclass(frozen=True)
class CriticReply:
    text: str | None  # cleaned feedback; None when the critic failed
    error: str | None = None  # why there is no text (None when text is set)


OnReply = Callable[[int, CriticReply], None]


class Critic(Protocol):
    label: str  # recorded in the `critic` column: backend and model
    journaled: bool  # answers are slow or remote: keep the per-part answered-rows journal
    # The critic's own phrasing version (recorded in `template`) when it reads the structured row
    # instead of a rendered prompt; None for model critics (the prompt template's id is recorded).
    template_id: str | None

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        """Call ``on_reply(i, reply)`` exactly once per request ``i`` (any order, from the calling thread)."""
        ...


class CriticAborted(RuntimeError):
    """The critic failed so many rows in a row that it is probably down; stop and resume later."""


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def clean_feedback(text: str, max_chars: int) -> CriticReply:
    """Drop reasoning blocks, strip, cut to ``max_chars``; an empty result is an error."""
    out = _THINK.sub("", text)
    if "<think>" in out:  # unterminated: the reply ran out of tokens while still reasoning
        out = out.split("<think>", 1)[0]
    out = out.strip()
    if not out:
        return CriticReply(None, "empty critique")
    if len(out) > max_chars:
        out = out[:max_chars].rstrip() + " [...]"
    return CriticReply(out, None)


# --------------------------------------------------------------------------------------------------
# reference


@dataclass(frozen=True)
class Step:
    left: int
    op: str  # "+", "-" or "*"
    right: int
    result: int


_STEP = re.compile(r"(-?\d+)[ \t]*([-+*×xX])[ \t]*(-?\d+)[ \t]*=[ \t]*(-?\d+)")
_OP_ALIASES = {"×": "*", "x": "*", "X": "*"}
_VERB = {"+": "add", "-": "subtract", "*": "multiply by"}
_PAST = {"+": "added", "-": "subtracted", "*": "multiplied by"}
_NOUN = {"+": "addition", "-": "subtraction", "*": "multiplication"}


def parse_steps(text: str) -> list[Step]:
    """Every ``a op b = r`` in ``text``, one per line at most (the first on each line), in order."""
    steps = []
    for line in text.splitlines():
        m = _STEP.search(line)
        if m:
            op = _OP_ALIASES.get(m.group(2), m.group(2))
            steps.append(Step(int(m.group(1)), op, int(m.group(3)), int(m.group(4))))
    return steps


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _all_right(n: int) -> str:
    return "The one step is right" if n == 1 else f"All {n} steps are right"


def _same_number(text: str, value: int) -> bool:
    """``\\boxed{52}``, ``\\boxed{ 52. }`` and ``\\boxed{52.0}`` all box 52."""
    s = re.sub(r"[\s$]", "", text).rstrip(".")
    try:
        return float(s) == value
    except ValueError:
        return False


def reference_critique(response: str, solution: str | None, reveal_final_answer: bool = False) -> CriticReply:
    """A plain-language critique of the first wrong step of ``response`` against ``solution``."""
    gold = parse_steps(solution or "")
    if not gold:
        return CriticReply(None, "no step-by-step gold solution (the reference critic needs the synthetic format)")
    mine = parse_steps(response)
    boxed = extract_boxed(response)
    n = len(gold)
    ops = "operation" if n == 1 else f"{n} operations"
    if not mine:
        first = gold[0]
        if boxed is None:
            text = (f"The response has no calculation steps and no final answer in \\boxed{{}}. Work through the "
                    f"{ops} of the problem one at a time, one line each, like 'a + b = c', starting from "
                    f"{first.left}, and put the last result in \\boxed{{}}.")
        else:
            text = (f"The response gives the answer {boxed} without any calculation steps. Work through the "
                    f"{ops} one at a time, one line each, like 'a + b = c'; the first one is to "
                    f"{_VERB[first.op]} {first.right}, starting from {first.left}.")
        return CriticReply(text)
    for i, (g, m) in enumerate(zip(gold, mine)):
        k = i + 1
        if m.left != g.left:
            if i == 0:
                return CriticReply(f"Step 1 starts from {m.left}, but the problem starts with {g.left}. "
                                   "Copy the starting number from the problem.")
            return CriticReply(f"Step {k} starts from {m.left}, but the result of step {i} is {g.left}. "
                               "Each step must continue from the result of the step before it.")
        if m.op != g.op:
            return CriticReply(f"Step {k} should {_VERB[g.op]} {g.right}, as the problem says, but it "
                               f"{_PAST[m.op]} {m.right} instead.")
        if m.right != g.right:
            return CriticReply(f"In step {k} the problem says to {_VERB[g.op]} {g.right}, but the step uses "
                               f"{m.right}. Copy the number from the problem.")
        true = _apply(m.left, m.op, m.right)
        if m.result != true:
            sym = "*" if m.op == "*" else m.op
            if i == n - 1 and not reveal_final_answer:  # the right result here IS the final answer
                return CriticReply(f"Step {k} has an arithmetic error: {m.left} {sym} {m.right} is not "
                                   f"{m.result}. Redo this {_NOUN[m.op]} carefully.")
            return CriticReply(f"Step {k} has an arithmetic error: {m.left} {sym} {m.right} is {true}, not "
                               f"{m.result}. Carry the corrected result into the steps after it.")
    if len(mine) < n:
        nxt = gold[len(mine)]
        done = len(mine)
        return CriticReply(f"The first {done} step{'s are' if done > 1 else ' is'} right, but the work stops "
                           f"there: the problem has {n} operations. The next one is to "
                           f"{_VERB[nxt.op]} {nxt.right}.")
    if len(mine) > n:
        return CriticReply(f"{_all_right(n)} and the problem is finished after step {n}, but "
                           f"step {n + 1} is an operation the problem does not ask for. "
                           f"The answer is the result of step {n}.")
    last = mine[-1].result
    if boxed is None:
        return CriticReply(f"{_all_right(n)}, but the final answer is not "
                           "written in \\boxed{}. Put the result of the last step in \\boxed{}.")
    if not _same_number(boxed, last):
        tail = f" Box {last}." if reveal_final_answer else f" Box the result of step {n}."
        return CriticReply(f"{_all_right(n)}, but the boxed answer ({boxed}) "
                           f"is not the result of the last step.{tail}")
    return CriticReply(f"{_all_right(n)} and the boxed answer is the result "
                       "of the last step; I find no error in this attempt.")


class ReferenceCritic:
    label = "reference"
    journaled = False  # instant and deterministic: nothing to lose
    template_id = REFERENCE_CRITIC_ID

    def __init__(self, reveal_final_answer: bool = False):
        self.reveal_final_answer = reveal_final_answer

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        for i, r in enumerate(requests):
            on_reply(i, reference_critique(r.response_text, r.gold_solution, self.reveal_final_answer))


def _make_reference(params: "CritiqueParams", model: str) -> Critic:
    return ReferenceCritic(params.reference_reveal_final_answer)


# --------------------------------------------------------------------------------------------------
# transformers / vllm (and self mode): through the generation backends


def render_chat(tokenizer, text: str, chat_template_kwargs: dict | None = None) -> str:
    """``text`` as one user message through the tokenizer's chat template; unchanged without one."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, **(chat_template_kwargs or {}))


class GenerationCritic:
    """A chat model (or the policy itself, in ``self`` mode) run through a generation backend.

    Requests go to the backend in fixed chunks of ``chunk_rows``, and each chunk's replies are reported
    when it finishes, so the journal keeps whole chunks: a resumed part regenerates whole chunks of the
    same composition (the transformers backend's samples depend on batch composition).
    """

    journaled = True
    template_id = None

    def __init__(self, backend: str, model_path: str, options: dict, sampling: SamplingConfig,
                 max_feedback_chars: int, chunk_rows: int = 64, chat_template_kwargs: dict | None = None,
                 label: str | None = None):
        self.backend_name = backend
        self.model_path = model_path
        self.options = dict(options)
        self.sampling = sampling
        self.max_feedback_chars = max_feedback_chars
        self.chunk_rows = max(1, chunk_rows)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.label = label or f"{backend}:{model_path}"
        self._backend = None
        self._tokenizer = None

    def _load(self):
        if self._backend is None:
            from tcrlsd.generate_backends import make_backend
            from tcrlsd.policy import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path, self.options.get("trust_remote_code", False))
            self._backend = make_backend(self.backend_name, self.model_path, **self.options)
        return self._backend, self._tokenizer

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        if not requests:
            return
        from tcrlsd.policy import encode_prompt

        backend, tok = self._load()
        ids = [encode_prompt(tok, render_chat(tok, r.prompt, self.chat_template_kwargs)) for r in requests]
        for start in range(0, len(requests), self.chunk_rows):
            chunk = ids[start:start + self.chunk_rows]
            outs = backend.generate(chunk, 1, self.sampling)
            for j, group in enumerate(outs):
                on_reply(start + j, clean_feedback(group[0].text, self.max_feedback_chars))


def _generation_options(params: "CritiqueParams") -> dict:
    return {"device": params.device, "dtype": params.dtype, "trust_remote_code": params.trust_remote_code,
            **dict(params.backend_options)}


def _make_generation(backend: str):
    def factory(params: "CritiqueParams", model: str) -> Critic:
        if not model:
            raise ValueError(f"critic {backend!r} needs a model: set critique.critic_model to a model path")
        return GenerationCritic(backend, model, _generation_options(params), params.sampling(),
                                params.max_feedback_chars, params.chunk_rows, params.chat_template_kwargs)

    return factory


# --------------------------------------------------------------------------------------------------
# openai-compatible HTTP


class _Retryable(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class _Fatal(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


_RETRY_STATUS = {408, 409, 425, 429}


class OpenAICritic:
    """``POST {base_url}/chat/completions``, ``max_concurrency`` requests at a time (see module notes).

    Each request carries its own seed, derived from (seed, rollout_id), so a reply does not depend on
    the order requests were sent in. ``abort_after_failures`` rows failing one after another (in
    completion order) stop the run with :class:`CriticAborted` -- a dead server should leave the part
    unwritten, to be resumed, rather than fill it with errors.
    """

    journaled = True
    template_id = None

    def __init__(self, base_url: str, model: str, api_key_env: str, sampling: SamplingConfig,
                 max_feedback_chars: int, max_concurrency: int = 8, request_timeout_s: float = 120.0,
                 max_attempts: int = 4, backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0,
                 abort_after_failures: int = 32, chat_template_kwargs: dict | None = None):
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env  # the variable's NAME; the key itself is read per run
        self.sampling = sampling
        self.max_feedback_chars = max_feedback_chars
        self.max_concurrency = max_concurrency
        self.timeout = request_timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.abort_after_failures = abort_after_failures
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.label = f"openai:{model}"
        # A proxy set in the environment would also see the Authorization header; that is the
        # user's network setup, honoured like any HTTP client does.
        self._opener = urllib.request.build_opener()

    def _body(self, req: CritiqueRequest) -> bytes:
        from tcrlsd.generate_backends import derive_seed

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_new_tokens,
            "seed": derive_seed(self.sampling.seed, req.rollout_id) & 0x7FFFFFFF,
        }
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        return json.dumps(body).encode()

    def _post(self, body: bytes, key: str | None) -> str:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            kind = f"http {exc.code}"
            if exc.code >= 500 or exc.code in _RETRY_STATUS:
                raise _Retryable(kind) from None
            raise _Fatal(kind) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable("timeout") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable("timeout") from None
            raise _Retryable("connection error") from None
        except (http.client.HTTPException, ConnectionError, OSError):
            raise _Retryable("connection error") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed reply") from None
        if not isinstance(content, str):
            raise _Retryable("malformed reply")
        return content

    def _backoff(self, rollout_id: str, attempt: int) -> float:
        rng = random.Random(f"{self.sampling.seed}/{rollout_id}/{attempt}")  # str seeds hash stably
        base = min(self.backoff_max_s, self.backoff_initial_s * (2 ** (attempt - 1)))
        return base * (0.5 + rng.random())  # jitter in [0.5, 1.5) x base

    def _ask(self, req: CritiqueRequest, key: str | None) -> CriticReply:
        body = self._body(req)
        kind = "no attempt"
        for attempt in range(1, self.max_attempts + 1):
            try:
                return clean_feedback(self._post(body, key), self.max_feedback_chars)
            except _Fatal as exc:
                return CriticReply(None, f"{exc.kind} (not retried)")
            except _Retryable as exc:
                kind = exc.kind
            except Exception as exc:  # anything else from the socket layer: keep the row, record it
                kind = f"unexpected {type(exc).__name__}"
            if attempt < self.max_attempts:
                time.sleep(self._backoff(req.rollout_id, attempt))
        return CriticReply(None, f"{kind} after {self.max_attempts} attempts")

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        if not requests:
            return
        key = os.environ.get(self.api_key_env) or None
        failures_in_a_row = 0
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="critic") as pool:
            futures = {pool.submit(self._ask, r, key): i for i, r in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    reply = fut.result()
                    if key and reply.error and key in reply.error:  # belt and braces
                        reply = CriticReply(None, reply.error.replace(key, "***"))
                    on_reply(futures[fut], reply)
                    failures_in_a_row = failures_in_a_row + 1 if reply.text is None else 0
                    if self.abort_after_failures and failures_in_a_row >= self.abort_after_failures:
                        raise CriticAborted(
                            f"critic at {self.url} failed {failures_in_a_row} rows in a row (last: {reply.error}); "
                            "stopping so the part can be resumed once the server is back"
                        )
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _make_openai(params: "CritiqueParams", model: str) -> Critic:
    if not model:
        raise ValueError("critic 'openai' needs critique.critic_model: the model name the server serves")
    return OpenAICritic(params.base_url, model, params.api_key_env, params.sampling(), params.max_feedback_chars,
                        params.max_concurrency, params.request_timeout_s, params.max_attempts,
                        params.backoff_initial_s, params.backoff_max_s, params.abort_after_failures,
                        params.chat_template_kwargs)


# --------------------------------------------------------------------------------------------------

CRITICS: dict[str, Callable[["CritiqueParams", str], Critic]] = {
    "reference": _make_reference,
    "transformers": _make_generation("transformers"),
    "vllm": _make_generation("vllm"),
    "openai": _make_openai,
}


def make_critic(name: str, params: "CritiqueParams", model: str) -> Critic:
    try:
        factory = CRITICS[name]
    except KeyError:
        raise ValueError(f"unknown critic backend {name!r}; choose one of {', '.join(CRITICS)}") from None
    return factory(params, model)
