"""The package's layout stays what DESIGN.md draws: no import circles, modules of one concept each."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dewey_lab"
MAX_LINES = 450
LENGTH_MARKER = "Length:"  # a line of a long module's opening docstring that says why it is not split


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: dict[str, Path], prefix: str = "dewey_lab") -> set[str]:
    """Package modules ``path`` imports: at the top, inside a function (lazily) or only for type checkers
    (``if TYPE_CHECKING:``). A type-only import is a dependency all the same: two modules that need each other's
    names, even one of them only for annotations, are one concept in two files."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            deps.add(node.module)
            deps |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith(prefix)}
    return {d for d in deps if d in known}


def _circles(known: dict[str, Path], prefix: str = "dewey_lab") -> list[str]:
    graph = {name: _imports(path, known, prefix) - {name} for name, path in known.items()}
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
    return circles


def test_no_import_circles():
    assert not _circles(_modules()), _circles(_modules())


def test_the_circle_check_sees_lazy_and_type_only_imports(tmp_path):
    """The check itself, on a package written here: the store / maintenance circle as it was (the store imported
    its maintenance at the top, maintenance named the store for type checkers only) and the same through a
    function-level import are both caught; a one-way dependency is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "vectors.py").write_text("from pkg.maintenance import verify\n")
    (pkg / "maintenance.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                        "    from pkg.vectors import VectorStore\n")
    assert "pkg.vectors -> pkg.maintenance -> pkg.vectors" in _circles(_modules(pkg), "pkg")
    (pkg / "maintenance.py").write_text("def verify(store):\n    from pkg import vectors\n")
    assert "pkg.maintenance -> pkg.vectors -> pkg.maintenance" in _circles(_modules(pkg), "pkg")
    (pkg / "vectors.py").write_text("X = 1\n")
    assert _circles(_modules(pkg), "pkg") == []


def _long_without_reason(package: Path = PACKAGE) -> dict[str, int]:
    """Modules over MAX_LINES whose opening docstring has no line starting with ``Length:``."""
    out = {}
    for name, path in _modules(package).items():
        text = path.read_text()
        n = len(text.splitlines())
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and not any(line.strip().startswith(LENGTH_MARKER) for line in doc.splitlines()):
            out[name] = n
    return out


def test_modules_stay_small_unless_their_docstring_says_why():
    """A module over MAX_LINES says in its opening docstring, on a line starting with ``Length:``, why it is
    one module (e.g. one concept that does not split without scattering it); else split it."""
    assert not _long_without_reason(), (f"modules over {MAX_LINES} lines without a '{LENGTH_MARKER}' line in their "
                                        f"opening docstring (split them, or say why not): {_long_without_reason()}")


def test_the_length_check_reads_the_opening_docstring(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "x = 1\n" * MAX_LINES
    (pkg / "long.py").write_text('"""A module."""\n' + body)
    (pkg / "reasoned.py").write_text('"""A module.\n\nLength: one concept.\n"""\n' + body)
    (pkg / "elsewhere.py").write_text('"""A module."""\n' + body + '"""Length: not the opening docstring."""\n')
    (pkg / "short.py").write_text('"""A module."""\nx = 1\n')
    assert _long_without_reason(pkg) == {"pkg.long": MAX_LINES + 1, "pkg.elsewhere": MAX_LINES + 2}
