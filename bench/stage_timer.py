"""Run a stage script in-process and record where its time goes (used by bench/iteration.py).

    python bench/stage_timer.py LOG.jsonl stages/generate.py --params ... (the stage's own arguments)

Appends one JSON line to LOG: seconds spent importing the heavy libraries the stages use (torch,
transformers, pyarrow, deepspeed when the stage is update), seconds in the stage's ``main()``, and
this process's total wall time from interpreter start. Imports done first are then free for the
stage, so ``main`` is the stage's own work plus its Parquet I/O.
"""

from __future__ import annotations

import importlib
import json
import runpy
import sys
import time

HEAVY = ("pyarrow.parquet", "numpy", "torch", "transformers")


def main() -> int:
    log, script, *args = sys.argv[1:]
    t0 = time.perf_counter()
    heavy = list(HEAVY) + (["deepspeed"] if script.endswith("update.py") else [])
    for name in heavy:
        importlib.import_module(name)
    t_import = time.perf_counter() - t0
    namespace = runpy.run_path(script, run_name="bench_stage")  # defines main() without running it
    t_module = time.perf_counter() - t0 - t_import
    t1 = time.perf_counter()
    code = namespace["main"](args)
    t_main = time.perf_counter() - t1
    try:
        import psutil  # noqa: F401 -- optional: process age = interpreter start-up included
        import os

        started = psutil.Process(os.getpid()).create_time()
        total = time.time() - started
    except ImportError:
        total = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(json.dumps({"script": script, "imports_s": t_import, "module_s": t_module, "main_s": t_main,
                             "process_s": total, "code": code}) + "\n")
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
