"""Which precision the matrix maths runs in: bf16 where the hardware has bf16 matrix units, fp32 elsewhere.

One rule for training (``trainer.precision: auto``), evaluation (``dewey-lab eval --dtype auto``) and the
teacher fill (``data.teacher.init_args.dtype: auto``):

* a CUDA device with bf16 (Ampere and later): bf16;
* a CPU with bf16 matrix units (Intel AMX-BF16, or AVX-512 BF16: Cooper Lake, Sapphire Rapids and later,
  AMD Zen 4 and later): bf16 autocast. On this project's 2-core Xeon (AMX) a 2048 x 2048 matmul runs ~7x
  its fp32 speed (REFERENCE.md, "This machine's CPU");
* anything else: fp32 (``32-true``).

In training, ``bf16-mixed`` is Lightning's autocast: parameters (the fp32 masters), gradients and the
optimizer state stay fp32, and ``DistillModule`` computes its losses in fp32 outside autocast. How close a
bf16 run stays to an fp32 one is measured in ``tests/test_precision.py``.

A resolved run config says ``bf16-mixed`` or ``32-true``, never ``auto``: a run's identity
(``dewey_lab.runs.identity``) hashes what ran, so a bf16 and an fp32 run of the same file are two runs.
``DEWEY_PRECISION=32-true`` (or ``bf16-mixed``) overrides the rule wherever ``auto`` is resolved; the
test suite runs in fp32 that way (``tests/conftest.py``), its exactness checks being fp32 checks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (``/proc/cpuinfo`` names, as torch reports them) of bf16 matrix units."""
ENV = "DEWEY_PRECISION"
ALIASES = {"32-true": "32-true", "32": "32-true", "fp32": "32-true", "float32": "32-true",
           "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "bfloat16": "bf16-mixed"}
Precision = Literal["bf16-mixed", "32-true"]


def cpu_bf16_units() -> tuple[str, ...]:
    """The bf16 matrix-unit flags this CPU has (``amx_bf16``, ``avx512_bf16``); () for none. Read from torch's
    own CPU probe (the one its oneDNN kernels dispatch on), else from ``/proc/cpuinfo``."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    try:
        caps = probe() if probe is not None else None
    except RuntimeError:
        caps = None
    if isinstance(caps, dict):  # torch >= 2.7: {"amx_bf16": True, "avx512_bf16": True, ...}
        return tuple(f for f in BF16_CPU_FLAGS if caps.get(f))
    try:
        flags = set(" ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("flags")).split())
    except OSError:
        return ()
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def choose(device: str = "cpu") -> tuple[Precision, str]:
    """(precision, why) for a device type (``cpu``, ``cuda``, ...): the rule above."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in ALIASES:
            raise ValueError(f"{ENV}={forced} is not a precision; use 32-true or bf16-mixed")
        return ALIASES[forced], f"{ENV}={forced}"
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA device {torch.cuda.get_device_name()} has bf16"
        return "32-true", "this CUDA device has no bf16"
    if device != "cpu":
        return "32-true", f"no bf16 rule for {device}"
    units = cpu_bf16_units()
    if units:
        return "bf16-mixed", f"the CPU has bf16 matrix units: {', '.join(units)}"
    capability = torch.backends.cpu.get_cpu_capability()
    return "32-true", f"the CPU has no bf16 matrix units (amx_bf16, avx512_bf16; torch's capability: {capability})"


def auto_precision(device: str | torch.device = "cpu", *, what: str = "training", quiet: bool = False) -> Precision:
    """The precision ``auto`` means on ``device``, with one log line saying which and why (not when ``quiet``)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    precision, why = choose(kind)
    if not quiet:
        log.info("precision: %s for %s on %s (%s)", precision, what, kind, why)
    return precision


def auto_bf16(device: str | torch.device = "cpu", *, what: str = "evaluation", quiet: bool = False) -> bool:
    """Whether ``dtype: auto`` computes in bf16 on ``device`` (evaluation, the teacher fill)."""
    return auto_precision(device, what=what, quiet=quiet) == "bf16-mixed"


def training_device(accelerator: Any = "auto") -> str:
    """The device type a Trainer with ``accelerator`` trains on (Lightning's ``auto``: CUDA when present)."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if name in ("auto", "cpu") else name


def resolve_trainer_precision(config, quiet: bool = False) -> None:
    """``trainer.precision: auto`` -> ``bf16-mixed`` or ``32-true`` in place (a parsed Namespace or a dict),
    before the Trainer is built and before the run's identity is hashed; anything else is left alone."""
    trainer = config.get("trainer") if config is not None else None
    if trainer is None or trainer.get("precision") != "auto":
        return
    trainer["precision"] = auto_precision(training_device(trainer.get("accelerator")), quiet=quiet)


def with_resolved_precision(config: dict) -> dict:
    """``config`` with ``trainer.precision: auto`` resolved (a shallow copy; ``config`` itself unchanged)."""
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or trainer.get("precision") != "auto":
        return config
    out = {**config, "trainer": dict(trainer)}
    resolve_trainer_precision(out, quiet=True)
    return out


PRECISION_HELP = ("; auto: bf16-mixed where the hardware has bf16 matrix units (CUDA with bf16; a CPU with "
                  "AMX-BF16 or AVX-512 BF16), else 32-true (dewey_lab/precision.py)")


def allow_auto(parser) -> None:
    """Let the fit parser take ``trainer.precision: auto`` (Lightning's type lists only concrete precisions);
    ``resolve_trainer_precision`` replaces it before the Trainer sees it."""
    for action in parser._actions:
        if getattr(action, "dest", None) == "trainer.precision" and hasattr(action, "_typehint"):
            action._typehint = Literal["auto"] | action._typehint
            action.help = (action.help or "") + PRECISION_HELP
            return
