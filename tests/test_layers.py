"""The layout: layers only point down, with no circular edge between packages.

    base (config, utils) <- models (layers, backbone, weights, head, text towers, aligned model,
    transforms; text: tokenizers) <- checkpoint (record, format, official, export, hub, factory,
    init_from) <- data <- inference (classifier, dense, clip_retrieval) <- tasks (train, evaluation,
    features, curation) <- apps (CLI, demos)

Every import in dinotxt/ and curation/ (inside functions too) is read from the source.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAYERS = [
    ("base", ["dinotxt.config", "dinotxt.utils"]),
    ("models", ["dinotxt.models", "dinotxt.text"]),
    ("checkpoint", ["dinotxt.checkpoint"]),
    ("data", ["dinotxt.data"]),
    ("inference", ["dinotxt.inference"]),
    ("tasks", ["dinotxt.train", "dinotxt.evaluation", "dinotxt.features", "curation"]),
    ("apps", ["dinotxt.cli", "dinotxt.demo"]),
]


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"module {module} belongs to no layer: add it to tests/test_layers.py")


def modules():
    for base in ("dinotxt", "curation"):
        for path in sorted((ROOT / base).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield name.removesuffix(".__init__"), path


def imports(name: str, path: Path):
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                found = [target] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                found = [node.module or ""]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        else:
            continue
        yield from (f for f in found if f.split(".")[0] in ("dinotxt", "curation"))


EDGES = {name: sorted(set(imports(name, path))) for name, path in modules()}


@pytest.mark.parametrize("module", [m for m in EDGES if m != "dinotxt"])  # the package facade loads lazily
def test_no_module_imports_from_a_layer_above_it(module):
    up = [t for t in EDGES[module] if t != "dinotxt" and layer_of(t) > layer_of(module)]
    assert not up, f"{module} ({LAYERS[layer_of(module)][0]}) imports from above: {up}"


def test_no_cycle_between_packages():
    def package(m):
        parts = m.split(".")
        return ".".join(parts[:2]) if parts[0] == "dinotxt" and len(parts) > 1 else parts[0]

    graph = {}
    for m, targets in EDGES.items():
        graph.setdefault(package(m), set()).update(package(t) for t in targets if package(t) != package(m))
    graph.pop("dinotxt", None)

    def reach(start, node, seen):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return True
            if nxt not in seen and reach(start, nxt, seen | {nxt}):
                return True
        return False

    cycles = sorted(p for p in graph if reach(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles} ({ {p: sorted(graph[p]) for p in cycles} })"
