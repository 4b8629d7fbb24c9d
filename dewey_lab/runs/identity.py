"""A run's identity: the resolved config and the data it reads, hashed, so that skip, resume and compare
never take one run for another.

The resolved config is every value after ``base.yaml``, the stacked ``-c`` files, a sweep's variant and
the command-line overrides are merged (what ``--print_config`` prints). Only keys that say where a run
writes or how it was started are left out (``BOOKKEEPING``); everything else, a seed or a step count
included, makes another run. The corpus and teacher fingerprints join it, so a rewritten corpus file
or another teacher revision is another run too, under an unchanged config.

``run_info.json`` and every checkpoint carry the identity (``{"id", "config", "fingerprints", "scale"}``):

- ``dewey-lab sweep`` skips a variant only when a finished run of the same identity exists;
- ``--ckpt_path last`` resumes only a checkpoint of the same identity, and otherwise names the keys
  that differ;
- a sweep variant's directory is what the variant changed (``global_rope_theta=160000``); when that
  directory holds another identity (another scale, other overrides), the new run gets
  ``<variant>@<scale>``, or ``<variant>@<scale>-<id>`` when that too is taken;
- ``make compare`` reports one table per scale and one row per identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BOOKKEEPING = (
    "config",  # the -c file paths: their merged contents are the config
    "ckpt_path",  # how the run was started, not what it is
    "sweep",  # the whole study's block; the variant's own values are in the config
    "print_config",
    "trainer.logger.init_args.save_dir",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.version",
    "trainer.default_root_dir",
    "checkpoint.dirpath",
    "data.cache.dir",  # content-addressed by the teacher fingerprint: where it lives changes no vector
)


def flat_config(config: dict) -> dict[str, Any]:
    """Dotted key -> leaf value of a merged config, bookkeeping keys left out. Lists stay values. A null
    is the same as a key left out (``--print_config`` prints nulls, the parser's own dump drops them)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in BOOKKEEPING or v is None:
                continue
            if isinstance(v, dict) and v:
                walk(v, key)
            else:
                out[key] = _without_nulls(v)

    walk(config, "")
    return out


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def run_identity(config: dict, fingerprints: dict[str, str], scale: str = "base") -> dict:
    """``{"id": 12 hex digits, "config": flat config, "fingerprints": ..., "scale": ...}``; the id hashes
    the config and the fingerprints (not the scale, which is only a name for the stacked files). A
    ``trainer.precision: auto`` is hashed as what it means here (``bf16-mixed`` or ``32-true``), as the fit
    resolves it: a sweep's skip check and the fit it launches agree, and a bf16 run is not an fp32 one."""
    from dewey_lab.precision import with_resolved_precision

    flat = flat_config(with_resolved_precision(config))
    blob = json.dumps({"config": flat, "fingerprints": fingerprints}, sort_keys=True, default=str)
    return {"id": hashlib.sha256(blob.encode()).hexdigest()[:12], "config": flat,
            "fingerprints": dict(fingerprints), "scale": scale}


def differences(a: dict, b: dict) -> list[str]:
    """The config keys and fingerprints in which two identities differ, sorted."""
    keys = [k for k in sorted(set(a["config"]) | set(b["config"])) if a["config"].get(k) != b["config"].get(k)]
    fps = [f"data {k}" for k in sorted(set(a["fingerprints"]) | set(b["fingerprints"]))
           if a["fingerprints"].get(k) != b["fingerprints"].get(k)]
    return keys + fps


def describe_differences(mine: dict, other: dict | None, limit: int = 4) -> str:
    """``model.lr (0.001 here, 0.0001 there), trainer.max_steps (...)``: the first few differing keys."""
    if other is None:
        return "it was written before runs had identities"
    diff = differences(mine, other)
    if not diff:
        return "nothing"
    shown = []
    for key in diff[:limit]:
        if key.startswith("data "):
            shown.append(f"the {key.removeprefix('data ')} fingerprint")
        else:
            shown.append(f"{key} ({_short(mine['config'].get(key))} here, {_short(other['config'].get(key))} there)")
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(shown) + more


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def scale_of(files: list[str]) -> str:
    """A name for the stacked experiment files under the study (the last file): ``tiny``, ``dewey``,
    ``tiny+small``; ``base`` when the study file stands alone."""
    return "+".join(Path(f).stem for f in files[:-1]) or "base"


def data_fingerprints(config: dict) -> dict[str, str]:
    """The corpus and teacher fingerprints the run's data module will record (built from the config's
    ``data`` block, without reading the corpus or loading the teacher's weights)."""
    from dewey_lab.data.datamodule import DistillDataModule

    dm = DistillDataModule.from_config(config)
    out = {"corpus": f"{type(dm.corpus).__name__}:{dm.corpus.fingerprint()}", "teacher": dm.teacher.fingerprint}
    start = ((config.get("model") or {}).get("init_from"))
    if start:  # the start's own identity and step: another start checkpoint is another run
        from dewey_lab.runs.checkpoint import peek_checkpoint, start_checkpoint

        saved = peek_checkpoint(start_checkpoint(start))
        out["init_from"] = f"{(saved.get('dewey_run') or {}).get('id', 'unrecorded')}@step{saved.get('global_step')}"
    return out


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_identity(path: str | Path) -> dict | None:
    """The identity a checkpoint was written with (None for one written before identities), read
    without loading its tensors (a memory map)."""
    from dewey_lab.runs.checkpoint import peek_checkpoint

    return peek_checkpoint(path).get("dewey_run")


def run_checkpoints(root: Path, identity: dict) -> tuple[Path | None, list[tuple[Path, dict | None]]]:
    """``root/*/checkpoints/last.ckpt`` newest first: the newest of this identity (or None), and the
    others before it with their identities."""
    found = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    others = []
    for ckpt in found:
        theirs = checkpoint_identity(ckpt)
        if theirs is not None and theirs.get("id") == identity["id"]:
            return ckpt, others
        others.append((ckpt, theirs))
    return None, others


def finished_run(root: Path, identity: dict) -> Path | None:
    """A finished run of this identity among ``root``'s run directories (``runs/<study>/*``)."""
    for run_dir in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        info = read_run_info(run_dir)
        if info.get("finished") and (info.get("identity") or {}).get("id") == identity["id"]:
            return run_dir
    return None


def version_for(root: Path, name: str, identity: dict) -> str:
    """The run directory name for a sweep variant: ``name``, unless a run of another identity holds it;
    then ``name@scale``, then ``name@scale-id``."""
    for candidate in (name, f"{name}@{identity['scale']}", f"{name}@{identity['scale']}-{identity['id'][:8]}"):
        info = read_run_info(Path(root) / candidate)
        if not info or (info.get("identity") or {}).get("id") == identity["id"]:
            return candidate
    return f"{name}@{identity['scale']}-{identity['id']}"
