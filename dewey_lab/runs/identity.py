"""A run's identity: the resolved config and the data it reads, hashed, so that skip, resume and compare
never take one run for another.

The resolved config is every value after ``base.yaml``, the stacked ``-c`` files, a sweep's variant and
the command-line overrides are merged (what ``--print_config`` prints). Only keys that say where a run
writes or how it was started are left out (``BOOKKEEPING``), and how long it trains (``LENGTH``:
``trainer.max_steps``, ``trainer.max_epochs``): the same run trained longer is the same run, continued.
Everything else, a seed or the warm-up included, makes another run. The corpus and teacher fingerprints
join it, so a rewritten corpus file or another teacher revision is another run too, under an unchanged
config.

``run_info.json`` and every checkpoint carry the identity (``{"id", "config", "fingerprints", "scale",
"limits"}``; ``limits``: the ``LENGTH`` values this stretch of training ran under, recorded, not hashed):

- ``dewey-lab sweep`` skips a variant only when a finished run of the same identity trained as far as
  the limits now ask (``covers``); a finished run that stopped short of them is continued from its
  ``last.ckpt`` (``--ckpt_path last``) in its own directory;
- ``--ckpt_path last`` resumes only a checkpoint of the same identity, and otherwise names the keys
  that differ; a limit below the checkpoint's step or epoch is refused (``limit_error``): a run is
  never cut short by resuming it;
- a sweep variant's directory is what the variant changed (``global_rope_theta=160000``); when that
  directory holds another identity (another scale, other overrides), the new run gets
  ``<variant>@<scale>``, or ``<variant>@<scale>-<id>`` when that too is taken; a fresh start (no
  ``--ckpt_path``, e.g. ``sweep --force``) into a directory that holds a run of its own identity moves that
  run aside to ``<directory>@replaced-<time>`` (``set_aside``), so one TensorBoard directory never holds two
  runs' events and the variant's path names its newest run;
- ``make compare`` reports one table per scale and one row per identity (its newest finished run).

Continuing a run under a larger limit is not the same training as a fresh run to that limit: the learning
rate decays linearly to 0 over ``trainer.estimated_stepping_batches``, which the new limit recomputes, so the
decay restarts from where the new total puts it. ``run_info.json`` records it (``resumed_from``: the
checkpoint, its step and the limits it was trained under).

Ids written before ``LENGTH`` was left out hashed the limits; ``identity_key`` rehashes any stored identity
from its config and fingerprints, so those runs and checkpoints still match (skip, resume, compare).
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
LENGTH = ("trainer.max_steps", "trainer.max_epochs")  # how long it trains: a run trained longer is the same run


def flat_config(config: dict) -> dict[str, Any]:
    """Dotted key -> leaf value of a merged config, bookkeeping and length keys left out. Lists stay values. A null
    is the same as a key left out (``--print_config`` prints nulls, the parser's own dump drops them)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in BOOKKEEPING or key in LENGTH or v is None:
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
    """``{"id": 12 hex digits, "config": flat config, "fingerprints": ..., "scale": ..., "limits": ...}``; the id
    hashes the config and the fingerprints (not the scale, which is only a name for the stacked files, nor the
    limits, ``training_limits``). A ``trainer.precision: auto`` is hashed as what it means here (``bf16-mixed``
    or ``32-true``), as the fit resolves it: a sweep's skip check and the fit it launches agree, and a bf16 run
    is not an fp32 one."""
    from dewey_lab.precision import with_resolved_precision

    flat = flat_config(with_resolved_precision(config))
    return {"id": _digest(flat, fingerprints), "config": flat, "fingerprints": dict(fingerprints), "scale": scale,
            "limits": training_limits(config)}


def _digest(flat: dict, fingerprints: dict) -> str:
    kept = {k: v for k, v in flat.items() if k not in LENGTH}  # identities written before LENGTH held them
    blob = json.dumps({"config": kept, "fingerprints": fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def identity_key(identity: dict | None) -> str | None:
    """The id of a stored identity under today's recipe, rehashed from its config and fingerprints (an id
    written before the limits were left out hashed them); its stored id where it kept no config."""
    if not identity:
        return None
    if "config" not in identity or "fingerprints" not in identity:
        return identity.get("id")
    return _digest(identity["config"], identity["fingerprints"])


def training_limits(config: dict) -> dict[str, int]:
    """``{"max_steps", "max_epochs"}`` of a merged config as Lightning applies them: -1 is no limit; a
    ``max_epochs`` left out is 1000 without ``max_steps``, else no limit (``Trainer``'s defaults)."""
    trainer = config.get("trainer") or {}
    steps = trainer.get("max_steps")
    steps = -1 if steps is None else int(steps)
    epochs = trainer.get("max_epochs")
    epochs = (1000 if steps == -1 else -1) if epochs is None else int(epochs)
    return {"max_steps": steps, "max_epochs": epochs}


def limit_error(limits: dict, step: int, epochs: int, what: str = "the checkpoint") -> str | None:
    """One line when ``limits`` stop short of a checkpoint at ``step`` (optimizer steps) with ``epochs`` epochs
    done (Lightning's ``processed`` count, the one its stopping rule reads); None when the run can resume. A
    limit equal to what the checkpoint reached is no error: there is nothing left to train."""
    fix = "raise it, or start a new run without --ckpt_path"
    if limits["max_steps"] != -1 and limits["max_steps"] < step:
        return f"trainer.max_steps {limits['max_steps']} is below {what}'s step {step}: {fix}"
    if limits["max_epochs"] != -1 and limits["max_epochs"] < epochs:
        return f"trainer.max_epochs {limits['max_epochs']} is below {what}'s {epochs} epochs (step {step}): {fix}"
    return None


def checkpoint_progress(path: str | Path) -> tuple[int, int]:
    """(global step, epochs done) of a checkpoint, read without loading its tensors: the epochs are Lightning's
    ``epoch_progress.current.processed`` (what its ``max_epochs`` check reads), else the saved ``epoch``."""
    from dewey_lab.runs.checkpoint import peek_checkpoint

    saved = peek_checkpoint(path)
    progress = (((saved.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current") or {}
    return int(saved.get("global_step", 0)), int(progress.get("processed", saved.get("epoch", 0)))


def covers(info: dict, limits: dict) -> bool:
    """Whether a finished run (its ``run_info.json``) trained as far as ``limits`` ask: Lightning's stopping rule
    (``global_step >= max_steps`` or epochs ``>= max_epochs``) holds at the run's end, ``epochs`` counting whole
    epochs (``RunInfo``). A record written before it kept its epochs is judged by the limits it ran under: covered
    when none is larger now."""
    step, epochs = info.get("global_step"), info.get("epochs")
    if limits["max_steps"] != -1 and step is not None and step >= limits["max_steps"]:
        return True
    if epochs is not None:
        return limits["max_epochs"] != -1 and epochs >= limits["max_epochs"]
    ident = info.get("identity") or {}
    old = ident.get("limits") or training_limits({"trainer": {k.split(".", 1)[1]: ident.get("config", {}).get(k)
                                                              for k in LENGTH}})
    return all(_at_most(limits[k], old[k]) for k in ("max_steps", "max_epochs"))


def _at_most(new: int, old: int) -> bool:
    """A limit no larger than another (-1: none)."""
    return old == -1 or (new != -1 and new <= old)


def differences(a: dict, b: dict) -> list[str]:
    """The config keys and fingerprints in which two identities differ, sorted (the limits are no difference)."""
    keys = [k for k in sorted(set(a["config"]) | set(b["config"]))
            if k not in LENGTH and a["config"].get(k) != b["config"].get(k)]
    fps = [f"data {k}" for k in sorted(set(a["fingerprints"]) | set(b["fingerprints"]))
           if a["fingerprints"].get(k) != b["fingerprints"].get(k)]
    return keys + fps


def describe_differences(mine: dict, other: dict | None, limit: int = 4) -> str:
    """``model.lr (0.001 here, 0.0001 there), model.warmup_steps (...)``: the first few differing keys."""
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
        if theirs is not None and identity_key(theirs) == identity_key(identity):
            return ckpt, others
        others.append((ckpt, theirs))
    return None, others


def finished_run(root: Path, identity: dict) -> Path | None:
    """The newest finished run of this identity among ``root``'s run directories (``runs/<study>/*``): latest
    ``started``, then the latest ``run_info.json`` write (two runs started within one second)."""
    found = []
    for run_dir in (p for p in Path(root).glob("*") if p.is_dir()):
        info = read_run_info(run_dir)
        if info.get("finished") and identity_key(info.get("identity")) == identity_key(identity):
            found.append((info.get("started", ""), (run_dir / "run_info.json").stat().st_mtime_ns, run_dir))
    return max(found)[2] if found else None


def version_for(root: Path, name: str, identity: dict) -> str:
    """The run directory name for a sweep variant: ``name``, unless a run of another identity holds it;
    then ``name@scale``, then ``name@scale-id``."""
    mine = identity_key(identity)
    for candidate in (name, f"{name}@{identity['scale']}", f"{name}@{identity['scale']}-{mine[:8]}"):
        info = read_run_info(Path(root) / candidate)
        if not info or identity_key(info.get("identity")) == mine:
            return candidate
    return f"{name}@{identity['scale']}-{mine}"


REPLACED = "@replaced-"  # a run moved aside by a fresh start of its identity: <directory>@replaced-<UTC time>


def set_aside(run_dir: Path) -> Path | None:
    """Move a run directory that holds anything to ``<run_dir>@replaced-<UTC time>``, so a fresh start of the
    same identity writes a directory of its own (TensorBoard would otherwise read two runs' events as one);
    returns where it went, None when there was nothing to move. ``make compare`` still counts it as a run of
    its identity (the newest finished one is reported)."""
    from datetime import datetime, timezone

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = run_dir.with_name(f"{run_dir.name}{REPLACED}{stamp}")
    run_dir.rename(target)
    return target
