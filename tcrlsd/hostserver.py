"""The warm stage host's own process (:mod:`tcrlsd.stagehost` starts it and says what it is for).

:func:`serve` binds the Unix socket, imports :data:`tcrlsd.stagehost.PRELOAD`, then loops: a request
(argv, cwd, environment, interpreter, tcrlsd path, fds 0-2) is refused (one line back, the caller
runs the script itself) or served by a fork; the child takes the request's process state and runs
the script as ``__main__`` (:func:`become`), the host reports its exit status to the caller. The
loop is single-threaded (a forked child must not inherit another thread's locks): it waits in
``select`` on the socket, the callers' connections (a caller that goes away takes its stage with it)
and a pipe that SIGCHLD writes to.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from tcrlsd.stagehost import (ENV, IMPORT_TIME_ENV, PRELOAD, interpreter_identity, mark_served, recv_message,
                              send_message)

__all__ = ["serve", "become"]


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
        if req.get("python") != interpreter_identity():
            return f"another interpreter ({req.get('python')}, the host runs {interpreter_identity()})"
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
            req = recv_message(conn, fds)
            conn.settimeout(None)
            if req is None or len(fds) != 3:
                raise OSError("incomplete request")
            refused = self.refusal(req)
            if refused:
                self.log(f"refused {' '.join(req['argv'][:1])}: {refused}")
                send_message(conn, {"refused": refused})
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
            send_message(conn, {"pid": pid})
        return None

    def _reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = self.children.pop(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with contextlib.suppress(OSError):
                    send_message(conn, {"status": code})
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


def become(req: dict) -> None:
    """In the forked child: take the request's process state, then run its script as ``__main__``."""
    mark_served()
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
    become(req)  # never returns: the child exits with the script's status
    return 1
