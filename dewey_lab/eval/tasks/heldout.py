"""Evaluation-only text: the docstrings of installed packages that no training corpus reads.

``EVAL_PACKAGES`` (``dewey_lab.data.reserved``) names them. The offline training corpus renders the
standard library's pages and, with ``packages``, other installed packages' (``PydocCorpus``); it
refuses these by name and drops any page sharing a 50-token run with their text
(``dewey_lab.data.decontaminate``): the split is by package, never by page, so no ``val_fraction``
of a training config can let one of their documents into training. Every evaluation task that needs text no student saw
reads it from here: the needle haystack (``default_haystack``), ``deep/heldout`` and the
``semantic/...`` tasks.

Rules (deterministic given the installed package versions, which ``package_versions`` reports and
every task records in its ``meta``):

- One document per module: the ``*.py`` files under the package's directory in sorted path
  order, read with ``ast`` from the source (nothing is imported, so no import side effects and no
  docstrings rewritten at import time). Skipped: test code (a path part ``tests`` or ``testing``,
  a file ``test_*.py`` or ``conftest.py``) and private modules (a path part starting with ``_``,
  except ``__init__.py``). The id is the dotted module name (``networkx.algorithms.core``; a
  package's ``__init__.py`` is the package).
- Its text: the module docstring, then each public (no leading ``_``) top-level function's and
  class's docstring in source order, a class followed by its public methods' (and
  ``__init__``'s), each as ``ast.get_docstring`` gives it (``inspect.cleandoc``), joined by blank
  lines. No signatures, names or other rendering: pydoc's boilerplate ("Data descriptors defined
  here:") is training text. Lines made only of reST adornment characters (``= - ~ * ^ # + _`` and
  spaces, at least three; heading underlines such as numpydoc's ``----------``, table borders)
  are dropped: they carry no words, and a run of 50 ``=`` tokens was the only 50-token span this
  text shared with the pydoc pages. A module with no text is skipped.
- Its summary (``HeldoutDoc.summary``): the first sentence of the module docstring's first
  paragraph that is not a heading (a paragraph with an adornment line), in one line: the
  paragraph's words up to the first ``.``, ``!`` or ``?`` that ends the paragraph or is followed by
  a capital letter (``e.g. for`` does not end it). ``HeldoutDoc.body`` is the text with that
  sentence taken out (the rest of its paragraph stays, on one line). None when the docstring has
  no such paragraph or it starts with ``>>>``.

Measured on networkx 3.6.1 (CPython 3.11.7; all-MiniLM-L6-v2 tokens, no special tokens; ~0.5 s to
read, ~0.6 s to tokenize on 2 busy CPUs): 287 module files give 269 documents (246 with a module
docstring, 242 with a summary, median 7 words), 500,575 tokens; per document median 1,203,
10 / 25 / 75 / 90 %: 308 / 545 / 2,165 / 4,485, max 13,570 (``networkx.classes.graph``); 149 of
them 1,024 tokens or longer, 6 longer than 8,192. No 50-token span of it occurs in the pydoc
corpus (``tests/test_heldout.py``).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dewey_lab.data.reserved import EVAL_PACKAGES

# EVAL_PACKAGES (networkx: a torch dependency, so in every environment that runs dewey_lab, with ~270 modules of
# numpy-style docstrings, one-line summaries included) is defined beside the training corpus that must exclude it.

_ADORNMENT = re.compile(r"[ \t]*[=\-~*^#+_]{3,}[=\-~*^#+_ \t]*")  # a whole line of reST adornment
_SENTENCE_END = re.compile(r"[.!?](?=$|\s+[A-Z])")  # "e.g. for" goes on; "... graphs. Finds" ends
_DEFAULT_TEXTS: list[str] = []  # what default_haystack returned, to label needle tasks built on it


@dataclass(frozen=True)
class HeldoutDoc:
    """One module of an evaluation-only package."""

    doc_id: str  # dotted module name, e.g. networkx.algorithms.flow.dinitz_alg
    package: str  # the EVAL_PACKAGES entry it comes from
    text: str  # module docstring + public docstrings, in source order, adornment lines dropped
    summary: str | None  # the module docstring's first sentence, one line (rules in the module docstring)
    body: str  # ``text`` without the summary sentence (``text`` itself when there is none)

    @property
    def family(self) -> str:
        """The module's first three name parts (``networkx.algorithms.flow``): modules of one family
        share a subject; the concat task lays only documents of other families beside an answer."""
        return ".".join(self.doc_id.split(".")[:3])


def package_versions(packages: tuple[str, ...] = EVAL_PACKAGES) -> dict[str, str]:
    """{package: installed version}, what a task read (its ``meta["packages"]``)."""
    return {p: importlib.metadata.version(p) for p in packages}


@functools.cache
def heldout_documents(packages: tuple[str, ...] = EVAL_PACKAGES) -> dict[str, HeldoutDoc]:
    """Every document of ``packages`` (rules in the module docstring), by id, in package then path
    order; memoized (the result is shared: do not change it)."""
    docs: dict[str, HeldoutDoc] = {}
    for package in packages:
        for path, name in _modules(package):
            tree = ast.parse(path.read_bytes(), filename=str(path))
            module_doc = ast.get_docstring(tree, clean=True) or ""
            summary, rest = _split_summary(module_doc)
            pieces = [_docstring(node) for node in _public(tree.body)]
            text = _join([module_doc, *pieces])
            if text:
                body = _join([rest, *pieces]) if summary else text
                docs[name] = HeldoutDoc(name, package, text, summary, body)
    return docs


def heldout_texts(packages: tuple[str, ...] = EVAL_PACKAGES) -> dict[str, str]:
    """{doc_id: text} of ``heldout_documents``."""
    return {doc_id: doc.text for doc_id, doc in heldout_documents(packages).items()}


@functools.cache
def default_haystack(packages: tuple[str, ...] = EVAL_PACKAGES) -> str:
    """The offline needle haystack: every evaluation-only document, joined by blank lines (~500k
    MiniLM tokens for networkx 3.6.1), memoized. Text no student trained on, so a needle is found
    by reading, not by remembering the pages around it."""
    text = "\n\n".join(heldout_texts(packages).values())
    _DEFAULT_TEXTS.append(text)  # so that passing default_haystack() explicitly is still labelled heldout
    return text


def is_default_haystack(haystack: str | None) -> bool:
    """True for None and for a text ``default_haystack`` returned (identity: an equal text read by
    other means is still the caller's own choice)."""
    return haystack is None or any(haystack is text for text in _DEFAULT_TEXTS)


def read_haystack(path: str) -> str:
    """A needle haystack from a text file, or the ``text`` fields of a jsonl file, joined."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"haystack file {path} does not exist; give a .txt or .jsonl file, or omit "
                                f"--haystack for the offline evaluation-only text ({', '.join(EVAL_PACKAGES)})")
    if p.suffix == ".jsonl":
        return "\n\n".join(json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip())
    return p.read_text()


def _modules(package: str) -> list[tuple[Path, str]]:
    """(file, dotted name) of the package's public, non-test modules, in sorted path order."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"evaluation-only text: package {package!r} is not installed; pip install {package} "
                         "(a dewey-lab dependency)")
    root = Path(next(iter(spec.submodule_search_locations)))
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        if any(p in ("tests", "testing") or (p.startswith("_") and p != "__init__") for p in parts):
            continue
        if parts[-1].startswith("test_") or parts[-1] == "conftest":
            continue
        out.append((path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)))
    return out


def _public(body: list[ast.stmt]) -> list[ast.AST]:
    """Public top-level functions and classes in source order, each class followed by its public
    methods and ``__init__``."""
    out: list[ast.AST] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            out.append(node)
            if isinstance(node, ast.ClassDef):
                out += [m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                        and (not m.name.startswith("_") or m.name == "__init__")]
    return out


def _docstring(node: ast.AST) -> str:
    return ast.get_docstring(node, clean=True) or ""  # type: ignore[arg-type]


def _join(pieces: list[str]) -> str:
    """Non-empty pieces without their adornment lines, joined by blank lines."""
    kept = ("\n".join(line for line in piece.split("\n") if not _ADORNMENT.fullmatch(line)).strip()
            for piece in pieces)
    return "\n\n".join(p for p in kept if p)


def _split_summary(doc: str) -> tuple[str | None, str]:
    """(summary sentence in one line, the docstring without it); (None, doc) when there is none."""
    lines = doc.split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        if any(_ADORNMENT.fullmatch(line) for line in lines[i:j]):  # a heading or a table: not prose
            i = j
            continue
        words = " ".join(lines[i:j]).split()
        if words[0].startswith(">>>"):
            return None, doc
        text = " ".join(words)
        end = _SENTENCE_END.search(text)
        summary = text[:end.end()] if end else text
        rest = " ".join(words[len(summary.split()):])
        return summary, "\n".join([*lines[:i], *([rest] if rest else []), *lines[j:]]).strip()
    return None, doc
