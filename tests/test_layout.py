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

from tcrlsd.code import fingerprint, fingerprint_path, imports, package_modules, runs

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tcrlsd"
MAX_LINES = 500
# Subpackages that are not pipeline stages: the CLI's commands are front ends like stages/*.py.
FRONT_ENDS = {"tcrlsd.commands", "tcrlsd.cli"}


MODULES: dict[str, Path] = package_modules(ROOT)


def _imports(path: Path) -> list[list[str]]:
    return imports(path, MODULES)


def _runs(path: Path) -> set[str]:
    return runs(path, MODULES)


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


def test_each_dvc_stage_depends_on_the_fingerprint_of_exactly_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    code = stages.pop("code")
    assert set(code["deps"]) == {"stages", "tcrlsd"}  # any code change reruns the (cheap) code stage
    written = {next(iter(o)) if isinstance(o, dict) else o for o in code["outs"]}
    scripts = sorted(p for p in (ROOT / "stages").glob("*.py") if p.name != "code.py")
    assert written == {fingerprint_path(p) for p in scripts}
    assert stages
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = next(w for w in body["cmd"].split() if w.startswith("stages/"))
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        assert fingerprint_path(script) in deps, f"dvc.yaml stage {name}: no dep on its code fingerprint"
        assert not any(d.startswith(("tcrlsd/", "stages/")) for d in deps), f"dvc.yaml stage {name}: a code path dep"
    # the fingerprint lists the script and exactly the modules it runs, with their current digests
    for script in scripts:
        listed = {line.split("  ", 1)[1] for line in fingerprint(ROOT, script).splitlines()}
        assert listed == {f"stages/{script.name}"} | {str(MODULES[m].relative_to(ROOT)) for m in _runs(script)}
    # The warm start does not depend on the critique stage's code (issue 10, item 7).
    warm = fingerprint(ROOT, ROOT / "stages" / "warmstart.py")
    assert "tcrlsd/critique" not in warm and "tcrlsd/reference_critic.py" in warm


def test_the_code_graph_follows_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    pkg = tmp_path / "tcrlsd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from tcrlsd.b import g\n    return g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tcrlsd.c\n")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("_EXPORTS = {'thing': 'impl'}\n")
    (pkg / "sub" / "impl.py").write_text("thing = 1\n")
    script = tmp_path / "s.py"
    script.write_text("import tcrlsd.a\nfrom tcrlsd.sub import thing\n")
    mods = package_modules(tmp_path)
    assert runs(script, mods) == {"tcrlsd", "tcrlsd.a", "tcrlsd.b", "tcrlsd.sub", "tcrlsd.sub.impl"}
    before = fingerprint(tmp_path, script)
    (pkg / "c.py").write_text("x = 1\n")  # not run: the fingerprint stays
    assert fingerprint(tmp_path, script) == before
    (pkg / "b.py").write_text((pkg / "b.py").read_text() + "y = 2\n")  # run lazily: it changes
    assert fingerprint(tmp_path, script) != before


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
