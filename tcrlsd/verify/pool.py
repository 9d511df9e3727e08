"""Grading in worker processes with a wall-clock deadline per row (:class:`GradingPool`)."""

from __future__ import annotations

import os
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence

from tcrlsd.answers import last_boxed
from tcrlsd.errors import TcrlsdError
from tcrlsd.verify.graders import GRADERS, Grade, GradeLimits, GradeRequest, clip_extracted
from tcrlsd.verify.params import VerifyError, VerifyParams

# ---------------------------------------------------------------------------------------------
# The process pool


def _die_with_parent() -> None:
    """Linux: make sure a worker stuck in a huge computation never outlives a killed stage.

    The worker asks for SIGKILL when its parent exits (prctl PR_SET_PDEATHSIG). Under fork the
    parent is the stage. Under forkserver it is the fork server, which exits once no process
    holds its "alive" pipe: the stage holds one end and every forked child inherits a copy, so the
    worker closes its copy (the worker never forks). Elsewhere: a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    try:
        from multiprocessing import forkserver

        fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
        if fd is not None and fd >= 0:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None
    except OSError:
        pass


def _mapped_bytes() -> int:
    """This process's virtual address space in bytes (Linux: VmSize; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _worker_main(conn, limits: GradeLimits, memory_mb: int) -> None:
    """Worker loop: receive (key, grader, response, gold), send back (key, Grade)."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _die_with_parent()
    if memory_mb:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        # on top of what the worker already maps: a worker forked from a process that mapped
        # gigabytes (torch, DeepSpeed) would otherwise start over its limit and fail every allocation
        soft = _mapped_bytes() + memory_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # math-verify logs every timeout with the whole input (up to 1 MB) at WARNING.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import tcrlsd.verify.mathverify_compat  # noqa: F401 -- warm import (a no-op when preloaded)

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, grader, response, gold = msg
        try:
            grade = GRADERS[grader](response, gold, limits)
        except MemoryError:
            grade = Grade(0.0, None, "unparsable")
        except Exception:  # noqa: BLE001 -- never let one row kill the worker
            grade = Grade(0.0, None, "unparsable")
        conn.send((key, tuple(grade)))


class WorkerStartError(TcrlsdError, RuntimeError):
    """A grading worker could not start (an environment problem, not a problem of any row)."""


_STARTUP_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self, ctx, limits: GradeLimits, memory_mb: int):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, limits, memory_mb), daemon=True,
                                name="tcrlsd-grader")
        # forkserver/spawn children re-run the parent's main script (as __mp_main__) before the
        # target unless __main__ has no path: that would re-import pytest, a stage's pyarrow, or
        # fail outright for `python -` (no file). The target lives in this module and needs nothing
        # from __main__, so the child is started with a path-less stand-in, swapped back at once.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.proc.start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        child_conn.close()
        self.conn = parent_conn
        self.key: int | None = None  # the request it is grading
        self.deadline = 0.0
        # Handshake: a worker that dies while importing is an environment error, raised here with
        # its exit code, instead of every row being graded as a crash.
        ok = False
        try:
            ok = self.conn.poll(_STARTUP_TIMEOUT_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            self.kill()
            raise WorkerStartError(
                f"grading worker (start method {ctx.get_start_method()!r}) did not start: exit code "
                f"{self.proc.exitcode}; see its traceback above on stderr"
            )

    def kill(self) -> None:
        try:
            self.proc.kill()
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class GradingPool:
    """Grade many requests in worker processes with a wall-clock deadline per row.

    Use as a context manager. ``grade(requests)`` returns one :class:`Grade` per request, in order.
    Identical requests are graded once. A worker still busy ``row_deadline_s`` after it got a row
    is killed (SIGKILL) and replaced; that row is ``timeout``. A worker that dies on a row (out of
    memory, segfault, killed from outside) is replaced and the row is graded once more on the new
    worker; a row that kills two workers is ``unparsable``. ``stats`` counts kills and crashes.
    """

    def __init__(self, workers: int = 2, limits: GradeLimits | None = None, row_deadline_s: float = 10.0,
                 start_method: str = "forkserver", worker_memory_mb: int = 4096):
        import multiprocessing as mp

        limits = limits or GradeLimits()
        self.num_workers = max(1, int(workers))
        self.limits = GradeLimits(int(limits.parse_timeout_s), int(limits.verify_timeout_s))
        self.row_deadline_s = float(row_deadline_s)
        self.memory_mb = int(worker_memory_mb)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Affects only a fork server not yet started; modules every worker needs, imported once.
            self._ctx.set_forkserver_preload(["tcrlsd.verify.pool", "tcrlsd.verify.mathverify_compat"])
        self._workers: list[_Worker | None] = []
        self.stats: Counter = Counter()

    @classmethod
    def from_params(cls, params: VerifyParams, max_workers: int | None = None) -> GradingPool:
        n = params.workers if max_workers is None else max(1, min(params.workers, max_workers))
        return cls(n, params.limits, params.row_deadline_s, params.start_method, params.worker_memory_mb)

    def __enter__(self) -> GradingPool:  # noqa: PYI034 -- py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely, or at once with ``kill``: they may be mid-row)."""
        for w in self._workers:
            if w is not None:
                w.kill() if kill else w.stop()
        self._workers = []

    def _spawn(self) -> _Worker:
        self.stats["workers_started"] += 1
        return _Worker(self._ctx, self.limits, self.memory_mb)

    def grade(self, requests: Sequence[GradeRequest], on_result: Callable[[int], None] | None = None) -> list[Grade]:
        """Grade ``requests`` (in order). ``on_result(n)`` is called as rows finish (progress bars)."""
        from multiprocessing.connection import wait

        for r in requests:
            if r.grader not in GRADERS:
                raise VerifyError(f"unknown grader {r.grader!r}; known: {', '.join(GRADERS)}")
        unique: dict[GradeRequest, int] = {}
        slot = [unique.setdefault(GradeRequest(*r), len(unique)) for r in requests]
        todo = list(unique)  # index = key
        counts = Counter(slot)
        results: list[Grade | None] = [None] * len(todo)
        n_workers = min(self.num_workers, len(todo))
        while len(self._workers) < n_workers:
            self._workers.append(None)
        next_key = 0
        retry: list[int] = []  # keys whose worker died on them: graded once more
        crashes: Counter = Counter()
        busy: dict[int, _Worker] = {}  # worker index -> worker

        def finish(key: int, grade: Grade) -> None:
            results[key] = grade
            if on_result is not None:
                on_result(counts[key])

        try:
            while next_key < len(todo) or busy or retry:
                # Dispatch one row to every idle worker.
                for i in range(n_workers):
                    if i in busy or (not retry and next_key >= len(todo)):
                        continue
                    w = self._workers[i]
                    if w is None or not w.proc.is_alive():
                        if w is not None:
                            w.kill()
                        w = self._workers[i] = self._spawn()
                    key = retry[0] if retry else next_key
                    req = todo[key]
                    try:
                        w.conn.send((key, req.grader, req.response, req.gold))
                    except (OSError, ValueError):  # died while idle: replace and retry the row
                        w.kill()
                        self._workers[i] = None
                        continue
                    w.key, w.deadline = key, time.monotonic() + self.row_deadline_s
                    busy[i] = w
                    if retry:
                        retry.pop(0)
                    else:
                        next_key += 1
                if not busy:
                    continue
                timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
                # Wait on the pipes and on the process sentinels: a worker that dies mid-row is seen
                # even if its pipe end lingers in another process.
                waitables = {}
                for i, w in busy.items():
                    waitables[w.conn] = i
                    waitables[w.proc.sentinel] = i
                ready = {waitables[x] for x in wait(list(waitables), timeout=timeout)}
                for i in sorted(ready):
                    w = busy.pop(i)
                    try:
                        if not w.conn.poll():
                            raise EOFError
                        key, grade = w.conn.recv()
                    except (EOFError, OSError):
                        # The worker died on this row: a new worker grades it once more (the death may
                        # have come from outside); a row that kills two workers is a verdict.
                        self.stats["worker_crashes"] += 1
                        w.kill()
                        self._workers[i] = None
                        crashes[w.key] += 1
                        if crashes[w.key] < 2:
                            retry.append(w.key)
                        else:
                            finish(w.key, Grade(0.0, None, "unparsable"))
                        continue
                    finish(key, Grade(*grade))
                now = time.monotonic()
                for i, w in list(busy.items()):
                    if now >= w.deadline:
                        self.stats["deadline_kills"] += 1
                        busy.pop(i)
                        w.kill()
                        self._workers[i] = None
                        req = todo[w.key]
                        box = last_boxed(req.response)
                        finish(w.key, Grade(0.0, clip_extracted(box) if box is not None else None, "timeout"))
        except BaseException:
            # Ctrl-C or a bug: never leave workers behind (busy ones would finish their row first).
            self.close(kill=True)
            raise
        return [results[k] for k in slot]  # type: ignore[misc]
