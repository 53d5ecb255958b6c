"""The package's layers point one way (``../shared/docs/architecture.md``, README "Layout").

Every ``import`` in ``enecg/`` (module level *and* inside functions: a function-local import is no way around a
layer) may name only its own package or a package of a lower layer, and packages of one layer never import each
other. Built from the source with ``ast``, so it needs nothing importable and runs in well under a second.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "enecg"

# Bottom to top. One entry per layer; a layer may hold several packages that must not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("leads",),
    ("record",),
    ("io",),
    ("contract",),
    ("data",),
    ("experts",),
    ("ensemble",),
    ("evaluation",),
    ("engine",),  # the generic Trainer + TrainerCallback under the three training packages
    ("training", "pretraining", "generative"),
    ("hub",),
    ("testing",),
    ("cli",),
    ("train", "embed"),  # enecg/{train,embed}.py: what `accelerate launch -m enecg.train|embed` runs
    ("__init__",),  # the top-level lazy namespace (enecg.Ensemble, ...)
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def _package_of(module: str) -> str:
    """``enecg.ensemble.gate`` -> ``ensemble``; ``enecg`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported enecg module) for every import statement of ``path``, relative ones resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, target) for line, target in found if target == "enecg" or target.startswith("enecg.")]


def layer_violations(root: Path = PACKAGE) -> list[str]:
    """One line per import that goes up a layer or sideways within one, or names an unknown package."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = _package_of(_module_name(path, root))
        for line, target in imports_of(path, root):
            imported = _package_of(target)
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if source not in RANK or imported not in RANK:
                problems.append(f"{where}: package {source if source not in RANK else imported!r} has no layer")
            elif imported != source and RANK[imported] >= RANK[source]:
                direction = "sideways" if RANK[imported] == RANK[source] else "up"
                problems.append(f"{where}: {source} -> {imported} goes {direction}")
    return problems


def package_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected groups of more than one package in the package import graph."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        source = _package_of(_module_name(path, root))
        for _, target in imports_of(path, root):
            if _package_of(target) != source:
                graph[source].add(_package_of(target))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in list(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_package_has_a_layer() -> None:
    packages = {_package_of(_module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert packages - set(RANK) == set(), "add new top-level packages/modules of enecg to LAYERS"


def test_imports_point_down() -> None:
    problems = layer_violations()
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_package_cycles() -> None:
    assert package_cycles() == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # An expert family reaching up into the ensemble, inside a function: still a violation.
        ({"experts/x.py": "def f():\n    from enecg.ensemble import Ensemble\n"}, "experts -> ensemble goes up"),
        # Two packages of one layer importing each other.
        ({"training/x.py": "from enecg.pretraining import y\n"}, "training -> pretraining goes sideways"),
        # A relative import is resolved before it is judged.
        ({"ensemble/x.py": "from ..hub import publish\n"}, "ensemble -> hub goes up"),
    ],
)
def test_the_check_catches_upward_imports(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    root = tmp_path / "enecg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    problems = layer_violations(root)
    assert any(expected in line for line in problems), problems


def test_the_check_finds_cycles(tmp_path: Path) -> None:
    root = tmp_path / "enecg"
    for name, text in {"a/m.py": "import enecg.b.m\n", "b/m.py": "from enecg.a import m\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert package_cycles(root) == [["a", "b"]]
