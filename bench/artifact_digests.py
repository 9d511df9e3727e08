"""sha256 of every artifact a small two-iteration run writes, to show that a refactor changed no output.

Copies the project (dvc.yaml, params.yaml, iterations.yaml, stages, configs, data/raw, tcrlsd) into a
fresh workspace, merges a params-shaped setting over params.yaml (default: the pipeline test's
``tests/data/small-pipeline.yaml``), runs ``dvc repro`` and ``tcrlsd iterate 1`` (two iterations),
and prints one line per file under ``data/`` and ``models/``: its sha256 and path. Metrics JSON files
hold wall times and are listed with the keys that vary removed (``--keep-timings`` keeps them).

    python bench/artifact_digests.py --out /tmp/digests-before.json            # on the old tree
    python bench/artifact_digests.py --compare /tmp/digests-before.json        # on the new tree
    python bench/artifact_digests.py --stage-host --compare /tmp/digests-before.json  # through the stage host

``--compare`` prints the files whose digest differs (and those only one side has) and exits 1 if any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = [".dvcignore", "dvc.yaml", "params.yaml", "iterations.yaml", "stages", "configs", "data/raw", "tcrlsd"]
# metrics keys that hold times, hosts or paths of the workspace: not outputs of the method
VOLATILE = ("seconds", "time", "wall", "elapsed", "per_s", "tokens_per_s", "rows_per_s", "host", "started",
            "finished", "throughput", "pid")


def merge_params(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, section by section, key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_params(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if not any(s in k.lower() for s in VOLATILE)}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _digest(path: Path, keep_timings: bool) -> str:
    data = path.read_bytes()
    if path.suffix == ".json" and not keep_timings:
        try:
            data = json.dumps(_scrub(json.loads(data)), sort_keys=True).encode()
        except ValueError:
            pass
    return hashlib.sha256(data).hexdigest()


def _env(cwd: Path) -> dict:
    bindir = Path(sys.executable).parent
    return dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(cwd),
                PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(cwd), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def make_workspace(work: Path, setting: dict, extra: tuple[str, ...] = ()) -> None:
    """A DVC project in ``work``: the repository's pipeline files (COPY + ``extra``), params.yaml with
    ``setting`` merged over it, `dvc init`; nothing run yet (bench/dvc_overhead.py uses it too)."""
    for rel in COPY + list(extra):
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, work / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    from tcrlsd.loop.iterations import truncate_iterations

    truncate_iterations(work / "iterations.yaml", 1)  # this checkout's own `tcrlsd iterate` may have appended more
    params = merge_params(yaml.safe_load((work / "params.yaml").read_text()), setting)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "init", "--no-scm", "-q"], work)
    _run(["dvc", "config", "core.analytics", "false"], work)


def build(work: Path, setting: Path, host: bool = False) -> None:
    """Both iterations; ``host``: the first `dvc repro` through a warm stage host too (tcrlsd/stagehost.py),
    and `tcrlsd iterate` with its default host (else --no-stage-host: every stage its own process)."""
    from tcrlsd.stagehost import stage_host

    make_workspace(work, yaml.safe_load(setting.read_text()))
    with stage_host(_env(work), cwd=work, enabled=host) as env:
        _run(["dvc", "repro"], work, env)
    _run(["tcrlsd", "iterate", "1"] + ([] if host else ["--no-stage-host"]), work)


def digests(work: Path, keep_timings: bool) -> dict[str, str]:
    out = {}
    for top in ("data", "models"):
        for path in sorted((work / top).rglob("*")):
            rel = path.relative_to(work).as_posix()
            if path.is_file() and not rel.startswith("data/raw/") and "/." not in "/" + rel:
                out[rel] = _digest(path, keep_timings)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", type=Path, default=ROOT / "tests" / "data" / "small-pipeline.yaml",
                    help="params-shaped YAML merged over params.yaml (default: the pipeline test's)")
    ap.add_argument("--workspace", type=Path, help="where to run (default: a temporary folder, removed after)")
    ap.add_argument("--out", type=Path, help="write {path: sha256} as JSON here")
    ap.add_argument("--compare", type=Path, help="a JSON written by --out: list differences, exit 1 if any")
    ap.add_argument("--keep-timings", action="store_true", help="hash metrics JSON as written (times included)")
    ap.add_argument("--stage-host", action="store_true",
                    help="run the stages through a warm stage host (default: each stage its own process)")
    args = ap.parse_args()
    tmp = None
    work = args.workspace
    if work is None:
        tmp = tempfile.mkdtemp(prefix="tcrlsd-digests-")
        work = Path(tmp)
    try:
        build(work, args.setting, args.stage_host)
        found = digests(work, args.keep_timings)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    for rel, h in found.items():
        print(h, rel)
    if args.out:
        args.out.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = sorted(k for k in set(before) & set(found) if before[k] != found[k])
        only_before = sorted(set(before) - set(found))
        only_after = sorted(set(found) - set(before))
        print(f"\n{len(set(before) & set(found)) - len(changed)} identical, {len(changed)} differ, "
              f"{len(only_before)} only before, {len(only_after)} only after")
        for label, rows in (("differs", changed), ("only before", only_before), ("only after", only_after)):
            for rel in rows:
                print(f"  {label}: {rel}")
        sys.exit(1 if changed or only_before or only_after else 0)


if __name__ == "__main__":
    main()
