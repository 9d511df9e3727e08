"""DVC stage ``warmstart``: the embedded default policy, trained from nothing on the synthetic task.

    python stages/warmstart.py --params params.yaml --prompts data/prompts.parquet \
        --out models/policy-0000 --metrics data/warmstart/metrics.json

Builds the tokenizer and tiny Llama, trains it on synthetic solutions (never on a problem of the
prompts file), writes the Hugging Face checkpoint (safetensors + tokenizer) to --out and its greedy
accuracy on the val prompts (overall and per level) with the training statistics to --metrics.
"""

from __future__ import annotations

import sys

from tcrlsd.artifacts import read_artifact
from tcrlsd.params import load_section
from tcrlsd.stagecli import run_stage, stage_parser, write_metrics
from tcrlsd.warmstart import WarmstartParams, run_warmstart


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, sections=("warmstart",))
    ap.add_argument("--prompts", required=True, help="prompts artifact (its val split is the eval set)")
    ap.add_argument("--out", required=True, help="output checkpoint folder (Hugging Face format)")
    ap.add_argument("--metrics", required=True, help="output JSON: greedy val accuracy, training statistics")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    return run_stage("warmstart", lambda: _run(args))


def _run(args) -> int:
    params = load_section(args.params, "warmstart", WarmstartParams, preset=args.preset)
    prompts = read_artifact(args.prompts, "prompts")
    model, tokenizer, metrics = run_warmstart(params, prompts, source=args.prompts, progress=not args.no_progress)

    from tcrlsd.policy import save_policy

    save_policy(model, tokenizer, args.out)
    write_metrics(metrics, args.metrics)
    levels = ", ".join(f"L{k} {v:.0%}" for k, v in metrics["accuracy_by_level"].items())
    print(
        f"warmstart: {metrics['parameters']:,} parameters, {metrics['steps']} steps in "
        f"{metrics['train_seconds']:.0f} s ({metrics['tokens_per_second']:.0f} tokens/s); greedy val accuracy "
        f"{metrics['accuracy']:.1%} on {metrics['n']} prompts ({levels}); wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
