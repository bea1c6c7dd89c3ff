"""The import graph of pipeline/, store/ and stages/: no cycles, store/ stands alone, and every DVC
stage depends (in dvc.yaml) on every module its command can import, so a code edit cannot leave a
stale result "up to date".

Imports are read from the source (ast), at every level: a function-level import still runs when the
function does, so it is an edge like any other. Only `if TYPE_CHECKING:` blocks are skipped (they
never run). Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`: those are edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PACKAGES = ("pipeline", "store", "stages")
CLI = "pipeline.cli"  # every `xmodel <stage>` command runs it; its other commands' imports are not the stage's


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _is_other_command(node: ast.AST, command: str | None) -> bool:
    """A click command function (decorated `@<group>.command(...)`) other than `command`."""
    if command is None or not isinstance(node, ast.FunctionDef) or node.name == command:
        return False
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in node.decorator_list)


def _imported(tree: ast.AST, name: str, is_package: bool, command: str | None = None) -> set[str]:
    """Dotted names this module imports at any level, `from x import y` giving x and x.y. With
    `command`, the bodies of the other click commands are left out."""
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_other_command(node, command):
            continue
        if _is_type_checking(node):
            todo.extend(getattr(node, "orelse", []))
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def import_graph(root: Path = ROOT, command: str | None = None) -> dict[str, set[str]]:
    """module -> the project modules it imports (its own packages' __init__ modules included). With
    `command`, the CLI's edges are those of `xmodel <command>` only."""
    files = {_module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        tree = ast.parse(path.read_text())
        for dotted in _imported(tree, name, path.name == "__init__.py", command if name == CLI else None):
            parts = dotted.split(".")
            # every package on the way is imported (and runs its __init__); `from pkg import func`
            # names no module, so only the prefixes that are modules count
            edges.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in files)
        # a module's own packages run first
        edges.update(m for m in (".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)) if m in files)
        edges.discard(name)
        graph[name] = edges
    return graph


def module_file(name: str, root: Path = ROOT) -> Path:
    path = root.joinpath(*name.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root)


def closure(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(graph[module])
    return seen


def stage_modules(stage: str, root: Path = ROOT) -> set[str]:
    """Every project module `xmodel <stage>` can import: the CLI (its shared code and this command's
    body), the stage module, and all they import, transitively."""
    return closure(import_graph(root, command=stage), [CLI, f"stages.{stage}"])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def dvc_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """Stage name (foreach stages by their group name) -> its deps as written."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: [next(iter(d)) if isinstance(d, dict) else d for d in (spec.get("do", spec).get("deps") or [])]
            for name, spec in stages.items()}


def uncovered(modules: set[str], deps: list[str]) -> list[str]:
    """Files of `modules` that no dep (a file, or a folder above it) covers."""
    roots = [Path(d) for d in deps]
    files = [module_file(m) for m in modules]
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in roots))


# --- the tests ----------------------------------------------------------------------------------


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_store_imports_nothing_from_pipeline():
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] != "store")
             for m, deps in graph.items() if m.split(".")[0] == "store"}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_pipeline_and_store_never_import_stages():
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] == "stages")
             for m, deps in graph.items() if m.split(".")[0] in ("pipeline", "store") and m != "pipeline.cli"}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_every_stage_module_is_a_dvc_stage_and_back():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    assert set(dvc_code_deps()) == modules


@pytest.mark.parametrize("stage", sorted(dvc_code_deps()))
def test_dvc_deps_cover_every_module_the_stage_imports(stage):
    missing = uncovered(stage_modules(stage), dvc_code_deps()[stage])
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on {missing}: add them (or their folder)"


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import c\n"
                              "def f():\n    from pipeline.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("")
    for name in ("store", "stages"):
        (tmp_path / name).mkdir()
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline", "pipeline.b"}
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]
    assert uncovered({"pipeline.a", "pipeline.b"}, ["pipeline/a.py"]) == ["pipeline/b.py"]
