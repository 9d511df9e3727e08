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

The host refuses a request -- the script then runs in its own process, as without a host -- when it
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
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

__all__ = ["ENV", "IMPORT_TIME_ENV", "PRELOAD", "ENGINE_KEYS", "hand_off", "host_blockers", "stage_host", "serve"]

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
_served = False  # True in a child the host forked: hand_off() is then a no-op


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
        _send(sock, _request(), fds=[0, 1, 2])
        reply = _recv(sock)
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

    return {"argv": list(sys.argv), "cwd": os.getcwd(), "env": dict(os.environ), "python": _interpreter(),
            "tcrlsd": os.path.abspath(tcrlsd.__file__)}


def _interpreter() -> list[str]:
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
        reply = _recv(sock)
    except OSError:
        reply = None
    if reply is None or "status" not in reply:
        print("stage host: the host ended before the stage did (see its log); the stage failed", file=sys.stderr)
        return 1
    return int(reply["status"])


def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
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


def _recv(sock: socket.socket, fds: list[int] | None = None) -> dict | None:
    head = _recv_exact(sock, _HEADER.size, fds)
    if head is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(head)[0])
    return None if data is None else json.loads(data)


# --- the host -----------------------------------------------------------------------------------------


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k != ENV and any(k == p or (p.endswith("_") and k.startswith(p))
                                                              or (p == "PYTHON" and k.startswith(p))
                                                              for p in IMPORT_TIME_ENV)}


def _code_files() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every tcrlsd module file this process imported."""
    out = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and (name == "tcrlsd" or name.startswith("tcrlsd.")):
            with contextlib.suppress(OSError):
                st = os.stat(f)
                out[f] = (st.st_mtime_ns, st.st_size)
    return out


class _Host:
    def __init__(self, path: str, idle_s: float, log=None):
        import threading

        self._threading = threading
        self.path, self.idle_s = path, idle_s
        self.log = log or (lambda msg: print(f"stage host: {msg}", file=sys.stderr, flush=True))
        self.env = _import_env(dict(os.environ))
        self.parent = os.getppid()
        self.children: dict[int, socket.socket] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.code: dict[str, tuple[int, int]] = {}
        # a child's exit wakes the loop at once (SIGCHLD written to a pipe select() watches)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def preload(self, modules) -> None:
        import importlib

        from tcrlsd.startup import hide_pandas

        if os.environ.get("TCRLSD_STAGE_PANDAS", "") != "1":
            hide_pandas()  # as tcrlsd.stagecli.process_main does in a stage's own process
        start = time.perf_counter()
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 -- an optional framework: the stage imports it itself
                self.log(f"not preloaded: {name} ({type(exc).__name__}: {exc})")
        self.code = _code_files()
        import gc

        gc.freeze()  # the preloaded objects out of the collector's sight: a child's collections leave their pages shared
        self.log(f"imported {len(modules)} modules in {time.perf_counter() - start:.1f} s; serving on {self.path}")

    def refusal(self, req: dict) -> str | None:
        if req.get("python") != _interpreter():
            return f"another interpreter ({req.get('python')}, the host runs {_interpreter()})"
        import tcrlsd

        if req.get("tcrlsd") != os.path.abspath(tcrlsd.__file__):
            return f"another tcrlsd package ({req.get('tcrlsd')}, the host imported {tcrlsd.__file__})"
        env = _import_env(req.get("env", {}))
        diff = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
        if diff:
            return "environment differs from the host's in " + ", ".join(diff)
        if _code_files_changed(self.code):
            return "tcrlsd code changed on disk since the host imported it"
        if self._threading.active_count() > 1:
            return f"the host runs {self._threading.active_count()} threads (forking would be unsafe)"
        return None

    def serve(self) -> dict | None:
        """Serve until told to stop (None), or return a request in a freshly forked child."""
        last = time.monotonic()
        while True:
            if os.getppid() != self.parent:
                self.log("the process that started the host ended; stopping")
                return self._stop()
            if not self.children and time.monotonic() - last > self.idle_s:
                self.log(f"idle for {self.idle_s:.0f} s; stopping")
                return self._stop()
            ready, _, _ = select.select([self.listener, self.wake_r] + list(self.children.values()), [], [], 0.5)
            for sock in ready:
                if sock is self.wake_r:
                    os.read(self.wake_r, 512)
                elif sock is self.listener:
                    last = time.monotonic()
                    req = self._accept()
                    if req is not None:
                        return req  # in the child
                else:  # a client that goes away first (killed): its stage goes too
                    pid = next(p for p, s in self.children.items() if s is sock)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._reap()

    def _accept(self) -> dict | None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(30)  # a caller that connects and sends nothing does not hold the host up
            req = _recv(conn, fds)
            conn.settimeout(None)
            if req is None or len(fds) != 3:
                raise OSError("incomplete request")
            refused = self.refusal(req)
            if refused:
                self.log(f"refused {' '.join(req['argv'][:1])}: {refused}")
                _send(conn, {"refused": refused})
                raise OSError(refused)
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.listener.close()
            for s in self.children.values():
                s.close()
            conn.close()
            req["fds"] = fds
            return req
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        with contextlib.suppress(OSError):
            _send(conn, {"pid": pid})
        return None

    def _reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = self.children.pop(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with contextlib.suppress(OSError):
                    _send(conn, {"status": code})
                conn.close()

    def _stop(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return None


def _code_files_changed(code: dict[str, tuple[int, int]]) -> bool:
    for f, sig in code.items():
        try:
            st = os.stat(f)
        except OSError:
            return True
        if (st.st_mtime_ns, st.st_size) != sig:
            return True
    return False


def _become(req: dict) -> None:
    """In the forked child: take the request's process state, then run its script as ``__main__``."""
    global _served
    _served = True
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)  # a group of its own: a stage that signals its group reaches only itself and its children
    for target, fd in enumerate(req["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    _reopen_std_streams()
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    sys.path[0:0] = [os.path.dirname(os.path.abspath(script))]  # as `python script` sets sys.path[0]
    import types

    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    code = compile(Path(script).read_bytes(), script, "exec")
    try:
        exec(code, main.__dict__)
        status = 0
    except SystemExit as exc:  # as the interpreter maps sys.exit()'s argument to a status
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        _shutdown()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # dies of SIGINT, as Python does on an uncaught Ctrl-C
        status = 130
    except BaseException:  # noqa: BLE001 -- reported as the interpreter reports it: traceback, status 1
        sys.excepthook(*sys.exc_info())
        status = 1
    _shutdown()
    os._exit(status & 0xFF)


def _shutdown() -> None:
    """What the interpreter does at exit that a stage can observe -- wait for its non-daemon threads, run
    its atexit functions, flush stdout/stderr -- without tearing every module down: in a forked child
    that teardown writes to every page shared with the host (1-1.5 s of copy-on-write here)."""
    import atexit
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _reopen_std_streams() -> None:
    """New sys.stdin/stdout/stderr on fds 0-2, buffered as a new interpreter would buffer them."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        with contextlib.suppress(Exception):
            old.flush()
        raw = io.FileIO(fd, mode + "b", closefd=False)
        tty = os.isatty(fd)
        if mode == "w" and unbuffered:
            buffered = raw
        else:
            buffered = (io.BufferedWriter if mode == "w" else io.BufferedReader)(raw)
        stream = io.TextIOWrapper(buffered, encoding=old.encoding, errors=old.errors,
                                  line_buffering=mode == "w" and (tty or name == "stderr"),
                                  write_through=mode == "w" and unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the host ends (a killed host leaves no stage running)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve(path: str, preload=PRELOAD, idle_s: float = 3600.0) -> int:
    """The host's main loop (started by :func:`stage_host`); in a forked child, the stage's run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client forwards what is meant for a stage
    host = _Host(path, idle_s)
    host.preload(preload)
    req = host.serve()
    if req is None:
        return 0
    _become(req)  # never returns: the child exits with the script's status
    return 1


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
    code = ("import sys; del sys.path[0]; import tcrlsd.stagehost as h; "
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


