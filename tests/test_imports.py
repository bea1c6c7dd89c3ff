"""The import graph of pipeline/, store/ and stages/: no cycles, store/ stands alone, and every DVC
stage depends (in dvc.yaml) on every module its command can import, so a code edit cannot leave a
stale result "up to date".

Imports are read from the source (ast), at every level: a function-level import still runs when the
function does, so it is an edge like any other. Only `if TYPE_CHECKING:` blocks are skipped (they
never run). Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`: those are edges too.
A registry that imports by name (`"pipeline.aligners.procrustes:Procrustes"`) names its module in a
string of that form: such a string is an edge as well.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PACKAGES = ("pipeline", "store", "stages")
IMPORT_PATH = re.compile(r"^((?:pipeline|store|stages)(?:\.\w+)+):[A-Za-z_][\w.]*$")  # "module:Class"
CLI = "pipeline.cli"  # every `xmodel <stage>` command runs it; its other commands' imports are not the stage's


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _command_calls(node: ast.AST) -> list[ast.Call]:
    """The `@<group>.command(...)` decorators of a function."""
    return [d for d in getattr(node, "decorator_list", [])
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"]


def _command_classes(tree: ast.AST) -> dict[str, str]:
    """Click command classes (`@cli.command(cls=X)`) -> the command function that uses each."""
    return {kw.value.id: node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for call in _command_calls(node) for kw in call.keywords
            if kw.arg == "cls" and isinstance(kw.value, ast.Name)}


def _is_other_command(node: ast.AST, command: str | None, classes: dict[str, str]) -> bool:
    """A click command function (decorated `@<group>.command(...)`), or the command class one of them
    uses (`cls=`: its help), of a command other than `command`."""
    if command is None:
        return False
    if isinstance(node, ast.ClassDef):
        return node.name in classes and classes[node.name] != command
    return isinstance(node, ast.FunctionDef) and node.name != command and bool(_command_calls(node))


def _imported(tree: ast.AST, name: str, is_package: bool, command: str | None = None, by_name: bool = True) -> set[str]:
    """Dotted names this module imports at any level, `from x import y` giving x and x.y, and with
    `by_name` the modules named by "module:Class" strings. With `command`, the bodies of the other
    click commands are left out."""
    out: set[str] = set()
    classes = _command_classes(tree) if command is not None else {}
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_other_command(node, command, classes):
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
        elif by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) and IMPORT_PATH.match(node.value):
            out.add(IMPORT_PATH.match(node.value).group(1))  # imported by name (importlib)
    return out


def import_graph(root: Path = ROOT, command: str | None = None, by_name: bool = True) -> dict[str, set[str]]:
    """module -> the project modules it imports (its own packages' __init__ modules included). With
    `command`, the CLI's edges are those of `xmodel <command>` only; without `by_name`, a registry's
    by-name imports are left out (they resolve when a name is looked up, after every module loaded)."""
    files = {_module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        tree = ast.parse(path.read_text())
        for dotted in _imported(tree, name, path.name == "__init__.py", command if name == CLI else None, by_name):
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


def dvc_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    """Stage name (foreach stages by their group name) -> its definition (a foreach's `do`)."""
    return {name: spec.get("do", spec) for name, spec in yaml.safe_load(dvc_yaml.read_text())["stages"].items()}


def dvc_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """Stage name (foreach stages by their group name) -> its deps as written."""
    return {name: [next(iter(d)) if isinstance(d, dict) else d for d in (spec.get("deps") or [])]
            for name, spec in dvc_stages(dvc_yaml).items()}


def uncovered(modules: set[str], deps: list[str]) -> list[str]:
    """Files of `modules` that no dep (a file, or a folder above it) covers."""
    roots = [Path(d) for d in deps]
    files = [module_file(m) for m in modules]
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in roots))


def exact_code_deps(modules: set[str], root: Path = ROOT) -> list[str]:
    """The fewest deps that cover exactly the files of `modules`: a package folder whose every module
    is among them is one dep (e.g. `store`), any other module its own file."""
    files = {module_file(m, root) for m in modules}
    every = {p.relative_to(root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    folders = sorted({f.parent for f in every}, key=lambda d: len(d.parts))  # outermost first
    deps: set[Path] = set()
    for folder in folders:
        inside = {f for f in every if folder in f.parents}
        if inside <= files and not any(d in folder.parents for d in deps):
            deps.add(folder)
    deps |= {f for f in files if not any(d in f.parents for d in deps)}
    return sorted(str(d) for d in deps)


def code_deps_diff(stage: str, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(deps dvc.yaml lacks, deps it has that the stage's command never imports) of one stage."""
    want = exact_code_deps(stage_modules(stage, root), root)
    have = [d for d in dvc_code_deps(root / "dvc.yaml")[stage] if Path(d).parts[0] in PACKAGES]
    return sorted(set(want) - set(have)), sorted(set(have) - set(want))


# --- the tests ----------------------------------------------------------------------------------


def test_no_import_cycles():
    assert cycles(import_graph(by_name=False)) == []


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
def test_dvc_code_deps_are_exactly_the_modules_the_stage_imports(stage):
    """No module the stage's command can import is missing (a stale result would look up to date),
    and no file it never imports is there (an edit of it would rerun the stage for nothing).
    `python tests/test_imports.py` rewrites them exactly."""
    missing, extra = code_deps_diff(stage)
    assert not missing and not extra, (f"dvc.yaml stage {stage!r}: add deps {missing}, remove deps {extra} "
                                       "(`python tests/test_imports.py` rewrites them)")


@pytest.mark.parametrize("stage", sorted(dvc_code_deps()))
def test_dvc_params_deps_are_what_the_stage_module_declares(stage):
    """Each stage module declares the params keys it reads (PARAMS, beside its code); dvc.yaml lists
    exactly those."""
    import importlib

    declared = list(importlib.import_module(f"stages.{stage}").PARAMS)
    assert dvc_stages()[stage].get("params", []) == declared, f"dvc.yaml stage {stage!r}: params must be {declared}"


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import c\n"
                              "def f():\n    from pipeline.b import g\nREGISTRY = {'d': 'pipeline.d:D'}\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("")
    (pkg / "d.py").write_text("")
    for name in ("store", "stages"):
        (tmp_path / name).mkdir()
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline", "pipeline.b", "pipeline.d"}
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]
    assert import_graph(tmp_path, by_name=False)["pipeline.a"] == {"pipeline", "pipeline.b"}
    assert uncovered({"pipeline.a", "pipeline.b"}, ["pipeline/a.py"]) == ["pipeline/b.py"]
    # a command's body and its help class (cls=) are that command's edges only
    (pkg / "cli.py").write_text("import click\nclass _Help(click.Command):\n    def format_epilog(self, c, f):\n"
                                "        from pipeline import c\n@cli.command(cls=_Help)\ndef evaluate():\n"
                                "    from pipeline import b\n@cli.command()\ndef fit():\n    from pipeline import a\n")
    assert import_graph(tmp_path, command="fit")["pipeline.cli"] == {"pipeline", "pipeline.a"}
    assert import_graph(tmp_path, command="evaluate")["pipeline.cli"] == {"pipeline", "pipeline.b", "pipeline.c"}
    (pkg / "cli.py").unlink()
    every = {"pipeline", "pipeline.a", "pipeline.b", "pipeline.c", "pipeline.d"}
    assert exact_code_deps(every, tmp_path) == ["pipeline"]
    assert exact_code_deps(every - {"pipeline.c"}, tmp_path) == [f"pipeline/{m}.py" for m in ("__init__", "a", "b", "d")]


# --- the typed params are a leaf ----------------------------------------------------------------

STAGE_CODE = ("pipeline.evaluation", "pipeline.tasks", "pipeline.aligners", "store")
# store/errors.py is the project's one exception class (pipeline.errors.UserError is it): a leaf of
# every package, no code; everything else of store/ is stage code
SHARED = {"store", "store.errors"}


def _stage_code(modules) -> list[str]:
    return sorted(m for m in modules if m not in SHARED and any(m == p or m.startswith(p + ".") for p in STAGE_CODE))


def test_reading_params_imports_no_stage_code():
    """Importing pipeline.config and loading and validating every section (defaults, a profile, the
    evaluate section with a task's own keys) imports no module of pipeline/evaluation, pipeline/tasks,
    pipeline/aligners or store, nor torch, nor the decoder."""
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from pipeline.config import load_params, params_from_dict\n"
            "load_params('params.yaml', overlays=['profiles/tiny.yaml'])\n"
            "params_from_dict({'evaluate': {'tasks': ['gsm8k', 'similarity'], 'gsm8k': {'n': 3, 'prompt': 'brief'},"
            " 'kv': {'layers': ['top', [0.5]]}}})\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(__import__("json").loads(done.stdout))
    assert _stage_code(loaded) == []
    assert not loaded & {"torch", "transformers", "numpy", "pipeline.generation", "pipeline.injection",
                         "pipeline.layers", "pipeline.models"}


def test_the_params_modules_import_no_stage_code_even_lazily():
    """The same, read from the source with every function-level import: no code path of the typed
    params reaches stage code (what DVC's deps on pipeline/config*.py rest on)."""
    graph = import_graph()
    params = {m for m in graph if m == "pipeline.config" or m.startswith("pipeline.config_")}
    reached = closure({m: (deps if m in params else set()) for m, deps in graph.items()}, sorted(params))
    assert _stage_code(reached) == [] and reached <= params | SHARED | {"pipeline", "pipeline.errors",
                                                                        "pipeline.artifacts"}


def rewrite_dvc_yaml(text: str, root: Path = ROOT) -> str:
    """dvc.yaml's text with each stage's code deps (the entries under pipeline/, stages/, store/)
    and params replaced by the exact ones, everything else (data deps, comments, order) kept."""
    import importlib

    out: list[str] = []
    stage, block, indent, pending = None, None, 0, []
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip())
        if block and line.strip() and depth <= indent:  # the block ended: its generated entries go last
            out += pending
            block = None
        header = re.match(r"^(\s*)(deps|params):\s*$", line)
        if re.match(r"^  [\w-]+:\s*$", line):
            stage = line.strip()[:-1]
        elif header and stage:
            block, indent = header.group(2), len(header.group(1))
            items = (exact_code_deps(stage_modules(stage, root), root) if block == "deps"
                     else importlib.import_module(f"stages.{stage}").PARAMS)
            pending = [f"{' ' * (indent + 2)}- {item}" for item in items]
        elif block and line.lstrip().startswith("- "):
            item = line.strip()[2:].split("#")[0].strip().rstrip(":")
            if block == "params" or Path(item).parts[0] in PACKAGES:
                continue  # regenerated
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":  # `python tests/test_imports.py`: make dvc.yaml's code and params deps exact
    path = ROOT / "dvc.yaml"
    path.write_text(rewrite_dvc_yaml(path.read_text()))
    print(f"{path}: code and params deps of every stage rewritten")
