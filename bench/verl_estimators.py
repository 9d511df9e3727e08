"""Check the outcome estimators and the GSPO loss against verl's own functions, executed.

    git -C /work/.mirror/volcengine+verl/repo archive HEAD verl/trainer/ppo/core_algos.py \
        verl/utils/torch_functional.py | tar -x -C /tmp/verl-src        # any verl checkout will do
    python bench/verl_estimators.py --verl-src /tmp/verl-src [--iter-dir DIR] [--samples 4] [--seed 0]

Without --iter-dir it builds a real small iteration with the tests' harness (tests/harness.py
``build_iteration``: prepare, generate, verify, critique, score, advantages on a tiny random-weight
policy, groups of --samples). That policy answers nothing right, so when every reward is equal the
verdicts are redrawn (seeded Bernoulli(0.5), said in the output) -- the group structure and the
response lengths stay the iteration's own. With --iter-dir any stored iteration is used as it is.

For each estimator, ``tcrlsd recompute``'s code path (:func:`tcrlsd.advantages.compute_advantages`
writing an advantages file) is compared with verl's function on the same rewards, groups (index =
prompt_id) and response mask (reward at the last response token, as verl's reward manager puts
it): max |Â − verl| over every response token. verl's module is loaded from its source file with
its heavy imports stubbed (ray, tensordict, its device helpers); nothing of verl is copied here.

GSPO: verl's ``compute_policy_loss_gspo`` against :func:`tcrlsd.update.losses.gspo_loss` aggregated
seq-mean-token-mean, on the iteration's lengths and advantages with log-probs perturbed by seeded
noise: |loss difference| and max |gradient difference| per token.

Singleton groups: verl keeps A = r (GRPO: mean 0, std 1; RLOO and REINFORCE++-baseline: no
baseline); tcrlsd gives them A = 0. Rows of singleton groups are counted and left out of the diff.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def load_verl(src: Path):
    """verl's core_algos executed from ``src``, its imports outside torch/numpy stubbed."""
    import torch

    def module(name: str, **attrs):
        m = types.ModuleType(name)
        m.__path__ = []  # a package, so submodules resolve
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class _Config:  # AlgoConfig / ActorConfig: attribute bags here
        def __init__(self, **kw):
            self.__dict__.update(kw)

    module("verl")
    utils = module("verl.utils", as_torch_index=None, group_mean_std=None)
    module("verl.utils.device", get_device_name=lambda: "cpu", get_torch_device=lambda: torch.cpu)
    module("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda f: f))
    module("verl.trainer")
    module("verl.trainer.config", AlgoConfig=_Config)
    module("verl.trainer.ppo")
    module("verl.workers")
    module("verl.workers.config", ActorConfig=_Config)
    if importlib.util.find_spec("tensordict") is None:
        module("tensordict", TensorDict=dict)

    def load(name: str, rel: str):
        spec = importlib.util.spec_from_file_location(name, src / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    utils.torch_functional = load("verl.utils.torch_functional", "verl/utils/torch_functional.py")
    return load("verl.trainer.ppo.core_algos", "verl/trainer/ppo/core_algos.py"), _Config


def build(folder: Path, samples: int) -> Path:
    """A harness iteration in ``folder`` (tiny random policy, groups of ``samples``)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import tiny_policy
    from harness import build_iteration, write_params

    policy = tiny_policy(folder / "policy")
    params = write_params(folder, generate={"samples_per_prompt": samples, "sampling": {"max_new_tokens": 24}})
    return build_iteration(folder / "it", policy, params)


def redraw_rewards_if_flat(it: Path, seed: int) -> bool:
    path = it / "verdicts.parquet"
    t = pq.read_table(path)
    r = t.column("reward").to_numpy()
    if r.min() != r.max():
        return False
    new = np.random.default_rng(seed).integers(0, 2, len(r)).astype(np.float32)
    t = t.set_column(t.schema.get_field_index("reward"), "reward", pa.array(new, pa.float32()))
    t = t.set_column(t.schema.get_field_index("is_correct"), "is_correct", pa.array(new > 0))
    pq.write_table(t, path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verl-src", type=Path, required=True, help="folder holding verl/trainer/ppo/core_algos.py")
    ap.add_argument("--iter-dir", type=Path, help="a stored iteration (default: build one with the harness)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt of the built iteration")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from tcrlsd.advantages import AdvantagesParams, IterationInputs, compute_advantages
    from tcrlsd.artifacts import read_artifact
    from tcrlsd.update.losses import AggregationCounts, ClipSettings, aggregate, gspo_loss

    core, Config = load_verl(args.verl_src)
    tmp = Path(tempfile.mkdtemp(prefix="verl-check-"))
    try:
        it = args.iter_dir or build(tmp, args.samples)
        redrawn = False if args.iter_dir else redraw_rewards_if_flat(it, args.seed)
        inputs = IterationInputs.find(it)
        ro = read_artifact(inputs.rollouts, "rollouts").select(["rollout_id", "prompt_id", "response_token_ids"])
        ver = read_artifact(inputs.verdicts, "verdicts").select(["rollout_id", "reward"])
        ids = ro.column("rollout_id").to_pylist()
        reward = dict(zip(ver.column("rollout_id").to_pylist(), ver.column("reward").to_pylist()))
        prompt = ro.column("prompt_id").to_pylist()
        lengths = pc.list_value_length(ro.column("response_token_ids")).to_numpy().astype(np.int64)
        B, T = len(ids), int(lengths.max())
        mask = torch.zeros(B, T)
        rewards = torch.zeros(B, T)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
            rewards[i, n - 1] = reward[ids[i]]
        index = np.array(prompt, dtype=object)
        sizes = {p: prompt.count(p) for p in set(prompt)}
        keep = torch.tensor([sizes[p] > 1 for p in prompt])
        print(f"iteration: {it if args.iter_dir else 'harness build'}: {B} rollouts, {len(sizes)} groups, "
              f"{int(lengths.sum())} response tokens, reward mean {float(np.mean(list(reward.values()))):.3f}"
              + (" (rewards redrawn: the tiny random policy got every answer wrong)" if redrawn else "")
              + f"; rows in singleton groups (left out): {int((~keep).sum())}")

        checks = [
            ("grpo", dict(norm_by_std=True), lambda: core.compute_grpo_outcome_advantage(rewards, mask, index)),
            ("grpo", dict(norm_by_std=False),
             lambda: core.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)),
            ("rloo", {}, lambda: core.compute_rloo_outcome_advantage(rewards, mask, index)),
            ("reinforce_pp", {},
             lambda: core.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=Config(gamma=1.0))),
            ("reinforce_pp_baseline", {},
             lambda: core.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, index)),
        ]
        rows = []
        for name, kw, verl_fn in checks:
            out = tmp / f"{name}.parquet"
            compute_advantages(inputs, AdvantagesParams(estimator=name, **kw), out)
            got = dict(zip(*[read_artifact(out, "advantages").column(c).to_pylist() for c in ("rollout_id", "advantages")]))
            ours = torch.zeros(B, T)
            for i, rid in enumerate(ids):
                ours[i, : lengths[i]] = torch.tensor(got[rid])
            theirs = verl_fn()[0].float()
            diff = ((ours - theirs).abs() * mask)[keep].max().item()
            label = {"grpo": "compute_grpo_outcome_advantage", "rloo": "compute_rloo_outcome_advantage",
                     "reinforce_pp": "compute_reinforce_plus_plus_outcome_advantage",
                     "reinforce_pp_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage"}[name]
            if kw.get("norm_by_std") is False:
                label += "(norm_adv_by_std_in_grpo=False)"
            rows.append((f"{name}" + (" norm_by_std=false (dr_grpo)" if kw.get("norm_by_std") is False else ""),
                         label, diff, float((theirs.abs() * mask).max())))

        # GSPO: the loss and its gradient on the iteration's shape, old log-probs perturbed by noise
        g = torch.Generator().manual_seed(args.seed)
        old = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3) * mask
        new = (old + 0.02 * torch.randn(B, T, generator=g, dtype=torch.float64)) * mask
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) * mask
        cfg = Config(clip_ratio_low=3e-4, clip_ratio_high=4e-4, clip_ratio=0.2, global_batch_info={})
        lp_v = new.clone().requires_grad_()
        loss_v, _ = core.compute_policy_loss_gspo(old, lp_v, adv, mask, "seq-mean-token-mean", cfg)
        loss_v.backward()
        m = mask.bool()
        lp_o = new[m].clone().requires_grad_()
        seq = torch.arange(B)[:, None].expand(B, T)[m]
        per_tok, _ = gspo_loss(lp_o, old[m], adv[m], seq, ClipSettings(3e-4, 4e-4))
        seq_len = torch.tensor(lengths)[:, None].expand(B, T)[m]
        loss_o = aggregate(per_tok, seq_len, "seq-mean-token-mean", AggregationCounts(int(m.sum()), B, 1))
        loss_o.backward()
        rows.append(("gspo loss (seq-mean-token-mean)", "compute_policy_loss_gspo", abs(loss_o.item() - loss_v.item()),
                     abs(loss_v.item())))
        rows.append(("gspo d loss / d logp", "compute_policy_loss_gspo (autograd)",
                     float((lp_o.grad - lp_v.grad[m]).abs().max()), float(lp_v.grad[m].abs().max())))

        print(f"\n| tcrlsd | verl function | max abs diff | max abs value |\n|---|---|---:|---:|")
        for a, b, d, v in rows:
            print(f"| {a} | {b} | {d:.2e} | {v:.3g} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
