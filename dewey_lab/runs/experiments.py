"""Experiment files: ``experiments/base.yaml`` under every ``-c`` file, each checked before the parser sees it,
their maps of named classes merged file by file, and where their runs land.

Light on purpose (the standard library and yaml, imported when called): ``dewey_lab.cli`` reads these before it
knows whether a command needs Lightning at all.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "experiments" / "base.yaml"

# Maps of named classes that stacked experiment files extend entry by entry. jsonargparse replaces a
# dict-valued key as a whole when a later file sets it, so an ablation file adding a loss term would
# drop the others; for these keys the files' maps are merged here instead (a later file adds an entry
# or changes an entry's init_args; a loss term is switched off by its weight, 0) and passed after the
# last -c file.
STACKED_MAPS = ("model.losses",)


def stack_maps(argv: list[str]) -> list[str]:
    """``argv`` plus ``--<key>=<merged map>`` for each stacked map that two or more config files set."""
    import yaml

    from dewey_lab.runs.sweep import config_files

    files = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    files += config_files(argv)
    last = max((i + 1 for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")), default=0)
    extra = []
    for key in STACKED_MAPS:
        if any(a.startswith(f"--{key}=") for a in argv):
            continue  # already merged (or given whole on the command line)
        merged, setters = {}, 0
        for f in files:
            node = yaml.safe_load(Path(f).read_text()) or {}
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                continue
            if not isinstance(node, dict):
                raise ValueError(f"{f}: {key} must map names to classes, e.g. {key}: {{cosine: {{class_path: ...}}}}")  # noqa: TRY004 (bad input: one line)
            setters += 1
            for name, entry in node.items():
                old = merged.get(name)
                if isinstance(old, dict) and isinstance(entry, dict) and entry.get("class_path") in (
                        None, old.get("class_path")):
                    merged[name] = {**old, "init_args": {**(old.get("init_args") or {}), **(entry.get("init_args") or {})}}
                else:
                    merged[name] = entry
        if setters > 1:
            extra.append(f"--{key}={json.dumps(merged)}")
    return [*argv[:last + 1], *extra, *argv[last + 1:]] if extra else list(argv)


def check_config_files(argv: list[str]) -> None:
    """Fail on a missing or malformed experiment file before the parser buries it in usage text."""
    import yaml

    for flag, value in itertools.pairwise(argv):
        if flag not in ("-c", "--config"):
            continue
        path = Path(value)
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
            raise FileNotFoundError(f"experiment file {path} not found; experiments here: {known}")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path} is not valid YAML ({getattr(err, 'problem', err)}{where}); fix its syntax") from None


def run_root(config: dict, experiment: str) -> Path | None:
    """``<save_dir>/<name>``: where a config's TensorBoard runs land (None without a logger)."""
    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, dict):
        return None
    init = logger.get("init_args") or {}
    name = init.get("name")
    return Path(init.get("save_dir") or "runs") / (experiment if name in (None, "", "auto") else str(name))
