"""A warm stage host: stage processes that skip Python's start-up and the torch/transformers imports.

DVC starts every stage as a new interpreter, and a model stage (generate, score, update, evaluate)
spends ~5 s of its process importing torch, transformers and DeepSpeed before it does ~1 s of work
on the embedded default (issue 23). The host is one process that imports them once and then forks a
fresh child for each stage command; the child has a new process's state (its own pid, environment,
working directory, argv, stdin/stdout/stderr, signal handlers) with the imports already done, and
runs the stage script exactly as ``python stages/<name>.py ...`` would.

How it is used: ``tcrlsd iterate`` and ``tcrlsd experiment`` start a host (:func:`stage_host`) and
put its socket in the environment of ``dvc repro`` (``TCRLSD_STAGE_HOST``). Each per-iteration stage
script calls :func:`hand_off` before its first heavy import: with a host in the environment it sends
its argv, working directory, environment and file descriptors 0-2 to the host, waits, and exits with
the child's status (a signal it receives, Ctrl-C included, goes to the child). DVC sees an ordinary
command: same command line, same outputs, same exit status. Plain ``dvc repro`` (no host in the
environment) runs every stage as before.

The host's side is :mod:`tcrlsd.hostserver`. The host refuses a request -- the script then runs in its own process, as without a host -- when it
cannot give the child what a new process would have: another interpreter, another ``tcrlsd`` package,
an environment variable read at import time that differs (thread counts, ``PYTHONPATH``, CUDA and
Hugging Face settings: :data:`IMPORT_TIME_ENV`), a tcrlsd module changed on disk since the host
imported it, or a thread running in the host (forking a threaded process is unsafe). A script run by
a launcher (torchrun sets ``RANK``) or as a multiprocessing child always runs in its own process, and
``tcrlsd iterate`` / ``experiment`` start no host for a run whose params put vLLM in a stage
(:func:`host_blockers`).

Outputs are byte-identical with and without the host (``tests/test_stagehost.py`` compares every
artifact of a pipeline iteration); ``bench/iteration.py`` measures the time it saves.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

__all__ = ["ENV", "IMPORT_TIME_ENV", "PRELOAD", "ENGINE_KEYS", "hand_off", "host_blockers", "stage_host",
           "mark_served", "send_message", "recv_message", "interpreter_identity"]

ENV = "TCRLSD_STAGE_HOST"
# Environment variables (exact names, or prefixes ending in "_") whose value a process reads at start-up
# or import: a request whose values differ from the host's runs in its own process.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "CUDA_", "NCCL_", "PYTORCH_", "TORCH_",
                   "TORCHINDUCTOR_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "PYTHON", "LD_",
                   "TCRLSD_STAGE_PANDAS", "VLLM_", "ACCELERATE_")
# What the host imports before it serves: the frameworks every model stage imports (torch, the
# transformers pieces a causal LM and its fast tokenizer load, safetensors, DeepSpeed for the update)
# and the stages' own packages. A module a stage imports beyond these is imported in its child.
PRELOAD = ("pyarrow", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.compute", "numpy",
           "torch", "safetensors.torch", "transformers", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "transformers.tokenization_utils_fast", "transformers.generation.utils",
           "transformers.models.llama.modeling_llama", "deepspeed", "math_verify",
           "tcrlsd.artifacts", "tcrlsd.params", "tcrlsd.policy", "tcrlsd.lm_head", "tcrlsd.stagecli",
           "tcrlsd.generate", "tcrlsd.verify", "tcrlsd.critique", "tcrlsd.score", "tcrlsd.advantages",
           "tcrlsd.update", "tcrlsd.evaluate", "tcrlsd.summarize")
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# params that start vLLM inside a stage (its engine processes, its own CUDA and fork handling): the host is
# not used for such a run -- not verified through a forked child (CI's vLLM tests run without it)
ENGINE_KEYS = (("generate", "backend"), ("evaluate", "backend"), ("critique", "critic"), ("critique", "self_backend"))
_HEADER = struct.Struct("!I")
_served = False  # True in a child the host forked: hand_off() is then a no-op (mark_served)


def mark_served() -> None:
    """This process is a stage the host forked: :func:`hand_off` does nothing here."""
    global _served
    _served = True


# --- the stage side -------------------------------------------------------------------------------------


def hand_off() -> None:
    """Run this stage script in the host named by ``TCRLSD_STAGE_HOST`` and exit with its status.

    Returns (and the script goes on in this process) when there is no host, it cannot be reached, it
    refuses the request (said in one line on stderr), or this process is not a script's own main
    process (a launcher's worker, a multiprocessing child, a host's child).
    """
    path = os.environ.get(ENV)
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if (_served or not path or script is None or not sys.argv or any(k in os.environ for k in LAUNCHER_ENV)
            or os.path.abspath(sys.argv[0]) != os.path.abspath(script)):
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        send_message(sock, _request(), fds=[0, 1, 2])
        reply = recv_message(sock)
    except OSError:
        sock.close()
        return  # no host (it ended, or never started): this process runs the stage
    if reply is None or "pid" not in reply:
        sock.close()
        if reply and reply.get("refused"):
            print(f"stage host: running in a process of its own: {reply['refused']}", file=sys.stderr)
        return
    status = _wait_forwarding_signals(sock, int(reply["pid"]))
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:  # the child died of a signal: so does this process, as its own process would have
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    os._exit(status)  # nothing of this process's own to finalise: it only relayed


def _request() -> dict:
    import tcrlsd

    return {"argv": list(sys.argv), "cwd": os.getcwd(), "env": dict(os.environ), "python": interpreter_identity(),
            "tcrlsd": os.path.abspath(tcrlsd.__file__)}


def interpreter_identity() -> list[str]:
    """The interpreter's identity: its binary (links resolved: a venv's python and python3.11 are one)
    and its environment (sys.prefix)."""
    return [os.path.realpath(sys.executable), sys.prefix, sys.version]


def _wait_forwarding_signals(sock: socket.socket, pid: int) -> int:
    """The child's exit status (negative: killed by that signal) once the host reports it; the signals
    this process gets meanwhile are sent to the child."""
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    try:
        reply = recv_message(sock)
    except OSError:
        reply = None
    if reply is None or "status" not in reply:
        print("stage host: the host ended before the stage did (see its log); the stage failed", file=sys.stderr)
        return 1
    return int(reply["status"])


def send_message(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    """One length-prefixed JSON message, with ``fds`` passed alongside (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    head = _HEADER.pack(len(data))
    if fds:
        socket.send_fds(sock, [head], fds)
        sock.sendall(data)
    else:
        sock.sendall(head + data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes | None:
    buf = b""
    while len(buf) < n:
        if fds is not None and not buf:
            chunk, got, _flags, _addr = socket.recv_fds(sock, n, 8)
            fds.extend(got)
        else:
            chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_message(sock: socket.socket, fds: list[int] | None = None) -> dict | None:
    """One length-prefixed JSON message (and, when ``fds`` is a list, the file descriptors that came with it)."""
    head = _recv_exact(sock, _HEADER.size, fds)
    if head is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(head)[0])
    return None if data is None else json.loads(data)




def host_blockers(params: str | os.PathLike) -> list[str]:
    """The params (``section.key=vllm``) of the file ``params`` that keep a run off the host (:data:`ENGINE_KEYS`)."""
    import yaml

    try:
        data = yaml.safe_load(Path(params).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []  # the stages report a missing or broken params file themselves
    return [f"{sec}.{key}=vllm" for sec, key in ENGINE_KEYS
            if isinstance(data.get(sec), dict) and data[sec].get(key) == "vllm"]


@contextlib.contextmanager
def stage_host(env: dict | None = None, log_path: Path | None = None, enabled: bool = True,
               cwd: Path | None = None, preload: tuple[str, ...] = PRELOAD) -> Iterator[dict]:
    """A host for the stage commands of the environment this yields (``env`` plus ``TCRLSD_STAGE_HOST``).

    The host starts with ``env`` (so its thread counts are the stages'), in a session of its own
    (a Ctrl-C in the terminal reaches the stages through their clients, once); it is stopped on exit.
    ``enabled`` False: ``env`` as it is (every stage in its own process). Its log: ``log_path``.
    ``preload``: the modules it imports before serving.
    """
    env = dict(os.environ if env is None else env)
    env.pop(ENV, None)
    if not enabled:
        yield env
        return
    folder = tempfile.mkdtemp(prefix="tcrlsd-host-")
    path = os.path.join(folder, "socket")
    log = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115 -- closed below
    # sys.path as a stage script's, less its own folder: tcrlsd from the environment, never from cwd
    code = ("import sys; del sys.path[0]; import tcrlsd.hostserver as h; "
            "sys.exit(h.serve(sys.argv[1], [m for m in sys.argv[2].split(',') if m]))")
    proc = subprocess.Popen([sys.executable, "-c", code, path, ",".join(preload)], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield dict(env, **{ENV: path}) if os.path.exists(path) else env
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


