"""Check ``rlcsd`` against RLCSD's own loss function, executed (THU-BPM/RLCSD, arXiv 2606.11709).

    python bench/rlcsd_peer_check.py --peer-file PATH/third_party/verl/verl/trainer/ppo/core_algos.py

The peer file is read from a checkout of https://github.com/THU-BPM/RLCSD (nothing of it is kept
here): its ``compute_policy_loss_rlcsd`` and the ``_sd_*`` helpers it calls are taken out with
``ast`` and run with small stand-ins for the verl imports (``verl_F.masked_mean`` and the loss
registry decorator). The peer computes a loss, not advantages, so the per-token advantage it uses is
read off the gradient at ratio 1 (log_prob = old_log_prob): its loss is
``mean_{unmodulated}(−r·A) + η · mean_{modulated}(−r·Â)``, so d loss / d log_prob is −A / N_unmod on
an unmodulated token and −η·Â / N_mod on a modulated one. With this project's modulated set
(|r_t| > δ) the gradient gives the peer's Â back, which is compared with
``tcrlsd.advantages.token_advantages("rlcsd", ...)`` on the same inputs (same λ: the peer holds λ
constant). Printed: max |Â_peer − Â_tcrlsd| over several random batches and settings, and whether
the modulated sets agree.
"""

from __future__ import annotations

import argparse
import ast
import sys
import types
from pathlib import Path

HELPERS = ("_sd_cfg", "_sd_token_mean", "_sd_distribution_metrics")


def load_peer(path: Path):
    import numpy as np
    import torch
    import torch.nn.functional as F

    tree = ast.parse(path.read_text())
    wanted = {"compute_policy_loss_rlcsd", *HELPERS}
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    missing = wanted - {n.name for n in defs}
    if missing:
        sys.exit(f"{path}: no {', '.join(sorted(missing))}; is this RLCSD's core_algos.py?")

    def masked_mean(values, mask, axis=None):
        return (values * mask).sum() / mask.sum().clamp(min=1)

    ns = {"torch": torch, "F": F, "np": np, "verl_F": types.SimpleNamespace(masked_mean=masked_mean),
          "register_policy_loss": lambda name: (lambda fn: fn)}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 -- a peer's code, on purpose
    return ns["compute_policy_loss_rlcsd"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-file", required=True, type=Path)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()

    import numpy as np
    import torch

    from tcrlsd.advantages import Settings, contrast_gap, token_advantages
    from tcrlsd.advantages.estimators import contrast_residual

    peer = load_peer(args.peer_file)
    rng = np.random.default_rng(0)
    worst, sets_agree, tokens = 0.0, True, 0
    for b in range(args.batches):
        B, T, K = int(rng.integers(2, 9)), int(rng.integers(3, 40)), int(rng.integers(1, 5))
        tau, beta, lam = float(rng.uniform(0.01, 1)), float(rng.uniform(0.2, 2)), float(rng.uniform(0.1, 1))
        delta, clip, eta = float(rng.uniform(0, 0.2)), float(rng.uniform(0.1, 2.5)), 1.0
        lengths = rng.integers(1, T + 1, size=B)
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)  # (B, T)
        adv_row = rng.choice([-1.3, -0.4, 0.0, 0.5, 1.1], size=B).astype(np.float32)  # (B,)
        correct = (-rng.exponential(1.5, (B, T))).astype(np.float32)  # (B, T)
        wrong = (correct[:, None, :] + rng.normal(0, 0.3, (B, K, T))).astype(np.float32)  # (B, K, T)
        old = (-rng.exponential(1.5, (B, T))).astype(np.float32)
        log_prob = torch.tensor(old, requires_grad=True)
        config = types.SimpleNamespace(policy_loss={
            "epsilon": 0.2, "rlcsd_tau": tau, "rlcsd_beta": beta, "rlcsd_lam": lam, "rlcsd_delta": delta,
            "rlcsd_eta": eta, "rlcsd_residual_clip_low": -clip, "rlcsd_residual_clip_high": clip})
        adv = torch.tensor(np.repeat(adv_row[:, None], T, axis=1))
        loss, _ = peer(torch.tensor(old), log_prob, adv, torch.tensor(mask), config=config,
                       teacher_log_probs=torch.tensor(correct), teacher_wrong_multi_log_probs=torch.tensor(wrong),
                       teacher_wrong_multi_valid_mask=torch.ones(B, K))
        loss.backward()
        grad = log_prob.grad.numpy()  # (B, T)

        s = Settings(lam=lam, eps_w=0.2, alpha=0.7, beta=0.3, contrast_temperature=tau, contrast_weight=beta,
                     contrast_threshold=delta, contrast_clip=clip)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = lambda x: np.concatenate([x[i, : lengths[i]] for i in range(B)])  # noqa: E731
        extra = np.stack([flat(wrong[:, k, :]) for k in range(K)])  # (K, N)
        ours = token_advantages("rlcsd", adv_row, offsets, flat(old), flat(correct), s, extra)  # (N,)
        # this project's modulated set: tokens whose residual survived the threshold
        sel = contrast_residual(contrast_gap(flat(correct), extra), s) != 0  # (N,)
        n_sel, n_uns = max(int(sel.sum()), 1), max(int((~sel).sum()), 1)
        g = flat(grad)
        peer_adv = np.where(sel, -g * n_sel / eta, -g * n_uns)
        worst = max(worst, float(np.max(np.abs(peer_adv - ours))))
        sets_agree &= bool(np.all((np.abs(peer_adv - np.repeat(adv_row, lengths)) > 1e-6) <= sel))
        tokens += len(ours)
    print(f"rlcsd vs RLCSD compute_policy_loss_rlcsd ({args.peer_file}): {args.batches} random batches, "
          f"{tokens} tokens, K in 1..4; max |A_hat peer - A_hat tcrlsd| = {worst:.2e}; "
          f"modified tokens within the modulated set: {sets_agree}")
    return 0 if worst < 1e-5 and sets_agree else 1


if __name__ == "__main__":
    sys.exit(main())
