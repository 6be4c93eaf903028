"""Arrows point one way: the import graph of featcache, drawn from its source (every import,
module-level or inside a function), against the layering the architecture promises.

    errors, io, device, distributed              the ground
    preprocessing                                the entries' data transforms
    backbones, datasets, store                   entries and data (no stage, no store in the
                                                 registry, no model in the store)
    extraction, pretraining                      stage 1 (extraction writes stores)
    evaluation                                   stage 2 (reads stores only)
    studies                                      on top of stage 2
    api, cli, __main__                           the way in (only __main__ imports the CLI)
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"

# Which top-level parts of featcache each part may import (itself always).
GROUND = {"errors", "io", "device", "distributed", "__init__"}
ALLOWED = {
    **{g: GROUND for g in GROUND},
    "preprocessing": GROUND,
    "backbones": GROUND | {"preprocessing"},
    "datasets": GROUND | {"preprocessing"},
    "store": GROUND,
    "extraction": GROUND | {"preprocessing", "backbones", "datasets", "store"},
    "pretraining": GROUND | {"preprocessing", "backbones", "datasets", "store", "evaluation"},
    "evaluation": GROUND | {"store"},
    "studies": GROUND | {"store", "evaluation"},
    "api": GROUND | {"store", "evaluation", "studies", "extraction"},
    "cli": GROUND
    | {
        "store",
        "evaluation",
        "studies",
        "extraction",
        "pretraining",
        "api",
        "backbones",
        "datasets",
    },  # fmt: skip
    "__main__": {"cli"},
}
# Libraries of models and images that stage 2 never needs.
MODEL_LIBRARIES = ("transformers", "timm", "torchvision")


def _modules() -> dict[str, Path]:
    """Dotted name -> file; a package's ``__init__.py`` is the package."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges(name: str) -> set[str]:
    """The featcache modules a module imports; ``from package import module`` is an edge to
    the module, not the package."""
    out = set()
    for target, names in GRAPH[name]:
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in GRAPH]
        out |= set(subs) if subs and len(subs) == len(names) else {target} & set(GRAPH)
    return out - {name}


GRAPH = {name: _imports(name, path) for name, path in _modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_only_the_layers_below_it(name):
    part = _part(name)
    wrong = sorted(
        {
            target
            for target, _ in GRAPH[name]
            if target.startswith("featcache.") and _part(target) not in ALLOWED[part] | {part}
        }
    )
    assert not wrong, f"{name} ({part}) imports {wrong}"
    if part in ("evaluation", "studies", "store"):
        libraries = [t for t, _ in GRAPH[name] if t.split(".")[0] in MODEL_LIBRARIES]
        assert not libraries, f"{name} imports {libraries}"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_takes_another_modules_private_name(name):
    taken = [
        f"{target}.{n}"
        for target, names in GRAPH[name]
        for n in names
        if n.startswith("_") and not n.startswith("__") and target.startswith("featcache")
        and target != name
    ]  # fmt: skip
    assert not taken, f"{name} imports private names {taken}"


def test_the_modules_import_each_other_in_no_circle():
    edges = {name: _edges(name) for name in GRAPH}

    def circle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for name in sorted(GRAPH) if (c := circle_from(name))]
    assert not circles, f"import circles: {circles[:3]}"


def test_only_main_imports_the_cli():
    importers = sorted(
        name for name, imports in GRAPH.items() for t, _ in imports
        if t == "featcache.cli" and name != "featcache.cli"
    )  # fmt: skip
    assert importers == ["featcache.__main__"]
