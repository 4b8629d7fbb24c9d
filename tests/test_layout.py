"""The package's layout stays what DESIGN.md draws: no import circles, modules of one concept each."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dewey_lab"
MAX_LINES = 400
# modules over MAX_LINES, each one concept that does not split without scattering it
ONE_CONCEPT = {
    "dewey_lab.eval.tasks.synthetic": "exact-length passkey / needle documents (placement, token counting, checks)",
    "dewey_lab.data.store.vectors": "the crash-safe, multi-writer vector store (about 70 lines are its design notes)",
    "dewey_lab.eval.extension.methods": "the extension methods, one class each, as the table in its docstring",
    "dewey_lab.eval.embedder": "the Embedder: tokenise, batch, one forward pass, every head and late chunks, PCW",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """dewey_lab modules ``path`` imports at run time, lazily or not (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dewey_lab"):
            deps.add(node.module)
            deps |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("dewey_lab")}
    return {d for d in deps if d in known}


def test_no_import_circles():
    known = _modules()
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    # a module is on a circle iff it reaches itself: depth-first search from each module
    circles = []
    for start in graph:
        seen, todo = set(), [(start, [start])]
        while todo:
            node, trail = todo.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, [*trail, nxt]))
    assert not circles, circles


def test_modules_stay_small_unless_one_concept_needs_it():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(ONE_CONCEPT), {k: v for k, v in long.items() if k not in ONE_CONCEPT}
