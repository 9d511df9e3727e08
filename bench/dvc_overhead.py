"""What DVC itself costs per `dvc repro` and per stage it runs, and what the project cuts (issue 23, item 2).

    python bench/dvc_overhead.py [--workspace DIR] [--iterations 1,10] [--repeats 3]

Builds the pipeline test's small run in a fresh workspace (as bench/artifact_digests.py: the project
copied, tests/data/small-pipeline.yaml merged over params.yaml, the project's .dvc/config, one
``dvc repro``; a couple of minutes), or reuses ``--workspace`` when it already holds a finished run.
Then, back to back and interleaved, for each arm and each lock size:

- ``no-op``: ``dvc repro`` with nothing changed (DVC loads dvc.yaml, dvc.lock and params.yaml,
  checks every stage's deps through its state database, runs nothing);
- ``one stage``: ``dvc repro -f -s verify@0000`` (DVC runs one stage: hashes its outputs, links them
  into the cache, rewrites dvc.lock, saves the run-cache entry), less ``cmd``, the same stage
  command run by hand: DVC's share of running one stage.

Lock sizes: the real dvc.lock (one iteration), and padded with copies of iteration 0000's entries
under other keys to stand for a run of N iterations (DVC keeps lock entries of stages it does not
know and rewrites them with the rest). The arms:

- ``baseline``: ruamel.yaml's pure-Python parser (what DVC used before this project depended on
  ruamel.yaml.clib: ruamel.yaml 0.19 no longer installs it);
- ``candidate``: its C parser (``ruamel.yaml.clib``), which DVC's safe loads of dvc.yaml, dvc.lock
  and params.yaml use when it is importable. The round-trip load + dump with which DVC rewrites
  dvc.lock after every stage has no C path in either arm: the last table measures how that cost
  grows with the lock (it is paid once per stage run).

The profile behind these choices (``python -m cProfile $(which dvc) repro`` in the workspace) is in
docs/ARCHITECTURE.md, "Start-up and DVC overhead". The printed table carries the load average.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from artifact_digests import make_workspace  # noqa: E402 -- the same workspace recipe

STAGE = "verify@0000"  # cheap, deterministic, leaves identical bytes (nothing downstream reruns)
# DVC's own entry point, run by the interpreter of this venv; "pure" hides ruamel's C parser
WRAPPER = ("import sys\n"
           "if sys.argv[1] == 'pure':\n"
           "    import ruamel.yaml.main as m\n"
           "    m.CParser = None\n"
           "from dvc.cli import main\n"
           "sys.exit(main(sys.argv[2:]))\n")
ARMS = {"baseline": "pure", "candidate": "c"}


def _env(work: Path) -> dict:
    bindir = Path(sys.executable).parent
    return dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(work), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))


def _run(cmd: list[str], work: Path, shell: bool = False) -> float:
    t = time.perf_counter()
    proc = subprocess.run(" ".join(cmd) if shell else cmd, cwd=work, env=_env(work), capture_output=True, text=True,
                          shell=shell)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return took


def _dvc(arm: str, *args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, ARMS[arm], *args]


def build(work: Path) -> None:
    import configparser

    import yaml

    make_workspace(work, yaml.safe_load((ROOT / "tests" / "data" / "small-pipeline.yaml").read_text()),
                   extra=(".dvcignore",))
    project = configparser.ConfigParser()
    project.read(ROOT / ".dvc" / "config")
    if project.has_option("cache", "type"):  # the project's cache links (hardlink,copy)
        _run(["dvc", "config", "cache.type", project.get("cache", "type")], work)
    _run(["dvc", "repro"], work)


def padded_lock(text: str, iterations: int) -> str:
    """dvc.lock ``text`` with iteration 0000's entries copied under keys 9001.. (iterations - 1 times)."""
    from dvc.utils.serialize._yaml import _dump, parse_yaml

    data = parse_yaml(text, "dvc.lock")
    stages = data["stages"]
    extra = {}
    for i in range(1, iterations):
        for key, entry in stages.items():
            if key.endswith("@0000"):
                extra[key.replace("@0000", f"@{9000 + i:04d}")] = copy.deepcopy(entry)
    data["stages"] = {**stages, **extra}
    buf = io.StringIO()
    _dump(data, buf)
    return buf.getvalue()


def stage_cmd(work: Path) -> str:
    import yaml

    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return lock["stages"][STAGE]["cmd"]


def lock_update_seconds(text: str) -> float:
    """One dvc.lock rewrite as DVC does it after a stage (round-trip load, dump)."""
    from dvc.utils.serialize._yaml import _dump, parse_yaml_for_update

    t = time.perf_counter()
    data = parse_yaml_for_update(text, "dvc.lock")
    _dump(data, io.StringIO())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a finished small run to reuse (built there when empty)")
    ap.add_argument("--iterations", default="1,10", help="lock sizes, in iterations (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ruamel.yaml.main

    if ruamel.yaml.main.CParser is None:
        print("note: ruamel.yaml.clib is not installed: the candidate arm is the baseline")
    tmp = None
    work = args.workspace
    if work is None:
        tmp = tempfile.mkdtemp(prefix="tcrlsd-dvc-overhead-")
        work = Path(tmp)
    try:
        if not (work / "dvc.lock").exists():
            print(f"building the small run in {work} (dvc repro) ...", flush=True)
            build(work)
        original = (work / "dvc.lock").read_text()
        cmd = stage_cmd(work)
        sizes = [int(n) for n in args.iterations.split(",")]
        rows = {}
        load0 = os.getloadavg()[0]
        try:
            for n in sizes:
                (work / "dvc.lock").write_text(padded_lock(original, n) if n > 1 else original)
                for _ in range(args.repeats):
                    for arm in ARMS:
                        r = rows.setdefault((n, arm), {"noop": [], "one": [], "cmd": []})
                        r["noop"].append(_run(_dvc(arm, "repro", "-q"), work))
                        r["one"].append(_run(_dvc(arm, "repro", "-q", "-f", "-s", STAGE), work))
                        r["cmd"].append(_run(shlex.split(cmd), work))
        finally:
            (work / "dvc.lock").write_text(original)
        load1 = os.getloadavg()[0]
        growth = {n: statistics.median(lock_update_seconds(padded_lock(original, n)) for _ in range(3))
                  for n in sorted(set(sizes) | {1, 5, 10, 20})}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}
    print(f"\nDVC overhead, small pipeline run (seconds, median of {args.repeats}); one stage = "
          f"`dvc repro -f -s {STAGE}`, DVC's share = one stage - cmd")
    print(f"{'lock':>14} | {'arm':<9} | {'no-op':>6} | {'one stage':>9} | {'cmd':>5} | {'DVC share':>9}")
    for n in sizes:
        for arm in ARMS:
            m = med[(n, arm)]
            print(f"{n:>3} iteration{'s' if n > 1 else ' '} | {arm:<9} | {m['noop']:6.2f} | {m['one']:9.2f} | "
                  f"{m['cmd']:5.2f} | {m['one'] - m['cmd']:9.2f}")
        b, c = med[(n, "baseline")], med[(n, "candidate")]
        print(f"{'':>14} | {'ratio':<9} | {b['noop'] / c['noop']:5.2f}x | {b['one'] / c['one']:8.2f}x | {'':>5} | "
              f"{(b['one'] - b['cmd']) / (c['one'] - c['cmd']):8.2f}x")
    print("\ndvc.lock rewrite after each stage DVC runs (round-trip YAML, no C path; in-process):")
    for n, s in growth.items():
        print(f"  {n:3d} iterations in the lock: {len(padded_lock(original, n)) / 1024:6.0f} KB, {s:5.2f} s per stage run")
    print(f"\nload average {load0:.2f} before / {load1:.2f} after (1 min), {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
