"""DVC stage `code`: the code fingerprint of every stage script (tcrlsd/code/deps.py).

    python stages/code.py --out data/code

Writes ``data/code/<script>.txt`` for each script in ``stages/`` but this one: the sha256 of the
script and of every tcrlsd module it runs. Each pipeline stage depends on its script's file instead
of listing its modules, so the lock file stays small while a stage still reruns exactly when code it
runs changes. A file whose content is unchanged is not rewritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tcrlsd.artifacts import write_text
from tcrlsd.code import fingerprint
from tcrlsd.stagecli import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--out", required=True, help="folder of the fingerprints (one <script>.txt per stage script)")
    ap.add_argument("--root", default=".", help="the project root (holds stages/ and tcrlsd/); default: here")
    args = ap.parse_args(argv)
    return run_stage("code", lambda: _run(Path(args.root), Path(args.out)))


def _run(root: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scripts = sorted(p for p in (root / "stages").glob("*.py") if p.name != "code.py")
    for script in scripts:
        text = fingerprint(root.resolve(), script.resolve())
        target = out / f"{script.stem}.txt"
        if not target.exists() or target.read_text() != text:
            write_text(text, target)
    print(f"code: fingerprints of {len(scripts)} stage scripts in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
