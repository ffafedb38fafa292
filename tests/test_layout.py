"""The layout of docs/design.md, checked: every module imports, no import cycle, and every
import points down the layers (base -> data / models / kernels -> method -> eval -> train /
bench -> entry points). Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO

# Rank of each layer; a module may import its own layer's modules and lower-ranked ones.
# Layers of equal rank are independent of each other (data never imports models, train
# never imports bench).
RANKS = {"base": 0, "data": 1, "models": 1, "kernels": 1, "method": 2, "eval": 3,
         "train": 4, "bench": 4, "entry": 5}
ENTRY_POINTS = {"fastibd.evaluate", "fastibd.report", "fastibd.export", "fastibd.bench_data",
                "fastibd.sweep", "fastibd.bench_step", "fastibd.inspect_data",
                "fastibd.teachers", "fastibd.train.__main__", "data_prep.write_ffcv",
                "kernels.bench", "kernels.compile_check", "kernels.host_instructions"}
PACKAGES = ("fastibd.data", "fastibd.models", "fastibd.method", "fastibd.eval",
            "fastibd.train", "fastibd.bench")


def module_files() -> dict[str, Path]:
    files = [*REPO.glob("fastibd/**/*.py"), *REPO.glob("kernels/**/*.py"),
             REPO / "data_prep" / "write_ffcv.py"]
    modules = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    if module == "kernels" or module.startswith("kernels."):
        return "kernels"
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package.split(".")[1]
    return "base"


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (anywhere in the file)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from package import module` names a module; `from module import name` not
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c -> the deepest module known
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if m not in ENTRY_POINTS and not
                                          m.startswith("data_prep")))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        here = layer(module)
        for target in targets:
            there = layer(target)
            if RANKS[there] > RANKS[here] or (RANKS[there] == RANKS[here] and there != here):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components of the module graph: all of size one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_the_layout_test_sees_the_project() -> None:
    """Guards the test itself: it must know the packages and find real imports."""
    assert {"fastibd.train.trainer", "fastibd.method.loss", "kernels.reference"} <= set(MODULES)
    assert "fastibd.method.loss" in GRAPH["fastibd.train.trainer"] | {
        target for module in GRAPH["fastibd.train.trainer"] for target in GRAPH[module]}
    assert layer("fastibd.data.options") == "data" and layer("fastibd.evaluate") == "entry"
