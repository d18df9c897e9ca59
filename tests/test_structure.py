"""The package's layout rules (docs/architecture.md), checked on the source so they stay true.

* No import cycle among vdm's modules, counting every import wherever it stands.
* vdm's own modules are imported at module top level: an import inside a function hides a
  dependency (and used to hide cycles). Only optional heavy packages may load lazily.
* Dependencies point one way: the lower layers never import the higher ones (LAYERS).
* No function over 60 lines, no module over 500 (MODULE_SIZE_EXCEPTIONS names the exceptions).
* The pmap path lives in the step factory and its layout adapter only (other modules may import
  the adapter's names).
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vdm")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
# Modules allowed over MAX_MODULE_LINES, each with the reason (tables of weight names only).
MODULE_SIZE_EXCEPTIONS: dict[str, str] = {}
PMAP_FILES = {"vdm/train/step.py", "vdm/parallel/pmap.py"}

# (module prefix, prefixes it must never import). Lower layers first.
LAYERS = [
    ("vdm.models", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.io.bundle", "vdm.tools",
                    "vdm.eval", "vdm.data", "vdm.encoders")),
    ("vdm.diffusion", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.io", "vdm.tools",
                       "vdm.eval", "vdm.data", "vdm.models", "vdm.encoders")),
    ("vdm.data", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.io.bundle", "vdm.tools",
                  "vdm.eval", "vdm.encoders")),
    ("vdm.io", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.tools", "vdm.eval",
                "vdm.encoders")),
    ("vdm.parallel", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.tools", "vdm.eval",
                      "vdm.data", "vdm.models", "vdm.io", "vdm.encoders")),
    ("vdm.inference", ("vdm.train", "vdm.tasks", "vdm.tools", "vdm.eval")),
    ("vdm.eval", ("vdm.train", "vdm.tasks", "vdm.tools")),
    ("vdm.tasks", ("vdm.train", "vdm.tools")),
    ("vdm.train", ("vdm.tools",)),
    ("vdm.errors", ("vdm.",)),
    ("vdm.paths", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.tools", "vdm.eval", "vdm.data",
                   "vdm.models", "vdm.io", "vdm.parallel", "vdm.diffusion", "vdm.encoders",
                   "vdm.cli", "vdm.config", "vdm.rng")),
    ("vdm.rng", ("vdm.",)),
    ("vdm.cli", ("vdm.train", "vdm.tasks", "vdm.inference", "vdm.tools", "vdm.eval")),
]  # fmt: skip


def _modules() -> dict[str, str]:
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))
                name = rel[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, os.path.dirname(ROOT)).replace(os.sep, "/")


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The vdm modules an import statement loads (its target, or the closest package)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".")
            if not MODULES[module].endswith("__init__.py"):
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        # Importing a.b.c runs the packages a and a.b first: those are dependencies too (except
        # the importer's own packages, which are already running).
        while name.startswith("vdm"):
            if name != module and not module.startswith(name + "."):
                out.add(name)
            name = name.rpartition(".")[0]
    return out


def _imports(module: str):
    """(all vdm modules it imports, [(line, imported) of those imported inside a def/class])."""
    tree = ast.parse(_read(MODULES[module]))
    everything, nested = set(), []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                targets = _resolve(module, child)
                everything.update(targets)
                if inside and targets:
                    nested.append((child.lineno, sorted(targets)))
            scoped = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            visit(child, inside or scoped)

    visit(tree, False)
    return everything, nested


GRAPH = {m: _imports(m)[0] for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strong(w)
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

    for v in sorted(GRAPH):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


def test_vdm_modules_are_imported_at_top_level():
    nested = {_rel(MODULES[m]): found for m in sorted(MODULES) if (found := _imports(m)[1])}
    assert nested == {}, "import these at module top level: " + repr(nested)


@pytest.mark.parametrize("layer,forbidden", LAYERS, ids=[layer for layer, _ in LAYERS])
def test_dependencies_point_one_way(layer, forbidden):
    wrong = {
        m: sorted(t for t in targets if t.startswith(forbidden))
        for m, targets in GRAPH.items()
        if (m == layer or m.startswith(layer + "."))
        and any(t.startswith(forbidden) for t in targets)
    }
    assert wrong == {}


def test_function_and_module_sizes():
    long_functions, long_modules = [], []
    for path in MODULES.values():
        source = _read(path)
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES and _rel(path) not in MODULE_SIZE_EXCEPTIONS:
            long_modules.append(f"{_rel(path)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert long_functions == [] and long_modules == []


def _mentions_pmap(path: str) -> bool:
    """Whether the source names pmap outside import statements (importing the adapter's
    constants, e.g. the mode names config validation checks against, is allowed)."""
    source = _read(path)
    imports = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.update(range(node.lineno, node.end_lineno + 1))
    lines = source.splitlines()
    return any(
        re.search(r"pmap", line, re.IGNORECASE)
        for i, line in enumerate(lines, start=1)
        if i not in imports
    )


def test_pmap_lives_in_the_step_factory_and_its_adapter():
    mentions = sorted(_rel(p) for p in MODULES.values() if _mentions_pmap(p))
    assert set(mentions) <= PMAP_FILES, mentions


def test_the_checker_finds_what_it_looks_for(tmp_path):
    """The rules above can fail: a cycle, a nested import and a long function are found."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {"vdm.a": {"vdm.b"}, "vdm.b": {"vdm.c"}, "vdm.c": {"vdm.a"}, "vdm.d": set()}
        assert _cycles() == [["vdm.a", "vdm.b", "vdm.c"]]
    finally:
        GRAPH = saved
    module = "vdm.config"
    nested = ast.parse("def f():\n    from vdm import rng\n")
    found = []
    for node in ast.walk(nested):
        if isinstance(node, ast.ImportFrom):
            found.append(_resolve(module, node))
    assert found == [{"vdm.rng"}]
