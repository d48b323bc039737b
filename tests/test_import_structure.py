"""The import structure DESIGN.md asks for, read from the source with `ast` (nothing is imported):

- no import circles among loraflow/, flows/ and tasks/ (an import inside a function counts: it only moves the circle
  to run time; importing a.b.c runs a/__init__ and a/b/__init__ first, so those count too);
- an import of a project module inside a function saves a real cost, and a comment says so: the module it imports
  reaches, at its import, a heavy library (torch, Prefect, …) that the importing module does not, and the import's
  line or the line above it carries a comment (or the module has one `# Lazy imports:` comment for all of them);
- imports point down: flows/ → tasks/ → loraflow/; nothing under loraflow/ imports flows/, tasks/ or Prefect, except
  loraflow/cli.py inside its commands; nothing imports loraflow.cli; nothing in tasks/ imports flows/.

Hand-written rather than import-linter (not installed here): its contracts (layers, forbidden imports) cover the
last point but not a rule about comments or what an import costs, and the three rules share one parse.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loraflow", "flows", "tasks")
# What an in-function import may save: libraries whose import takes a noticeable time (or starts a native build check).
HEAVY = frozenset({"torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
                   "deepspeed", "prefect", "numpy", "pyarrow", "matplotlib", "huggingface_hub", "ipex_llm",
                   "intel_extension_for_pytorch", "mlflow", "optuna"})


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the dotted name as written (for `from a import b`: a.b)
    line: int
    end_line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _project_module(name: str) -> str | None:
    """The project module an imported name belongs to (a module, or the module a name is taken from)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import statement of the module, outside `if TYPE_CHECKING:` blocks (annotations only)."""
    found = []

    def walk(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for part in child.orelse:
                    walk(part, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, child.end_lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                base = child.module
                if child.level:  # (relative: resolved against this module's package)
                    package = module.split(".") if modules()[module].name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[:len(package) - child.level + 1] + [child.module])
                found.extend(Import(module, f"{base}.{alias.name}", child.lineno, child.end_lineno, in_function)
                             for alias in child.names)
            walk(child, inner)

    walk(ast.parse(modules()[module].read_text()), False)
    return tuple(found)


def _with_packages(importer: str, target: str) -> list[str]:
    """The project modules importing `target` runs: it and each package above it that the importer is not inside."""
    ran = [target]
    parent = target.rpartition(".")[0]
    while parent:
        if parent in modules() and importer != parent and not importer.startswith(parent + "."):
            ran.append(parent)
        parent = parent.rpartition(".")[0]
    return ran


def edges(module_level_only: bool = False) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules()}
    for name in modules():
        for statement in imports(name):
            if module_level_only and statement.in_function:
                continue
            target = _project_module(statement.target)
            if target and target != name:
                for ran in _with_packages(name, target):
                    graph[name].setdefault(ran, statement)
    return graph


def circles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


@cache
def heavy_reached(module: str) -> frozenset[str]:
    """The heavy libraries importing this module imports (its module-level imports, followed through the project)."""
    graph = edges(module_level_only=True)
    seen, todo, reached = {module}, [module], set()
    while todo:
        current = todo.pop()
        reached |= {statement.target.split(".")[0] for statement in imports(current) if not statement.in_function} & HEAVY
        for target in graph[current]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return frozenset(reached)


@cache
def comment_lines(module: str) -> dict[int, str]:
    source = modules()[module].read_text()
    return {token.start[0]: token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT}


def _commented(statement: Import) -> bool:
    comments = comment_lines(statement.importer)
    lines = modules()[statement.importer].read_text().splitlines()
    if any(line in comments for line in range(statement.line, statement.end_line + 1)):
        return True
    above = lines[statement.line - 2].strip() if statement.line > 1 else ""
    if above.startswith("#"):
        return True
    return any(comment.startswith("# Lazy imports:") for line, comment in comments.items()
               if not lines[line - 1].startswith((" ", "\t")))


def describe(statement: Import) -> str:
    path = modules()[statement.importer].relative_to(ROOT)
    return f"{path}:{statement.line}: {modules()[statement.importer].read_text().splitlines()[statement.line - 1].strip()}"


# ---- the tests --------------------------------------------------------------------------------------------
def test_there_are_no_import_circles_not_even_through_imports_inside_functions():
    graph = edges()
    found = circles(graph)
    said = []
    for group in found:
        said.append(" ↔ ".join(group) + "\n" + "\n".join(
            f"    {describe(statement)}{' (inside a function)' if statement.in_function else ''}"
            for member in group for target, statement in graph[member].items() if target in group))
    assert not found, "import circles:\n" + "\n".join(said)


def test_an_import_inside_a_function_saves_a_heavy_import_and_says_so():
    wrong = []
    for name in modules():
        said = set()
        for statement in imports(name):
            target = _project_module(statement.target)
            if not statement.in_function or target is None or target == name or statement.line in said:
                continue
            said.add(statement.line)
            saved = heavy_reached(target) - heavy_reached(name)
            if name == "loraflow.cli" and target.split(".")[0] in ("flows", "tasks"):
                saved = saved or {"(flows/tasks: the layers allow it inside commands only)"}
            if not saved:
                wrong.append(f"{describe(statement)}\n    saves nothing ({target} imports no heavy library that {name} does "
                             "not already): import it at the top")
            elif not _commented(statement):
                wrong.append(f"{describe(statement)}\n    saves importing {', '.join(sorted(saved))}: say so in a comment on "
                             "its line or the line above")
    assert not wrong, "imports inside functions:\n" + "\n".join(wrong)


def test_imports_point_down():
    wrong = []
    for name in modules():
        layer = name.split(".")[0]
        for statement in imports(name):
            top = statement.target.split(".")[0]
            if name.startswith("loraflow.") and statement.target.startswith("loraflow.cli"):
                wrong.append(f"{describe(statement)}\n    nothing imports loraflow.cli (the application's entry point)")
            if layer == "loraflow" and top in ("flows", "tasks", "prefect"):
                if name != "loraflow.cli" or not statement.in_function:
                    wrong.append(f"{describe(statement)}\n    loraflow/ is below flows/ and tasks/ and imports no Prefect "
                                 "(only loraflow/cli.py's commands may, inside their functions)")
            if layer == "tasks" and top == "flows":
                wrong.append(f"{describe(statement)}\n    tasks/ is below flows/")
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_the_rules_catch_what_they_are_for(tmp_path, monkeypatch):
    """The checks above on a made-up project: a circle through a function, an uncommented import inside a function,
    a lazy import that saves nothing, and an upward import are each found."""
    (tmp_path / "loraflow").mkdir()
    (tmp_path / "flows").mkdir()
    (tmp_path / "tasks").mkdir()
    for package in PACKAGES:
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "loraflow" / "a.py").write_text("import torch\n\n\ndef f():\n    from loraflow import b\n")
    (tmp_path / "loraflow" / "b.py").write_text("from loraflow.a import f\n")
    (tmp_path / "loraflow" / "light.py").write_text("import json\n")
    (tmp_path / "loraflow" / "c.py").write_text("def g():\n    from loraflow.light import json  # (saves nothing)\n")
    (tmp_path / "loraflow" / "d.py").write_text("def h():\n    from loraflow.a import f\n")
    (tmp_path / "loraflow" / "e.py").write_text("from prefect import flow\n")
    (tmp_path / "tasks" / "t.py").write_text("from flows import x\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for cached in (modules, imports, heavy_reached, comment_lines):
        cached.cache_clear()
    try:
        assert circles(edges()) == [["loraflow.a", "loraflow.b"]]
        for test, expected in ((test_an_import_inside_a_function_saves_a_heavy_import_and_says_so,
                                ["loraflow/a.py:5", "saves nothing (loraflow.light imports", "loraflow/d.py:2",
                                 "saves importing torch: say so"]),
                               (test_imports_point_down, ["loraflow/e.py:1", "tasks/t.py:1"])):
            try:
                test()
            except AssertionError as error:
                for part in expected:
                    assert part in str(error), (part, str(error))
            else:
                raise AssertionError(f"{test.__name__} found nothing")
    finally:
        monkeypatch.undo()
        for cached in (modules, imports, heavy_reached, comment_lines):
            cached.cache_clear()
