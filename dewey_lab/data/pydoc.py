"""The offline corpus: the plain-text ``pydoc`` pages of the public standard-library modules, and
(``packages``) of the installed packages' modules.

``PydocCorpus`` needs no download. Measured on CPython 3.11.7 / Linux with the default module
list (211 names; the 5 Windows-only ones fail to import and are skipped): 206 documents,
487,329 words (whitespace split), median 887, max 33,019 (``builtins``), 4.3 MB of jsonl;
building takes about 5 s (one subprocess, 2 CPUs), reading it back ~0.02 s. Two builds on the
same machine give byte-identical files.

The pages are rendered in a child process that runs this file (``runpy.run_path(__file__)``):
module imports may print or change interpreter state, and the child's environment is pinned so
the pages do not depend on the caller's.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dewey_lab.data.corpus import CorpusSource, JsonlCorpus
from dewey_lab.data.reserved import EVAL_PACKAGES
from dewey_lab.files import atomic_write

log = logging.getLogger(__name__)

_PROJECT = Path(__file__).resolve().parents[2]  # the repository root, shown as <project> in the pages
# The `sys` page shows sys.argv, that is this renderer's path. Pinned to where the renderer first lived, so
# the corpus (and every teacher-cache key of its windows) does not change when the file moves.
_PAGE_ARGV0 = str(_PROJECT / "dewey_lab" / "corpus.py")

# Import has side effects (browser, printing, GUI) or the module is CPython's own test suite.
_PYDOC_EXCLUDED = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test"})

# Installed top-level packages left out of ``packages: installed``: this project itself (its pages would change
# with every commit), packaging tools, and packages whose submodules start servers, GUIs or test sessions.
_PACKAGES_EXCLUDED = frozenset({
    "dewey_lab", "tests", "benchmarks", "pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel",
    "distutils", "IPython", "tensorboard", "tensorboard_data_server", "pytest", "_pytest", "py", "xdist",
    "pytest_xdist", "execnet", "ruff", "pluggy", "iniconfig", "nvidia", "triton"})
_SKIPPED_PARTS = frozenset({"tests", "test", "testing", "conftest", "benchmarks", "examples", "__main__"})
# Modules whose page pydoc cannot render in reasonable time: ``transformers.models`` lists every model's namespace
# (still unfinished after 10 min on 2 cores). Neither rendered nor walked into.
_MODULES_EXCLUDED = frozenset({"transformers.models"})
MAX_PAGE_CHARS = 200_000
"""A package page longer than this is cut here (a top-level namespace such as ``torch`` renders megabytes);
training reads at most a few 2k-token windows of a page anyway. Standard-library pages are kept whole."""


def installed_packages() -> list[str]:
    """Top-level import names of the installed distributions, sorted, less the standard library, the
    evaluation-only ``EVAL_PACKAGES`` and the excluded tools (``_PACKAGES_EXCLUDED``)."""
    from importlib.metadata import packages_distributions

    skip = set(EVAL_PACKAGES) | _PACKAGES_EXCLUDED | set(sys.stdlib_module_names)
    return sorted(n for n in packages_distributions() if n.isidentifier() and not n.startswith("_")
                  and n not in skip)


def default_pydoc_modules() -> list[str]:
    """Public top-level stdlib modules, sorted; those that fail to import are dropped at build time."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _PYDOC_EXCLUDED)


class PydocCorpus(CorpusSource):
    """Plain-text pydoc pages of standard-library modules, cached as jsonl (``id``, ``text``).

    The first use renders the pages in a subprocess (module imports may print or mutate
    interpreter state) and writes ``cache_path`` atomically; later uses just read it.
    The cache is keyed by path only: delete it to rebuild after changing ``modules``.

    With ``packages``, the pages of installed packages' public modules follow the standard library's:
    each package's modules found by walking its directories (no name part starting with ``_``, no
    test or example modules), the shallowest first, at most ``max_modules_per_package`` of them, each
    page cut at ``MAX_PAGE_CHARS``. A document's id is the module's dotted name, so
    ``data.windows.val_by: package`` holds out whole packages. ``EVAL_PACKAGES`` are refused, and any
    page sharing a 50-token span with their text is dropped at build time
    (``dewey_lab.data.decontaminate``).

    Args:
        cache_path: Where the rendered corpus is stored (relative to the working directory); default
            ``data/pydoc_corpus.jsonl``, or ``data/pydoc_packages_corpus.jsonl`` with ``packages``.
        modules: Standard-library modules to render; ``None`` means all public stdlib modules.
        packages: ``installed`` (every installed package, ``installed_packages()``), a list of
            top-level package names, or ``None`` (the standard library only).
        max_modules_per_package: Cap on the modules rendered per package.
        limit: Maximum number of kept documents.
    """

    def __init__(
        self,
        cache_path: str | None = None,
        modules: list[str] | None = None,
        packages: str | list[str] | None = None,
        max_modules_per_package: int = 60,
        limit: int | None = None,
    ) -> None:
        super().__init__(limit)
        bad = sorted(m for m in modules or [] if m.split(".")[0] in _PYDOC_EXCLUDED)
        if bad:
            raise ValueError(
                f"PydocCorpus cannot render {bad}: importing them has side effects or needs a GUI"
            )
        if isinstance(packages, str) and packages != "installed":
            raise ValueError(f"packages must be 'installed', a list of package names or null, got {packages!r}")
        held = sorted({m.split(".")[0] for m in [*(modules or []), *(packages if isinstance(packages, list) else [])]}
                      & set(EVAL_PACKAGES))
        if held:
            raise ValueError(f"{', '.join(held)} is evaluation-only text (dewey_lab.data.reserved.EVAL_PACKAGES); "
                             "remove it from data.corpus modules/packages")
        if max_modules_per_package < 1:
            raise ValueError(f"max_modules_per_package must be >= 1, got {max_modules_per_package}")
        self.cache_path = cache_path or ("data/pydoc_corpus.jsonl" if packages is None
                                         else "data/pydoc_packages_corpus.jsonl")
        self.modules = modules
        self.packages = packages
        self.max_modules_per_package = max_modules_per_package

    def _raw(self) -> Iterator[tuple[str, str]]:
        self.ensure_built()
        wanted = set(self.modules) if self.modules is not None else None
        for doc_id, text in JsonlCorpus(self.cache_path)._raw():
            if doc_id.split(".")[0] not in sys.stdlib_module_names:  # a package's page
                if self.packages is None:
                    raise ValueError(f"{self.cache_path} holds the package page {doc_id!r} but packages is null; "
                                     "delete it or set cache_path")
            elif wanted is not None and doc_id not in wanted:
                raise ValueError(
                    f"{self.cache_path} holds module {doc_id!r}, not in modules; delete it or set cache_path"
                )
            yield doc_id, text

    def ensure_built(self) -> Path:
        path = Path(self.cache_path)
        if not path.exists():
            self._build(path)
        return path

    def _build(self, path: Path) -> None:
        modules = self.modules if self.modules is not None else default_pydoc_modules()
        packages = installed_packages() if self.packages == "installed" else list(self.packages or [])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pages.jsonl"
            # `del sys.path[0]`: the working directory must not shadow stdlib modules (`-P` is 3.11+);
            # run_path does not add the file's own directory. The request goes via stdin, not
            # argv, because pydoc of `sys` shows sys.orig_argv.
            script = str(Path(__file__).resolve())
            bootstrap = (
                f"import sys; del sys.path[0]; import runpy; runpy.run_path({script!r}, run_name='__main__')"
            )
            proc = subprocess.run(
                [sys.executable, "-s", "-c", bootstrap],
                input=json.dumps({"modules": modules, "out": str(out), "packages": packages,
                                  "max_modules_per_package": self.max_modules_per_package}),
                capture_output=True,
                text=True,
                env=_pydoc_child_env(),
                timeout=3600,
                check=False,
            )
            if proc.returncode != 0 or not out.exists():
                tail = proc.stderr.strip().splitlines()[-5:]
                raise RuntimeError(
                    f"pydoc rendering subprocess failed (exit {proc.returncode}): {' | '.join(tail)}"
                )
            records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        pages = [r for r in records if "id" in r]
        skipped = [r["skipped"] for r in records if "skipped" in r]
        dropped: list[str] = []
        if packages:  # a package page may quote evaluation-only text (a re-exported docstring): drop it
            from dewey_lab.data.decontaminate import sharing_pages

            dropped = sharing_pages({r["id"]: r["text"] for r in pages}, EVAL_PACKAGES)
            gone = set(dropped)
            pages = [r for r in pages if r["id"] not in gone]
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pages))
        log.info(
            "built %s: %d pages in %.1fs; skipped (import failed): %d %s; dropped (share a 50-token span with "
            "%s): %s",
            path,
            len(pages),
            time.perf_counter() - start,
            len(skipped),
            skipped[:20],
            ", ".join(EVAL_PACKAGES),
            dropped,
        )

    def _fingerprint_payload(self) -> dict[str, Any]:
        # Content hash (a few MB): identical rebuilds keep the fingerprint, unlike mtime.
        digest = hashlib.sha256(self.ensure_built().read_bytes()).hexdigest()
        payload = {"modules": self.modules, "limit": self.limit, "content_sha256": digest}
        if self.packages is not None:  # a stdlib-only corpus keeps the fingerprint it had before packages existed
            payload.update(packages=self.packages, max_modules_per_package=self.max_modules_per_package)
        return payload


def _pydoc_child_env() -> dict[str, str]:
    # Minimal fixed env: signatures like cgi's `environ=os.environ` would otherwise embed
    # the caller's whole environment (nondeterministic, possibly secret). A fixed hash seed
    # makes set/frozenset reprs stable; TZ/locale pin `time` and `locale` module data.
    env = {"PYTHONHASHSEED": "0", "TZ": "UTC", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PATH": os.defpath}
    for key in ("LD_LIBRARY_PATH", "SYSTEMROOT"):  # some interpreters need these to start
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _clean_pydoc(text: str, substitutions: list[tuple[str, str]]) -> str:
    """Make a page independent of addresses and install locations."""
    lines, skipping = [], False
    for line in text.splitlines():
        if line and not line[0].isspace():  # an unindented line starts a section
            skipping = line == "FILE"  # FILE is just the module's absolute path
        if not skipping:
            lines.append(line)
    text = "\n".join(lines).rstrip() + "\n"
    # ASLR makes these differ per process: `<function f at 0x7f..>`, `<PyDLL 'None', handle 7f..>`.
    text = re.sub(r" at 0x[0-9a-fA-F]+|, handle [0-9a-fA-F]+(?=>)", "", text)
    for prefix, placeholder in substitutions:
        text = text.replace(prefix, placeholder)
    return text


def _path_substitutions() -> list[tuple[str, str]]:
    named = {
        "<venv>": [sys.prefix, sys.exec_prefix],
        "<python>": [sys.base_prefix, sys.base_exec_prefix],
        "<project>": [str(_PROJECT)],
        "<home>": [str(Path.home())],
    }
    pairs = {
        (p, name) for name, paths in named.items() for raw in paths for p in (raw, os.path.realpath(raw))
    }
    # Longest first so a venv inside the project becomes <venv>, not <project>/.venv.
    return sorted(((p, n) for p, n in pairs if len(p) > 1), key=lambda pn: (-len(pn[0]), pn))


def package_modules(package: str, limit: int) -> list[str]:
    """Up to ``limit`` public module names of an importable package, the shallowest first, then by name.

    Walks the package's directories with ``pkgutil.iter_modules`` (breadth first), importing a subpackage
    only to read its ``__path__``; names with a part starting with ``_`` or in ``_SKIPPED_PARTS`` are
    skipped and not descended into. Runs in the rendering child (it imports)."""
    import importlib
    import pkgutil

    try:
        root = importlib.import_module(package)
    except (Exception, SystemExit):  # noqa: BLE001 - an unimportable package has no pages
        return []
    found, level = [package], [(package, getattr(root, "__path__", None))]
    while level and len(found) < limit:
        below = []
        for name, paths in level:
            if not paths:
                continue
            for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
                full = f"{name}.{info.name}"
                if info.name.startswith("_") or info.name in _SKIPPED_PARTS or full in _MODULES_EXCLUDED:
                    continue
                found.append(full)
                if info.ispkg:
                    below.append((full, None))
        level = [(full, _package_path(full)) for full, _ in below]
    return found[:limit]


def _package_path(name: str) -> list[str] | None:
    """A subpackage's ``__path__``, or None when it fails to import (then it is not walked)."""
    import importlib

    try:
        return getattr(importlib.import_module(name), "__path__", None)
    except (Exception, SystemExit):  # noqa: BLE001 - any failure: the subpackage is not walked
        return None


def _render_pydoc_child() -> None:
    """Subprocess entry: render the requested modules, one jsonl record each."""
    import importlib
    import pydoc
    import warnings

    request = json.load(sys.stdin)
    sys.argv[0] = _PAGE_ARGV0
    warnings.simplefilter("ignore")  # deprecated modules (cgi, imp, ...) warn on import
    substitutions = _path_substitutions()
    logging.disable(logging.CRITICAL)  # packages log on import; the pages are what is written
    with open(request["out"], "w", encoding="utf-8") as out:
        names = [(name, None) for name in request["modules"]]
        for package in request.get("packages", []):
            names += [(name, MAX_PAGE_CHARS) for name in package_modules(package, request["max_modules_per_package"])]
        for name, cut in names:
            try:
                page = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
                record = {"id": name, "text": _clean_pydoc(page, substitutions)[:cut]}
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failing module is skipped, not fatal
                record = {"skipped": name, "error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    _render_pydoc_child()
