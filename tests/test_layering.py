"""The package's layers: subpackages whose imports point down only, no import cycle, no private name
across modules.

The import graph is built by grimp (every import statement, those inside functions included), so a
cycle cannot hide behind a function-level import. Each layer may import the layers below it and its own
subpackage; never a layer above, and never a sibling in its layer (the algorithms meet in the pipeline),
except the pairs in SIBLING_IMPORTS. `docs/overview.md` describes the layers, and each subpackage's
docstring says what it owns and may import.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="the layering check needs grimp (the test extra installs it)")

PACKAGE = Path(__file__).resolve().parent.parent / "qruntime"

# top to bottom: (what the layer does, its subpackages or top-level modules)
LAYERS = [
    ("python -m qruntime", {"__main__"}),
    ("the command line", {"cli"}),
    ("the public API (qruntime/__init__.py)", {"__init__"}),
    ("evaluation and the demo", {"eval"}),
    ("the decoder (generation on the CPU)", {"runtime"}),
    ("the compress() pipeline", {"pipeline"}),
    ("recipes", {"recipes"}),
    ("algorithms and artifacts", {"quant", "sparse", "distill", "io"}),
    ("calibration", {"calibration"}),
    ("compressed modules and target selection", {"nn"}),
    ("ops", {"ops"}),
    ("formats", {"formats"}),
    ("plumbing and version", {"plumbing", "version"}),
]
# siblings of one layer that may import each other (importer, imported): SparseGPT uses GPTQ's quantizers
SIBLING_IMPORTS = {("sparse", "quant")}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("qruntime")


def _top(module: str) -> str:
    """``qruntime.ops.registry`` -> ``ops``; the package itself -> ``__init__``."""
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
            a, b = _top(importer), _top(imported)
            sideways = level[a] == level[b] and a != b and (a, b) not in SIBLING_IMPORTS
            if level[b] < level[a] or sideways:
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


def _dotted(path: Path) -> str:
    """The module name of a file of the package (kernels/ is qruntime.kernels)."""
    root = PACKAGE.parent.resolve()
    parts = list(path.resolve().relative_to(root).with_suffix("").parts)
    parts = ["qruntime", *parts[1:]] if parts[0] == "kernels" else parts
    return ".".join(parts)


def test_no_private_name_crosses_a_subpackage_boundary():
    """A leading-underscore name is imported only within its own subpackage (qruntime.distill.trainer may
    take ``_kl_rows`` from qruntime.distill.losses; nothing outside qruntime.distill may)."""
    crossings = []
    paths = {p.resolve() for p in PACKAGE.rglob("*.py")} | {p.resolve() for p in (PACKAGE.parent / "kernels").glob("*.py")}
    for path in sorted(paths):
        importer = _dotted(path)
        package = importer if path.name == "__init__.py" else importer.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                imported = ".".join(base + ([node.module] if node.module else []))
            else:
                imported = node.module or ""
            if not imported.startswith("qruntime"):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and _top(imported) != _top(importer):
                crossings.append(f"{importer}:{node.lineno} from {imported} {private}")
    assert not crossings, "\n".join(crossings)


def test_the_graph_holds_function_level_imports(graph):
    """A control for the tests above: qruntime.eval.models imports qruntime.io.checkpoint only inside a function
    (load_model), and the graph must hold that edge."""
    source = (PACKAGE / "eval" / "models.py").read_text()
    assert "\n    from qruntime.io.checkpoint import" in source and "\nfrom qruntime.io.checkpoint import" not in source
    assert graph.direct_import_exists(importer="qruntime.eval.models", imported="qruntime.io.checkpoint")


def _module_path(name: str) -> Path:
    return PACKAGE.parent.joinpath(*name.split("."))


def test_the_triton_kernels_import_only_the_ops_below_them():
    """`kernels/` (imported as qruntime.kernels: a folder without __init__.py, which grimp does not
    read) may use the op registry, the reference and the formats, and its own modules."""
    allowed = {"qruntime.ops.registry", "qruntime.ops.reference", "qruntime.formats.packing"}
    found = []
    for path in sorted((PACKAGE.parent / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = set()
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("qruntime"):
                for a in node.names:  # `from qruntime.ops import registry` names a module
                    sub = f"{node.module}.{a.name}"
                    names.add(sub if _module_path(sub).with_suffix(".py").is_file() else node.module)
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names if a.name.startswith("qruntime")}
            found += [f"{path.name}: {n}" for n in sorted(names - allowed)]
    assert not found, found


def test_importing_the_package_touches_no_cuda_compiles_nothing_and_loads_no_demo_dependency():
    """`import qruntime` (with its public API) leaves CUDA uninitialised, imports no Triton (so compiles no
    kernel) and none of the demo extra's packages (a core install has none of them)."""
    import subprocess
    import sys

    code = ("import sys, torch, qruntime; qruntime.compress, qruntime.load, qruntime.QuantLinear; "
            "print(torch.cuda.is_initialized(), sorted(m for m in ('triton', 'gguf', 'datasets', 'qruntime.kernels', "
            "'qruntime.eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.split("\n")[0] == "False []", out.stdout + out.stderr


def test_each_subpackage_docstring_names_what_it_imports(graph):
    """The "Imports:" paragraph of each subpackage's docstring lists exactly the parts of qruntime it
    imports (so the docstrings stay the map of the layers)."""
    import re

    wrong = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        name = init.parent.name
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Imports:" in doc, f"qruntime/{name}/__init__.py: the docstring has no 'Imports:' paragraph"
        said = set(re.findall(r"`qruntime\.(\w+)", doc[doc.index("Imports:"):]))
        found = {_top(b) for m in graph.modules if _top(m) == name
                 for b in graph.find_modules_directly_imported_by(m)} - {name}
        if said != found:
            wrong[name] = {"said, not imported": sorted(said - found), "imported, not said": sorted(found - said)}
    assert not wrong, wrong
