"""Sweeps: an experiment file's ``sweep:`` block (dotted key -> list of values) as variants.

    sweep:
      model.student.global_rope_theta: [160000, 10000000, 73780400]

Several keys sweep their product, in file order. Variant k becomes ordinary command-line overrides
(``--model.student.global_rope_theta=160000``) plus a TensorBoard version named by what it changed
(``runs/theta_ablation/global_rope_theta=160000/``), so every value is type-checked by the same
parser as a hand-written run. ``dewey-lab fit -c <study>.yaml`` runs variant 0 (``--sweep_index k``
another); ``dewey-lab sweep -c <study>.yaml`` runs them all, skipping those whose ``run_info.json``
says they finished (``--force`` reruns), or prints one command per variant (``--print``).
"""

from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path

import yaml


def sweep_block(files: list[str]) -> dict[str, list]:
    """The ``sweep:`` block of the last experiment file that has one ({} when none)."""
    block: dict = {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        if "sweep" in data:
            block = data["sweep"] or {}
    for key, values in block.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep: {key} must list its values, e.g. {key}: [1, 2]")
    return block


def variants(block: dict[str, list]) -> list[dict]:
    """Every combination, as {dotted key: value}, in file order."""
    keys = list(block)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(block[k] for k in keys))]


def variant_name(overrides: dict) -> str:
    """``global_rope_theta=160000,weight=0``: the last part of each key and its value."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={_plain(v)}" for k, v in overrides.items()) or "default"


def override_args(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, dict | list | bool) or v is None else v}"
            for k, v in overrides.items()]


def check_keys(block: dict, config: dict) -> None:
    """Every swept key must exist in the merged config; else one line naming the nearest valid key."""
    known = list(_flatten(config))
    for key in block:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else "; dewey-lab fit --print_config lists the keys"
            raise ValueError(f"sweep key {key} is not a config key{hint}")


def _flatten(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _flatten(v, key)


def _plain(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, dict | list) else str(v)


def config_files(argv: list[str]) -> list[str]:
    return [v for f, v in itertools.pairwise(argv) if f in ("-c", "--config")]


def pop_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """argv without ``--name value`` / ``--name=value``, and that value."""
    out, value, skip = [], None, False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == name and i + 1 < len(argv):
            value, skip = argv[i + 1], True
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, value


def apply_sweep(argv: list[str], merged_config) -> list[str]:
    """``fit`` arguments for one variant of the study named in ``argv`` (unchanged without a sweep)."""
    argv, index = pop_option(argv, "--sweep_index")
    block = sweep_block(config_files(argv))
    if not block:
        if index is not None:
            raise ValueError("--sweep_index needs an experiment file with a sweep: block")
        return argv
    vs = variants(block)
    k = int(index or 0)
    if not 0 <= k < len(vs):
        raise ValueError(f"--sweep_index {k} is out of range: this sweep has {len(vs)} variants (0..{len(vs) - 1})")
    check_keys(block, merged_config(argv))
    return [*argv, *override_args(vs[k]), f"--trainer.logger.init_args.version={variant_name(vs[k])}"]


def finished(study: str, name: str, save_dir: str = "runs") -> bool:
    info = Path(save_dir) / study / name / "run_info.json"
    return info.exists() and json.loads(info.read_text()).get("finished", False)
