"""Which heavy libraries a stage process imports: a ``sitecustomize`` for stage subprocesses.

Copied as ``sitecustomize.py`` into a folder put first on a child's ``PYTHONPATH`` (:func:`watch_env`),
it makes every Python process started with that environment -- the stage and its worker processes
(verify's forkserver/spawn pool inherits the environment) -- append one line ``<pid> <module>`` to
the file named by ``TCRLSD_IMPORT_LOG`` when it imports a watched top-level module. Only a real
import counts: the module's code is about to run (the loader is wrapped), not a mere
``importlib.util.find_spec`` availability probe such as transformers makes for deepspeed. A process
that exits by ``os._exit`` (a pool worker) has already written its lines: they are written at
import time, not at exit.

Used by tests/test_stage_imports.py (the model-free stages import neither torch nor transformers)
and bench/stage_timer.py (the heavy-module column).
"""

from __future__ import annotations

import importlib.abc
import os
import shutil
import sys
from pathlib import Path

WATCHED = ("torch", "transformers", "deepspeed", "pandas", "polars", "dvclive", "math_verify", "tokenizers")


class _Recorder:
    """A meta-path finder that asks the finders after it and wraps the loader of a watched module."""

    def __init__(self, log: str):
        self.log = log
        self.asking = False  # re-entered through a wrapper of this finder (tcrlsd.startup): not again

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED or self.asking:
            return None
        self.asking = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _LoggingLoader(spec.loader, self.log, name)
                    return spec
            return None
        finally:
            self.asking = False


class _LoggingLoader(importlib.abc.Loader):
    def __init__(self, loader, log: str, name: str):
        self.loader, self.log, self.name = loader, log, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {self.name}\n")
        module.__loader__ = self.loader
        self.loader.exec_module(module)

    def __getattr__(self, attr):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, attr)


def watch_env(folder: Path, log: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes record watched imports into ``log``; ``folder`` receives
    the ``sitecustomize.py`` (this file) and goes first on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, folder / "sitecustomize.py")
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    env["TCRLSD_IMPORT_LOG"] = str(log)
    return env


def imported(log: Path) -> set[str]:
    """The watched modules any process recorded in ``log``."""
    if not log.exists():
        return set()
    return {line.split()[1] for line in log.read_text().splitlines() if line.strip()}


if os.environ.get("TCRLSD_IMPORT_LOG") and __name__ == "sitecustomize":
    sys.meta_path.insert(0, _Recorder(os.environ["TCRLSD_IMPORT_LOG"]))
