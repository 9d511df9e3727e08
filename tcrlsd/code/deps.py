"""Which tcrlsd modules a stage script runs, and the code fingerprint DVC tracks in their place.

The import graph is read from the source (AST): every ``import`` / ``from ... import`` of a ``tcrlsd``
module, at module level or inside a function (a lazy import still runs when the stage runs), except
under ``if TYPE_CHECKING:``. Importing ``tcrlsd.a.b`` also runs ``tcrlsd/__init__.py`` and
``tcrlsd/a/__init__.py``; a package ``__init__`` that re-exports lazily declares ``_EXPORTS = {name:
submodule}`` (PEP 562), and ``from pkg import name`` then runs that submodule.

Why a fingerprint (issue 23, item 2): DVC rewrites the whole dvc.lock after every stage, and two
thirds of an iteration's lock were the per-stage lists of code modules (17-38 entries a stage, every
iteration), which made that rewrite grow quadratically over a run. The ``code`` stage (stages/code.py)
depends on the ``stages`` and ``tcrlsd`` folders (one lock entry each) and writes one small text file
per stage script, ``data/code/<script>.txt``: the sha256 of the script and of every module it runs.
Each stage depends on its file instead of the module list, so it reruns exactly when code it runs
changes -- as before -- while the lock holds one code entry per stage.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

__all__ = ["package_modules", "imports", "runs", "fingerprint", "fingerprint_path", "ensure_ignored", "CODE_DIR",
           "BYTECODE_IGNORES"]

CODE_DIR = "data/code"  # the code stage's outputs, relative to the project root (dvc.yaml names it too)
# .dvcignore lines without which the code stage's folder deps would change whenever Python writes bytecode
BYTECODE_IGNORES = ("__pycache__/", "*.pyc")


def _modname(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    """``{module name: file}`` for every module of the ``tcrlsd`` package under ``root``."""
    return {_modname(root, p): p for p in sorted((root / "tcrlsd").rglob("*.py")) if "__pycache__" not in p.parts}


def _lazy_exports(path: Path) -> dict:
    for node in ast.parse(path.read_text()).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return ast.literal_eval(node.value)
    return {}


def _resolve(name: str, mods: dict[str, Path]) -> list[str]:
    """The modules that ``import name`` (or ``from parent import last``) runs, outermost first."""
    out: list[str] = []
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = ".".join(parts[:i])
        if mod in mods:
            out.append(mod)
        elif out and out[-1] == ".".join(parts[: i - 1]):
            sub = _lazy_exports(mods[out[-1]]).get(parts[i - 1])
            if sub:
                out.append(f"{out[-1]}.{sub}")
            break
    return out


def _walk_run(tree: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:`` (annotations only: never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            todo += node.orelse
            continue
        todo += list(ast.iter_child_nodes(node))


def imports(path: Path, mods: dict[str, Path]) -> list[list[str]]:
    """For each tcrlsd import statement (name) in ``path``: the modules it runs, outermost first."""
    found = []
    for node in _walk_run(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [_resolve(a.name, mods) for a in node.names if a.name.split(".")[0] == "tcrlsd"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tcrlsd":
            base = _resolve(node.module, mods)
            found.append(base)
            found += [r for a in node.names if len(r := _resolve(f"{node.module}.{a.name}", mods)) > len(base)]
    return [f for f in found if f]


def runs(script: Path, mods: dict[str, Path]) -> set[str]:
    """Every tcrlsd module that running ``script`` can import (transitively, ancestors included)."""
    seen: set[str] = set()
    todo = [m for chain in imports(script, mods) for m in chain]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += [m for chain in imports(mods[mod], mods) for m in chain]
    return seen


def fingerprint(root: Path, script: Path) -> str:
    """The text of ``data/code/<script>.txt``: ``sha256  path`` for the script and every tcrlsd module
    it runs (paths relative to ``root``, sorted)."""
    mods = package_modules(root)
    files = [script] + [mods[m] for m in runs(script, mods)]
    lines = sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}" for p in files)
    return "\n".join(lines) + "\n"


def fingerprint_path(script: str | Path) -> str:
    """Where the code stage writes ``script``'s fingerprint (relative to the project root)."""
    return f"{CODE_DIR}/{Path(script).stem}.txt"


def ensure_ignored(root: str | Path) -> list[str]:
    """Add :data:`BYTECODE_IGNORES` to ``root/.dvcignore`` where missing; returns the lines added."""
    from tcrlsd.artifacts import write_text

    path = Path(root) / ".dvcignore"
    text = path.read_text() if path.exists() else ""
    have = {ln.strip() for ln in text.splitlines()}
    add = [ln for ln in BYTECODE_IGNORES if ln not in have]
    if add:
        if text and not text.endswith("\n"):
            text += "\n"
        write_text(text + "# Python bytecode is not code the code stage fingerprints (tcrlsd/code/deps.py)\n"
                   + "".join(ln + "\n" for ln in add), path)
    return add
