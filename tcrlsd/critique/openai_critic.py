"""The ``openai`` critic: any OpenAI-compatible server, through ``/chat/completions`` or ``/completions``.

``endpoint`` chooses: ``chat`` (the server applies the model's chat template), ``completions`` (the
rendered critic prompt is sent as plain text: models without a chat template), or ``auto``: chat
until the server answers 400 because the model has no chat template (vLLM: "...you must provide a
chat template..."), then completions for the rest of the run, the refused request resent at once.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Sequence

from tcrlsd.critique.protocol import Critic, CriticAborted, CritiqueRequest, OnReply, clean_feedback
from tcrlsd.errors import InputError
from tcrlsd.generation import SamplingConfig
from tcrlsd.reference_critic import CriticReply

if TYPE_CHECKING:  # the params module imports the critic registry, which imports this: annotation only
    from tcrlsd.critique.params import CritiqueParams

# --------------------------------------------------------------------------------------------------
# openai-compatible HTTP


class _Retryable(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class _NoChatTemplate(Exception):
    """The server refused a chat request because the model has no chat template."""


class _Fatal(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


_RETRY_STATUS = {408, 409, 425, 429}
ENDPOINTS = ("chat", "completions", "auto")


class OpenAICritic:
    """``POST {base_url}/chat/completions`` or ``/completions``, ``max_concurrency`` requests at a time.

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
                 abort_after_failures: int = 32, chat_template_kwargs: dict | None = None, endpoint: str = "auto"):
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self.using = "completions" if endpoint == "completions" else "chat"  # auto may switch it once
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

    @property
    def url(self) -> str:
        return self.base_url + ("/chat/completions" if self.using == "chat" else "/completions")

    def _body(self, req: CritiqueRequest, using: str) -> bytes:
        from tcrlsd.generate.backend_base import derive_seed

        body = {
            "model": self.model,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_new_tokens,
            "seed": derive_seed(self.sampling.seed, req.rollout_id) & 0x7FFFFFFF,
        }
        if using == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
            if self.chat_template_kwargs:
                body["chat_template_kwargs"] = self.chat_template_kwargs
        else:
            body["prompt"] = req.prompt
        return json.dumps(body).encode()

    def _post(self, req: CritiqueRequest, key: str | None) -> str:
        using = self.using
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url + ("/chat/completions" if using == "chat" else "/completions")
        request = urllib.request.Request(url, data=self._body(req, using), headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = b""
            if exc.code == 400 and using == "chat" and self.endpoint == "auto":
                try:
                    detail = exc.read(65536)
                except (OSError, http.client.HTTPException):
                    pass
            exc.close()
            if b"chat template" in detail.lower():
                raise _NoChatTemplate() from None
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
            choice = data["choices"][0]
            content = choice["message"]["content"] if using == "chat" else choice["text"]
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
        kind = "no attempt"
        for attempt in range(1, self.max_attempts + 1):
            try:
                try:
                    return clean_feedback(self._post(req, key), self.max_feedback_chars)
                except _NoChatTemplate:
                    self.using = "completions"  # for every later request too; this one is resent now
                    return clean_feedback(self._post(req, key), self.max_feedback_chars)
            except _Fatal as exc:
                return CriticReply(None, f"{exc.kind} (not retried)")
            except _Retryable as exc:
                kind = exc.kind
            except Exception as exc:  # anything else from the socket layer: keep the row, record it
                kind = f"unexpected {type(exc).__name__}"
            if attempt < self.max_attempts:
                time.sleep(self._backoff(req.rollout_id, attempt))
        return CriticReply(None, f"{kind} after {self.max_attempts} attempts", retryable=True)

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
                        reply = CriticReply(None, reply.error.replace(key, "***"), reply.retryable)
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


def make_openai(params: "CritiqueParams", model: str) -> Critic:
    if not model:
        raise InputError("critic 'openai' needs critique.critic_model: the model name the server serves")
    return OpenAICritic(params.base_url, model, params.api_key_env, params.sampling_config(),
                        params.max_feedback_chars, params.max_concurrency, params.request_timeout_s,
                        params.max_attempts, params.backoff_initial_s, params.backoff_max_s, params.abort_after_failures,
                        params.chat_template_kwargs, params.endpoint)
