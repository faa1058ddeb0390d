"""The package's layers, checked on its source (an ast import graph of repro/) and in fresh interpreters.

- No import cycles between modules: neither among module-level imports (what runs when the module is imported,
  outside ``if TYPE_CHECKING:``) nor once the imports inside functions count too. Those are lazy by design (a runner
  imported when a stage runs, torch imported when a model is built), but a lazy import must still point one way: a
  pair of modules that import each other inside functions is one layer split in two (move what both need below).
- Layer rules, on every import (module- or function-level): models/ never imports methods/; engine/ never imports
  evals/ or profile/.
- Planning modules import no torch, timm or torchvision (checked via sys.modules in a fresh interpreter), and
  ``python -X importtime -c "import repro.resolve"`` shows no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "repro"
HEAVY = ("torch", "timm", "torchvision")
# The planning layer (show, plan, tables, report): repro.spec, repro.report and repro.methods.specs with every module
# below them.
PLANNING = ["repro.config", "repro.errors", "repro.kinds", "repro.resolve", "repro.scales", "repro.pipeline.plan",
            "repro.pipeline.stage", "repro.methods.registry", "repro.models.archs", "repro.models.cost",
            "repro.profile.projection", "repro.pipeline.slurm_resources"]
PLANNING_PACKAGES = ["repro.spec", "repro.report", "repro.methods.specs"]
LAYER_RULES = {  # importer package -> packages it must never import
    "repro.models": ("repro.methods",),
    "repro.engine": ("repro.evals", "repro.profile"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not module_level:
                yield from _imports(node.body, module_level)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            continue
        else:  # if / try / with / class bodies run at import time
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _imports(getattr(node, field, []) or [], module_level)


def imported(name: str, module_level: bool) -> set[str]:
    """The repro modules ``name`` imports (``from pkg import sub`` counts as the submodule where it is one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text()).body, module_level):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package() -> None:
    assert len(MODULES) > 60
    assert "repro.kinds" in imported("repro.config", module_level=True)
    resolve_lazy = imported("repro.resolve", module_level=False) - imported("repro.resolve", module_level=True)
    assert "repro.methods.registry" in resolve_lazy  # imported inside a function: not an edge of the cycle graph
    assert "repro.methods.registry" in imported("repro.methods.specs.lomar", module_level=True)  # from-import


def test_no_import_cycles_at_module_level() -> None:
    graph = {m: imported(m, module_level=True) for m in MODULES}
    assert cycles(graph) == []


def test_no_import_cycles_through_lazy_imports() -> None:
    graph = {m: imported(m, module_level=False) for m in MODULES}
    assert cycles(graph) == []


def test_cycle_detection_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer", sorted(LAYER_RULES))
def test_layer_rules(importer: str) -> None:
    forbidden = LAYER_RULES[importer]
    bad = {(m, t) for m in MODULES if m == importer or m.startswith(importer + ".")
           for t in imported(m, module_level=False) if t.startswith(forbidden)}
    assert not bad, sorted(bad)


def planning_modules() -> list[str]:
    return PLANNING + sorted(m for m in MODULES for p in PLANNING_PACKAGES if m == p or m.startswith(p + "."))


def _heavy_after_import(modules: list[str]) -> list[str]:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.split()


def test_planning_imports_no_torch() -> None:
    modules = planning_modules()
    assert len(modules) > len(PLANNING)
    if _heavy_after_import(modules):  # name the culprits, one interpreter each
        culprits = {m: heavy for m in modules if (heavy := _heavy_after_import([m]))}
        pytest.fail(f"planning modules that import {HEAVY}: {culprits}")


def test_importtime_of_resolve_has_no_torch() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import repro.resolve"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    names = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "repro.resolve" in names
    assert not [n for n in names if n.split(".")[0] in HEAVY]
