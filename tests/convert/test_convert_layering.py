"""The import structure of the library, read from the source with ``ast``: no import circle
inside ``gradgraph.convert``, no module importing a layer below it in the order
``graph -> capture -> convert -> symmetry -> nn -> optim`` (DESIGN.md), and no private name
of one ``convert`` module used by another.

Run it as a script to print what it finds::

    python tests/convert/test_convert_layering.py

Every import counts, also those inside functions (a lazy import only hides a circle from the
interpreter, not from the reader). ``from package import name`` is an edge to the submodule
``package.name`` when that is a module, else to ``package``; a package's ``__init__`` is a node
of its own, and importing ``a.b.c`` is no edge to ``a.b`` (else every module would be in a
circle through its package).

The tests fail on the code this file was written for: convert/ held a 7-module circle
(``trace/run.py`` imported ``convert/attention.py``), 114 private names crossed module
boundaries inside it, and modules read each other's private attributes (the trace run read
the tracer's ``_module_paths``, the assembly the plan's ``_derived``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "gradgraph"
#: DESIGN.md's layers, lowest first; a module may import its own layer and those before it
LAYERS = ("graph", "capture", "convert", "symmetry", "nn", "optim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: str = PACKAGE) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``src/<root>``."""
    base = SOURCE.joinpath(*root.split("."))
    return {_module_name(path): path for path in sorted(base.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports(known: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    """``{module: {imported module: names imported from it}}`` over ``known`` (names empty for
    ``import x``); only imports of modules in ``known``."""
    found: dict[str, dict[str, set[str]]] = {}
    for module, path in known.items():
        edges: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known:
                        edges.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in known:
                        edges.setdefault(submodule, set())
                    elif target in known:
                        edges.setdefault(target, set()).add(alias.name)
        edges.pop(module, None)
        found[module] = edges
    return found


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """``"a imports b"`` for every import of a module of a later layer than the importer's."""
    found = []
    for module, edges in sorted(graph.items()):
        own = _layer(module)
        for target in sorted(edges):
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{module} ({LAYERS[own]}) imports {target} ({LAYERS[theirs]})")
    return found


def private_crossings(graph: dict[str, dict[str, set[str]]], inside: str = f"{PACKAGE}.convert") -> list[str]:
    """``"a imports _name from b"`` for private names one module of ``inside`` imports from another."""
    return [f"{module} imports {name} from {target}"
            for module, edges in sorted(graph.items()) if module.startswith(inside)
            for target, names in sorted(edges.items()) if target.startswith(inside)
            for name in sorted(names) if name.startswith("_") and not name.startswith("__")]


def _defined_private(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, methods, ``self._x`` attributes, class fields."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
    return {name for name in found if name.startswith("_") and not name.startswith("__")}


def private_attribute_reads(known: dict[str, Path]) -> list[str]:
    """``"a reads ._x of b"`` where module ``a`` reads private state that module ``b`` defines:
    ``obj._x`` for an ``_x`` another module of ``known`` defines, or ``self._x`` (a mixin) for an
    ``_x`` only other modules define. Attributes of torch's own objects (``module._parameters``)
    are defined in none of them."""
    trees = {module: ast.parse(path.read_text(), str(path)) for module, path in known.items()}
    defined = {module: _defined_private(tree) for module, tree in trees.items()}
    found = []
    for module, tree in sorted(trees.items()):
        on_self, on_others = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                is_self = isinstance(node.value, ast.Name) and node.value.id == "self"
                (on_self if is_self else on_others).add(node.attr)
        for name in sorted(on_self | on_others):
            owners = sorted(other for other, names in defined.items() if name in names and other != module)
            if owners and (name in on_others or name not in defined[module]):
                found.append(f"{module} reads .{name} of {', '.join(owners)}")
    return found


def test_no_import_circle_inside_convert() -> None:
    convert = imports(modules(f"{PACKAGE}.convert"))
    assert cycles(convert) == [], "import circles inside gradgraph.convert"


def test_no_module_imports_a_later_layer() -> None:
    assert layer_violations(imports(modules())) == []


def test_no_private_name_crosses_a_module_of_convert() -> None:
    assert private_crossings(imports(modules(f"{PACKAGE}.convert"))) == []


def test_no_module_of_convert_reads_another_ones_private_attributes() -> None:
    assert private_attribute_reads(modules(f"{PACKAGE}.convert")) == []


if __name__ == "__main__":
    graph = imports(modules())
    convert = {module: edges for module, edges in graph.items() if module.startswith(f"{PACKAGE}.convert")}
    for component in cycles(convert):
        print(f"circle of {len(component)}: {', '.join(component)}")
    for line in layer_violations(graph):
        print("layer:", line)
    crossings = private_crossings(graph)
    for line in crossings:
        print("private:", line)
    reads = private_attribute_reads(modules(f"{PACKAGE}.convert"))
    for line in reads:
        print("attribute:", line)
    print(f"{len(cycles(convert))} circles in convert, {len(layer_violations(graph))} layer violations, "
          f"{len(crossings)} private names crossing convert's modules, {len(reads)} private attributes read across them")
