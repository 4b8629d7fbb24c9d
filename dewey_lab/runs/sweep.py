"""Sweeps: an experiment file's ``sweep:`` block (dotted key -> list of values) as variants.

    sweep:
      model.student.global_rope_theta: [160000, 10000000, 73780400]

Several keys sweep their product, in file order. A key whose value is a map instead of a list is a
*named axis*: each name stands for a set of overrides applied together (the product is taken over
axes), for choices that move several keys at once:

    sweep:
      loss:
        cosine_only: {model.losses.cosine.init_args.weight: 10.0, model.losses.similarity.init_args.weight: 0.0}
        jasper:      {model.losses.cosine.init_args.weight: 10.0, model.losses.similarity.init_args.weight: 200.0}

names the runs ``loss=cosine_only`` and ``loss=jasper``. Variant k becomes ordinary command-line overrides
(``--model.student.global_rope_theta=160000``) plus a TensorBoard version named by what it changed
(``runs/theta_ablation/global_rope_theta=160000/``), so every value is type-checked by the same
parser as a hand-written run. ``dewey-lab fit -c <study>.yaml`` runs variant 0 (``--sweep_index k``
another); ``dewey-lab sweep -c <study>.yaml`` runs them all, skipping those with a finished run of the
same identity (``dewey_lab.runs.identity``; ``--force`` reruns), or prints one command per variant (``--print``).
"""

from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path

import yaml


def sweep_block(files: list[str]) -> dict[str, list | dict]:
    """The ``sweep:`` block of the last experiment file that has one ({} when none)."""
    block: dict = {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        if "sweep" in data:
            block = data["sweep"] or {}
    for key, values in block.items():
        if isinstance(values, dict):
            if not values or not all(isinstance(v, dict) and v for v in values.values()):
                raise ValueError(f"sweep: {key} names its variants, each a map of overrides, "
                                 f"e.g. {key}: {{small: {{model.lr: 0.001}}}}")
        elif not isinstance(values, list) or not values:
            raise ValueError(f"sweep: {key} must list its values, e.g. {key}: [1, 2]")
    return block


def variants(block: dict[str, list | dict]) -> list[tuple[str, dict]]:
    """Every combination as (run name, {dotted key: value}), in file order."""
    axes = []
    for key, values in block.items():
        if isinstance(values, dict):  # named axis: name -> overrides applied together
            axes.append([(f"{key}={name}", dict(overrides)) for name, overrides in values.items()])
        else:
            axes.append([(f"{key.rsplit('.', 1)[-1]}={_plain(v)}", {key: v}) for v in values])
    return [(",".join(name for name, _ in combo) or "default", {k: v for _, o in combo for k, v in o.items()})
            for combo in itertools.product(*axes)]


def override_args(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, dict | list | bool) or v is None else v}"
            for k, v in overrides.items()]


def check_keys(keys, config: dict) -> None:
    """Every swept key must exist in the merged config; else one line naming the nearest valid key.

    A key below a list (``trainer.callbacks.init_args.pooling``) is accepted: the parser applies it
    to the list's last element and type-checks it there.
    """
    flat = dict(_flatten(config))
    known = list(flat)
    lists = [k for k, v in flat.items() if isinstance(v, list)]
    for key in keys:
        if key in flat or any(k.startswith(key + ".") for k in known) or any(key.startswith(k + ".") for k in lists):
            continue
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else "; dewey-lab fit --print_config lists the keys"
        raise ValueError(f"sweep key {key} is not a config key{hint}")


def _flatten(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
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
    check_keys({key for _, overrides in vs for key in overrides}, merged_config(argv))
    return variant_args(argv, block, k)


def variant_args(argv: list[str], block: dict, k: int) -> list[str]:
    """``argv`` plus variant k's overrides and its run directory name (the TensorBoard version)."""
    name, overrides = variants(block)[k]
    return [*argv, *override_args(overrides), f"--trainer.logger.init_args.version={name}"]
