"""Structure checks of the package itself: imports point one way, functions stay short.

The layers are ops -> scoring -> criteria -> pruning -> cli (see docs/architecture.md). An import
inside a function that dodges a cycle hides the real dependency graph, so these tests read every
module's source with :mod:`ast`, collect its imports of other ``pyobc`` modules, top-level *and*
inside functions, and look for cycles. They also hold every function to 60 lines (docstring excluded),
the size past which the review of this codebase found functions doing several things at once.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyobc"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the pyobc modules it imports anywhere in its source (``from x import y`` counts
    ``x.y`` when that is a module, else ``x``)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if any (depth-first search). A package's ``__init__`` importing its own
    submodules is the normal way to re-export them and is not a cycle by itself, so edges from a
    package to its own submodules are ignored."""
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    # the checker itself must be able to fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # package re-export


def test_no_import_cycles():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _function_lengths(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body = body[1:]
            if not body:
                continue
            lines = body[-1].end_lineno - body[0].lineno + 1
            yield node.name, node.lineno, lines


def test_function_length_counter():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text('def f():\n    """doc\n    more"""\n    a = 1\n    return a\n')
        assert list(_function_lengths(p)) == [("f", 1, 2)]


@pytest.mark.parametrize("module", sorted(_modules()))
def test_functions_are_short(module):
    path = _modules()[module]
    long = [f"{name} (line {line}): {n} lines" for name, line, n in _function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE.parent)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
