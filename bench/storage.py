"""Disk bytes per iteration: main's storage (optimizer state a cached DVC output, cache by copy)
against this tree's (state out of DVC, hardlinked cache, checkpoint retention), measured in one run.

Each variant is a scratch DVC repository whose per-iteration update stage writes what the real update
writes on the embedded default: the real files of `tcrlsd.update.stage.save_outputs` (the embedded
tiny Llama's checkpoint, fp32, and its DeepSpeed ZeRO-2 state) with each iteration's bytes made
unique, plus `--data-mb` of Parquet-like data (rollouts .. evaluations). Variants:

  main         dvc.yaml of main: outs = checkpoint, state, data; DVC's default cache.type (reflink,copy)
  keep-all     this tree, checkpoints.keep_every 0 (the embedded default): state undeclared, hardlinks
  keep-every   this tree, checkpoints.keep_every N (--keep-every), keep_latest 2, `tcrlsd iterate`'s prune

After every iteration it counts, over workspace + cache, each inode once: `written` = bytes of
inodes that did not exist before (stage writes + DVC's copies; a hardlink writes nothing), `cached`
= growth of .dvc/cache, `disk` = total footprint. The same accounting, as arithmetic on file sizes
(`model`), reproduces the measured rows and projects the GPU preset (3B policy: bf16 weights 6.4 GB,
fp32 master + Adam moments 36 GB; data at 1024 prompts x 8 samples x <= 3072 tokens) over 70
iterations, the table of docs/GPU.md.

    PYTHONPATH=. python bench/storage.py [--iterations 6] [--keep-every 3] [--data-mb 1.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GB = 1e9


def embedded_payload(out: Path) -> tuple[Path, Path]:
    """(checkpoint, state) exactly as the update writes them for the embedded default policy."""
    import torch

    from tcrlsd.params import load_section
    from tcrlsd.policy import TinyLlamaConfig, build_tiny_llama, save_policy, train_tokenizer
    from tcrlsd.synthetic import make_problems
    from tcrlsd.update.params import UpdateParams
    from tcrlsd.update.stage import open_trainer, save_outputs

    texts = [p.problem + "\n" + p.solution for p in make_problems(500, seed=0)]
    tok = train_tokenizer(texts, vocab_size=TinyLlamaConfig().vocab_size)
    policy = save_policy(build_tiny_llama(tok, TinyLlamaConfig()), tok, out / "policy-0000")
    params = load_section(ROOT / "params.yaml", "update", UpdateParams)
    trainer, tokenizer, _ = open_trainer(policy, params, iteration=0)
    # one optimizer step, so that the state holds AdamW's moments (created at the first step)
    engine = trainer.engine
    loss = engine.module.model(input_ids=torch.randint(0, len(tok), (1, 16))).logits.float().mean()
    engine.backward(loss)
    engine.step()
    save_outputs(trainer, tokenizer, out / "ckpt", out / "state", teacher_mode="current", teacher_previous=None)
    return out / "ckpt", out / "state"


# The update stage of the scratch pipeline: copy the payload, make every file's bytes unique to the
# iteration (appended tail: a new checkpoint and state each time, as in training), write the data.
STAGE = r"""
import os, shutil, sys
src_ckpt, src_state, out, state, data, key, mb = sys.argv[1:8]
for src, dst in ((src_ckpt, out), (src_state, state)):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for d, _, files in os.walk(dst):
        for f in files:
            if f.endswith((".safetensors", ".pt", ".sha256")):
                with open(os.path.join(d, f), "ab") as fh:
                    fh.write(key.encode())
os.makedirs(os.path.dirname(data), exist_ok=True)
with open(data, "wb") as fh:
    fh.write(os.urandom(int(float(mb) * 1e6)))
"""


def _dvc_yaml(variant: str, ckpt: Path, state: Path, data_mb: float) -> dict:
    cmd = (f"python stage.py {ckpt} {state} ${{item.next_policy}} ${{item.next_policy}}-state "
           f"data/iter-${{key}}/data.bin ${{key}} {data_mb}")
    outs = ["${item.next_policy}", "${item.next_policy}-state"] if variant == "main" else \
        [{"${item.next_policy}": {"persist": True}}]
    return {"vars": ["iterations.yaml"], "stages": {
        "init": {"cmd": f"python -c \"import shutil; shutil.copytree('{ckpt}', 'models/policy-0000')\"",
                 "outs": ["models/policy-0000"]},
        "update": {"foreach": "${iterations}", "do": {
            "cmd": cmd, "deps": ["${item.policy}"], "outs": outs + ["data/iter-${key}/data.bin"]}}}}


def _inodes(root: Path) -> dict[int, int]:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not (x == "tmp" and Path(d).name == ".dvc")]  # DVC's locks and indexes
        for f in files:
            st = os.lstat(os.path.join(d, f))
            out[st.st_ino] = st.st_size
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def measure(variant: str, work: Path, ckpt: Path, state: Path, iterations: int, keep_every: int,
            data_mb: float) -> list[dict]:
    from tcrlsd.loop.iterations import append_iterations
    from tcrlsd.loop.retention import CheckpointParams, plan_ignores, prune

    work.mkdir(parents=True)
    _run([str(BIN / "dvc"), "init", "--no-scm", "-q"], work)
    if variant != "main":
        shutil.copyfile(ROOT / ".dvc" / "config", work / ".dvc" / "config")
        _run([str(BIN / "dvc"), "config", "core.no_scm", "true"], work)
    (work / "stage.py").write_text(STAGE)
    (work / "dvc.yaml").write_text(yaml.safe_dump(_dvc_yaml(variant, ckpt, state, data_mb), sort_keys=False))
    (work / "iterations.yaml").write_text(
        'iterations:\n  "0000": {k: 0, policy: models/policy-0000, next_policy: models/policy-0001}\n')
    keep = CheckpointParams(keep_every if variant == "keep-every" else 0, 2)
    plan_ignores(work, work / "iterations.yaml", keep)
    _run([str(BIN / "dvc"), "repro", "-q", "init"], work)
    seen = _inodes(work)
    cache0 = sum(_inodes(work / ".dvc" / "cache").values())
    rows = []
    for i in range(iterations):
        if i:
            append_iterations(work / "iterations.yaml", 1)
            plan_ignores(work, work / "iterations.yaml", keep)
        _run([str(BIN / "dvc"), "repro", "-q"], work)
        freed = prune(work, work / "iterations.yaml", keep).freed_bytes if variant == "keep-every" else 0
        now = _inodes(work)
        cache = sum(_inodes(work / ".dvc" / "cache").values())
        rows.append({"iteration": i, "written": sum(s for ino, s in now.items() if ino not in seen),
                     "cached": cache - cache0, "freed": freed, "disk": sum(now.values())})
        seen, cache0 = now, cache
    return rows


def model(variant: str, sizes: dict, iterations: int, keep_every: int, copy: bool) -> list[dict]:
    """The same accounting from file sizes: ckpt_w (weights), ckpt_m (the rest), state, data; init = policy-0000."""
    rows, disk = [], 0.0
    cache_by_copy = variant == "main" and copy
    per_cached = lambda tracked: tracked * (2 if cache_by_copy else 1)  # noqa: E731 (bytes on disk per tracked byte)
    disk = per_cached(sizes["ckpt_w"] + sizes["ckpt_m"])  # policy-0000, cached
    ckpts, state_on_disk = [], 0.0
    for i in range(iterations):
        j = i + 1
        ignored = variant == "keep-every" and j % keep_every != 0
        tracked = sizes["ckpt_m"] + sizes["data"] + (0 if ignored else sizes["ckpt_w"])
        tracked += sizes["state"] if variant == "main" else 0
        written = sizes["ckpt_w"] + sizes["ckpt_m"] + sizes["state"] + sizes["data"]
        written += tracked if cache_by_copy else 0
        cached = tracked
        disk += written
        freed = 0.0
        if variant != "main":
            freed += state_on_disk if variant == "keep-every" else 0.0
            state_on_disk = sizes["state"]
        ckpts.append((j, ignored))
        if variant == "keep-every":
            for n, (jj, ign) in enumerate(ckpts[:-2]):
                if ign:
                    freed += sizes["ckpt_w"]
                    ckpts[n] = (jj, False)  # deleted once
        disk -= freed
        rows.append({"iteration": i, "written": written, "cached": cached, "freed": freed, "disk": disk})
    return rows


def _table(title: str, rows_by_variant: dict[str, list[dict]], unit: float, name: str) -> str:
    lines = [f"### {title}", "", f"| variant | written / iteration | cached / iteration | freed / iteration | "
             f"disk after {len(next(iter(rows_by_variant.values())))} iterations |", "|---|---|---|---|---|"]
    for v, rows in rows_by_variant.items():
        tail = rows[1:] or rows  # iteration 0 frees nothing yet: the steady state is the mean after it
        mean = lambda key: sum(r[key] for r in tail) / len(tail)  # noqa: E731
        lines.append(f"| {v} | {mean('written') / unit:.2f} {name} | {mean('cached') / unit:.2f} {name} | "
                     f"{mean('freed') / unit:.2f} {name} | {rows[-1]['disk'] / unit:.2f} {name} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--keep-every", type=int, default=3, help="the keep-every variant's checkpoints.keep_every")
    ap.add_argument("--data-mb", type=float, default=1.0, help="data per iteration on the embedded default (MB)")
    ap.add_argument("--gpu-iterations", type=int, default=70)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        tmp = Path(tmp)
        ckpt, state = embedded_payload(tmp / "payload")
        size = lambda p, pat="*": sum(f.stat().st_size for f in p.rglob(pat) if f.is_file())  # noqa: E731
        sizes = {"ckpt_w": size(ckpt, "*.safetensors"), "state": size(state), "data": args.data_mb * 1e6}
        sizes["ckpt_m"] = size(ckpt) - sizes["ckpt_w"]
        print(f"embedded default payload: checkpoint {size(ckpt) / 1e6:.2f} MB (weights {sizes['ckpt_w'] / 1e6:.2f}), "
              f"state {sizes['state'] / 1e6:.2f} MB, data {args.data_mb:.2f} MB per iteration")
        measured, modelled = {}, {}
        for v in ("main", "keep-all", "keep-every"):
            measured[v] = measure(v, tmp / v, ckpt, state, args.iterations, args.keep_every, args.data_mb)
            modelled[v] = model(v, sizes, args.iterations, args.keep_every, copy=True)
    label = {"main": "main", "keep-all": "keep_every 0", "keep-every": f"keep_every {args.keep_every}"}
    print()
    print(_table(f"Embedded default, measured ({args.iterations} iterations, one process)",
                 {label[v]: r for v, r in measured.items()}, 1e6, "MB"))
    print()
    print(_table("Embedded default, the same accounting from file sizes",
                 {label[v]: r for v, r in modelled.items()}, 1e6, "MB"))
    # GPU preset: 3B policy; data at the 3072-token cap (an upper bound: uncompressed bytes per token of
    # rollouts ids + text 8, scores 8, sampler log-probs 4, advantages 4; + evaluations 500 x 32 responses)
    tokens = 1024 * 8 * 3072
    gpu = {"ckpt_w": 6.4 * GB, "ckpt_m": 0.02 * GB, "state": 36 * GB,
           "data": tokens * 24 + 500 * 32 * 3072 * 4}
    print()
    print(f"GPU preset projection: data {gpu['data'] / GB:.2f} GB per iteration (upper bound at the token cap)")
    n = args.gpu_iterations
    for v in ("main", "keep-all", "keep-every"):
        modelled[v] = model(v, gpu, n, 10, copy=True)
    print(_table(f"GPU preset (3B), projected over {n} iterations",
                 {"main": modelled["main"], "keep_every 0": modelled["keep-all"],
                  "keep_every 10 (the GPU preset)": modelled["keep-every"]}, GB, "GB"))


if __name__ == "__main__":
    main()
