"""The warm start's starting accuracy over seeds: is it a plateau set by the task, or a slope?

    python bench/warmstart_spread.py [--seeds 3] [--jobs 1] [--workdir DIR] [--set warmstart.KEY=VALUE ...]

Runs the prepare stage once (the repository's params.yaml), then the warmstart stage once per seed
(warmstart.seed = the params' seed + i; the SFT corpus, tokenizer, weight init and batch order all
change with it) and prints, per seed, the greedy val accuracy overall, per level, and split by
whether the problem's gold solution has a step with a carry or borrow -- the steps the default
demonstrator slips on -- with the mean and standard deviation over seeds. A plateau shows as a
small spread and as a no-carry accuracy near 100% with a carry accuracy near 0%.
Resumable: a seed whose metrics JSON exists is not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _set(params: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    section, _, name = key.partition(".")
    params[section][name] = yaml.safe_load(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated seed indices to run (default: all of 0..S-1)")
    ap.add_argument("--jobs", type=int, default=1, help="warm starts at a time (each keeps its num_threads)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. warmstart.steps=3000")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ws-spread-"))
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for a in args.set:
        _set(params, a)
    prompts = work / "prompts.parquet"
    base_params = work / "params.yaml"
    base_params.write_text(yaml.safe_dump(params, sort_keys=False))
    if not prompts.exists():
        subprocess.run([sys.executable, str(ROOT / "stages/prepare.py"), "--params", str(base_params), "--out",
                        str(prompts), "--metrics", str(work / "prepare.json")], check=True, cwd=ROOT)
    seed0 = params["warmstart"]["seed"]

    def one(i: int) -> dict:
        metrics = work / f"seed-{i}.json"
        if not metrics.exists():
            p = yaml.safe_load(base_params.read_text())
            p["warmstart"]["seed"] = seed0 + i
            pf = work / f"params-{i}.yaml"
            pf.write_text(yaml.safe_dump(p, sort_keys=False))
            subprocess.run([sys.executable, str(ROOT / "stages/warmstart.py"), "--params", str(pf), "--prompts",
                            str(prompts), "--out", str(work / f"policy-{i}"), "--metrics", str(metrics),
                            "--no-progress"], check=True, cwd=ROOT)
        return json.loads(metrics.read_text())

    indices = [int(x) for x in args.only.split(",")] if args.only else list(range(args.seeds))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, indices))

    from tcrlsd.artifacts import read_artifact
    from tcrlsd.policy import load_policy
    from tcrlsd.reference_critic import parse_steps
    from tcrlsd.warmstart.accuracy import greedy_answers
    from tcrlsd.answers import last_boxed
    from tcrlsd.warmstart.data import needs_carry

    val = [r for r in read_artifact(prompts, "prompts").to_pylist() if r["split"] == "val"]
    carry = [any(needs_carry(s.left, s.op, s.right) for s in parse_steps(r["solution"])) for r in val]
    print(f"{len(val)} val problems, {carry.count(False)} without a carry or borrow "
          f"({carry.count(False) / len(val):.1%})")
    levels = sorted(results[0]["accuracy_by_level"])
    header = ["seed", "steps", "train s", "greedy"] + [f"L{k}" for k in levels] + ["no-carry", "carry"]
    print(" | ".join(header))
    cols: dict[str, list[float]] = {h: [] for h in header[3:]}
    for i, m in zip(indices, results):
        model, tok = load_policy(work / f"policy-{i}")
        texts = greedy_answers(model, tok, [r["prompt"] for r in val], 96, 100)
        ok = [last_boxed(t) == str(r["answer"]).strip() for t, r in zip(texts, val)]
        nc = sum(o for o, c in zip(ok, carry) if not c) / max(1, carry.count(False))
        wc = sum(o for o, c in zip(ok, carry) if c) / max(1, carry.count(True))
        vals = [m["accuracy"]] + [m["accuracy_by_level"][k] for k in levels] + [nc, wc]
        for h, v in zip(header[3:], vals):
            cols[h].append(v)
        print(" | ".join([str(seed0 + i), str(m["steps"]), f"{m['train_seconds']:.0f}"] + [f"{100 * v:.1f}" for v in vals]))
    if len(results) > 1:
        print(" | ".join(["mean ± std", "", ""] + [f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}"
                                                   for v in cols.values()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
