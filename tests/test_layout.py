"""The package layout (docs/ARCHITECTURE.md, "Map"): every module imports on its own, the import
graph has no cycle, the core imports no stage package, each stages/ script imports only its stage
package and the core, and each dvc.yaml stage's deps are exactly the tcrlsd modules its script runs.

The graph is read from the source (AST): every ``import``/``from ... import`` of a ``tcrlsd`` module,
at module level or inside a function (a lazy import still runs when the stage runs). Importing
``tcrlsd.a.b`` also runs ``tcrlsd/__init__.py`` and ``tcrlsd/a/__init__.py``; a package ``__init__``
that re-exports lazily declares ``_EXPORTS = {name: submodule}`` (PEP 562), and ``from pkg import
name`` then runs that submodule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tcrlsd"
MAX_LINES = 500
# Subpackages that are not pipeline stages: the CLI's commands are front ends like stages/*.py.
FRONT_ENDS = {"tcrlsd.commands", "tcrlsd.cli"}


def _modname(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_modname(p): p for p in sorted(PKG.rglob("*.py"))}


def _lazy_exports(mod: str) -> dict:
    for node in ast.parse(MODULES[mod].read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return ast.literal_eval(node.value)
    return {}


def _resolve(name: str) -> list[str]:
    """The modules that ``import name`` (or ``from parent import last``) runs, outermost first."""
    out: list[str] = []
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = ".".join(parts[:i])
        if mod in MODULES:
            out.append(mod)
        elif out and out[-1] == ".".join(parts[: i - 1]):
            sub = _lazy_exports(out[-1]).get(parts[i - 1])
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


def _imports(path: Path) -> list[list[str]]:
    """For each tcrlsd import statement (name) in ``path``: the modules it runs, outermost first."""
    found = []
    for node in _walk_run(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [_resolve(a.name) for a in node.names if a.name.split(".")[0] == "tcrlsd"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tcrlsd":
            base = _resolve(node.module)
            found.append(base)
            found += [r for a in node.names if len(r := _resolve(f"{node.module}.{a.name}")) > len(base)]
    return [f for f in found if f]


def _runs(path: Path) -> set[str]:
    """Every tcrlsd module that running ``path`` can import (transitively, ancestors included)."""
    seen: set[str] = set()
    todo = [m for chain in _imports(path) for m in chain]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += [m for chain in _imports(MODULES[mod]) for m in chain]
    return seen


def _stage_package(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) >= 2 and f"tcrlsd.{parts[1]}" not in FRONT_ENDS and (PKG / parts[1]).is_dir():
        return f"tcrlsd.{parts[1]}"
    return None


def test_every_module_imports_in_a_fresh_interpreter_without_torch():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import tcrlsd
        names = [m.name for m in pkgutil.walk_packages(tcrlsd.__path__, "tcrlsd.")]
        for name in names:
            importlib.import_module(name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "vllm"))
        print(len(names), heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.split(" ", 1)
    assert int(count) == len(MODULES) - 1  # walk_packages lists every module but tcrlsd itself
    assert heavy.strip() == "[]", f"importing the package pulls in heavy frameworks: {heavy}"


def test_import_graph_has_no_cycle():
    # Edges to the module each statement names (its deepest module); a submodule's implicit import
    # of its own parent package is Python's order of initialisation, not a cycle.
    graph = {m: {chain[-1] for chain in _imports(p)} - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_imports_no_stage_package():
    core = [m for m in MODULES if _stage_package(m) is None and m not in FRONT_ENDS and not m.startswith("tcrlsd.commands")]
    assert "tcrlsd.answers" in core and "tcrlsd.templates" in core and "tcrlsd.reference_critic" in core
    for m in core:
        bad = sorted({x for chain in _imports(MODULES[m]) for x in chain if _stage_package(x)})
        assert not bad, f"core module {m} imports stage code {bad}"


def test_stage_scripts_import_only_their_stage_package_and_core():
    for script in sorted((ROOT / "stages").glob("*.py")):
        own = f"tcrlsd.{script.stem}"
        assert own in MODULES, f"{script}: no package {own}"
        for chain in _imports(script):
            pkg = _stage_package(chain[-1])
            assert pkg in (None, own) and chain[-1] not in FRONT_ENDS, f"{script.name} imports {chain[-1]}"


def test_modules_are_small():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    big = {m: n for m, n in sizes.items() if n >= MAX_LINES}
    assert not big, f"modules of {MAX_LINES}+ lines: {big}"


def test_dvc_deps_are_exactly_the_modules_each_stage_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = next(w for w in body["cmd"].split() if w.startswith("stages/"))
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        listed = {d for d in deps if d.startswith("tcrlsd/")}
        runs = {str(MODULES[m].relative_to(ROOT)) for m in _runs(ROOT / script)}
        assert script in deps, f"dvc.yaml stage {name}: its script {script} is not a dep"
        assert not runs - listed, f"dvc.yaml stage {name}: deps miss modules it runs: {sorted(runs - listed)}"
        assert not listed - runs, f"dvc.yaml stage {name}: deps list modules it never runs: {sorted(listed - runs)}"
    # The warm start does not depend on the critique stage's code (issue 10, item 7).
    warm = {d for d in stages["warmstart"]["deps"] if isinstance(d, str)}
    assert not any(d.startswith("tcrlsd/critique") for d in warm)


def _private_uses(source: str) -> list[str]:
    """``_name``s (not dunders) that ``source`` takes from a tcrlsd module: ``from tcrlsd.x import _n``,
    or ``m._n`` on a name bound to a tcrlsd module (``import tcrlsd.x as m``, ``from tcrlsd import x``)."""
    private = lambda n: n.startswith("_") and not n.startswith("__")  # noqa: E731
    found, aliases = [], set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tcrlsd":
            found += [f"{node.module}.{a.name}" for a in node.names if private(a.name)]
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] == "tcrlsd"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and private(node.attr):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    # The checker sees both spellings (a checker that finds nothing would pass vacuously).
    assert _private_uses("from tcrlsd.artifacts import _x, y\nimport tcrlsd.resume as R\nR._z()\nR.ok()\n") \
        == ["tcrlsd.artifacts._x", "R._z"]
    assert _private_uses("from tcrlsd import artifacts as A\nA._x\nfrom os import _exit\n") == ["A._x"]
    # A name another module needs is public: it loses its underscore (issue 21, item 8).
    files = [p for d in ("tcrlsd", "stages", "bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    bad = {str(p.relative_to(ROOT)): u for p in files if (u := _private_uses(p.read_text()))}
    assert not bad, f"private names used across modules: {bad}"
