"""The repository's import graph: no cycles, the engine layered as engine/__init__.py lists it, and
nothing in the engine importing an entry point. Every import counts, those inside functions too:
an import put off to call time still ties the two modules together."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"train", "evaluate", "evaluate_training", "jit_trace_model"}


def project_modules():
    """{module name: path}: the root's modules by stem, the engine's as engine.<stem>."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found |= {f"engine.{p.stem}": p for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__"}
    return found


def imports_of(path, modules):
    """The project modules that the file at `path` imports, anywhere in it."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            named.add(node.module)
            named |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from engine import config`
    return {name for name in named if name in modules}


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def engine_order():
    """The engine's modules in the order engine/__init__.py's docstring lists them, lowest first."""
    text = ast.get_docstring(ast.parse((ROOT / "engine" / "__init__.py").read_text()))
    block = text.split("lowest first", 1)[1]
    return [f"engine.{m}" for m in re.findall(r"^    ([a-z_]+) ", block, flags=re.M)]


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_imports_only_modules_below_it(graph):
    order = engine_order()
    engine = sorted(name for name in graph if name.startswith("engine."))
    assert sorted(order) == engine, "engine/__init__.py's list and the package's modules differ"
    upward = [f"{name} imports {other}" for name in order for other in graph[name]
              if other in order and order.index(other) >= order.index(name)]
    assert not upward, upward


def test_the_engine_imports_no_entry_point(graph):
    wrong = [f"{name} imports {other}" for name, found in graph.items() if name.startswith("engine.")
             for other in found & ENTRY_POINTS]
    assert not wrong, wrong


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# ---- sizes: a reader takes in a class or a function whole ----------------------------------------
MAX_DEFINITION_LINES = 150
MAX_LOOP_LINES = 250  # engine/loop.py, the training loop: read first by anyone changing training


def test_no_class_or_function_is_longer_than_a_reader_takes_in():
    paths = [*ROOT.glob("*.py"), *(ROOT / "engine").glob("*.py"), *(ROOT / "models").rglob("*.py")]
    long = [f"{path.relative_to(ROOT)}: {node.name}, {node.end_lineno - node.lineno + 1} lines"
            for path in paths for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_DEFINITION_LINES]
    assert not long, long
    assert len((ROOT / "engine" / "loop.py").read_text().splitlines()) <= MAX_LOOP_LINES
