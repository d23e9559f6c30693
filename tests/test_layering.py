"""The package's layers: imports point down only, no import cycle, no private name across modules.

The import graph is built by grimp (every import statement, those inside functions included), so a
cycle cannot hide behind a function-level import. Each layer may import the layers below it and,
without a cycle, its own modules; never a layer above. `docs/overview.md` describes the layers.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="the layering check needs grimp (the test extra installs it)")

PACKAGE = Path(__file__).resolve().parent.parent / "qruntime"

# top to bottom: (what the layer does, its modules)
LAYERS = [
    ("entry points", {"__main__", "cli"}),
    ("the public API (qruntime/__init__.py)", {"__init__"}),
    ("evaluation, demo models, export", {"evaluate", "speed", "models", "export"}),
    ("checkpoints", {"checkpoint"}),
    ("the compress() pipeline", {"pipeline"}),
    ("whole-model algorithms", {"distill", "mixed", "prune", "awq", "tune"}),
    ("block-by-block passes, smoothing, target selection", {"sequential", "smooth", "targets"}),
    ("calibration statistics", {"calibrate"}),
    ("compressed modules", {"nn"}),
    ("registration of the GPU kernels", {"triton_backend"}),
    ("ops", {"ops"}),
    ("per-layer algorithms, reference, CPU extension, block layouts",
     {"gptq", "clip", "reference", "cpu_layout", "_ext", "layouts"}),
    ("foundations: formats, configs, report types, model plumbing, offloading, offline data, version",
     {"formats", "config", "report", "plumbing", "offload", "data", "version"}),
]


@pytest.fixture(scope="module")
def graph():
    graph = grimp.build_graph("qruntime")
    # `from . import _C` (the compiled extension, which grimp cannot read) shows as an import of the package
    graph.remove_import(importer="qruntime._ext", imported="qruntime")
    return graph


def _top(module: str) -> str:
    """``qruntime.ops`` -> ``ops``; the package itself -> ``__init__``."""
    return module.split(".")[1] if "." in module else "__init__"


def test_every_module_has_a_layer(graph):
    modules = {_top(m) for m in graph.modules}
    placed = set().union(*(mods for _, mods in LAYERS))
    assert modules == placed, {"without a layer": sorted(modules - placed), "gone": sorted(placed - modules)}


def test_imports_point_down_only(graph):
    level = {mod: i for i, (_, mods) in enumerate(LAYERS) for mod in mods}
    upward = []
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if level[_top(imported)] < level[_top(importer)]:
                upward.append(f"{importer} ({LAYERS[level[_top(importer)]][0]}) imports {imported} "
                              f"({LAYERS[level[_top(imported)]][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
    """Imports between layers point down, so a cycle could only lie within a layer."""
    cycles = []
    for _, mods in LAYERS:
        names = {m for m in graph.modules if _top(m) in mods}
        for a, b in itertools.combinations(sorted(names), 2):
            if graph.chain_exists(importer=a, imported=b) and graph.chain_exists(importer=b, imported=a):
                cycles.append(f"{a} <-> {b}: {graph.find_shortest_chain(importer=a, imported=b)}, "
                              f"{graph.find_shortest_chain(importer=b, imported=a)}")
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    crossings = []
    paths = {p.resolve() for p in PACKAGE.rglob("*.py")} | {p.resolve() for p in (PACKAGE.parent / "kernels").glob("*.py")}
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text())):
            # a private submodule (``from . import _C``) is the package's own; a private name of a module is not
            if isinstance(node, ast.ImportFrom) and node.module and (node.level or node.module.startswith("qruntime")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    crossings.append(f"{path.relative_to(PACKAGE.parent.resolve())}:{node.lineno} from {node.module} {private}")
    assert not crossings, "\n".join(crossings)


def test_the_graph_holds_function_level_imports(graph):
    """A control for the tests above: qruntime.models imports qruntime.checkpoint only inside a function
    (load_model), and the graph must hold that edge."""
    source = (PACKAGE / "models.py").read_text()
    assert "\n    from .checkpoint import" in source and "\nfrom .checkpoint import" not in source
    assert graph.direct_import_exists(importer="qruntime.models", imported="qruntime.checkpoint")


def test_the_triton_kernels_import_only_the_ops_below_them():
    """`kernels/` (imported as qruntime.kernels: a folder without __init__.py, which grimp does not
    read) may use qruntime.ops, the reference and the formats, and its own modules."""
    allowed = {"qruntime.ops", "qruntime.reference", "qruntime.formats", "qruntime"}
    found = []
    for path in sorted((PACKAGE.parent / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("qruntime"):
                names = {node.module} if node.module != "qruntime" else {f"qruntime.{a.name}" for a in node.names}
                found += [f"{path.name}: {n}" for n in names - allowed]
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: {a.name}" for a in node.names
                          if a.name.startswith("qruntime") and a.name not in allowed]
    assert not found, found
