"""Command line: ``dewey-lab fit -c experiments/<name>.yaml`` (``lightning fit ...`` is an alias),
``dewey-lab eval --model ... --tasks ...`` (``dewey_lab.eval.run``), and the rest ``dewey-lab --help`` lists.

``fit``, ``validate``, ``test`` and ``predict`` are a LightningCLI (``dewey_lab.runs.lightning_cli``) with
``experiments/base.yaml`` loaded implicitly under every experiment file and the ``omegaconf+`` parser mode, so an
experiment file holds only the keys it changes; the TensorBoard run lands in ``runs/<experiment>/`` where
``<experiment>`` is the last ``-c`` file's stem.

This module imports no torch, Lightning or transformers: each command imports what it needs when it runs, so
``dewey-lab --help`` and ``dewey-lab eval --help`` answer at once (``tests/test_startup.py``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from jsonargparse import ArgumentError

from dewey_lab.runs.experiments import BASE_CONFIG, REPO, check_config_files, stack_maps  # noqa: F401 (REPO: importers)

# every command, as ``dewey-lab --help`` lists it; the first four are Lightning's own
COMMANDS = {
    "fit": "train a student: dewey-lab fit -c experiments/<name>.yaml [-c <more>.yaml] [--key value]",
    "validate": "one pass over the validation data (--ckpt_path <run's checkpoint>)",
    "test": "one pass over the test data",
    "predict": "the model's outputs over the predict data",
    "sweep": "every variant of a study's sweep: block, each its own fit (--print lists them, --force reruns)",
    "fill": "fill the teacher cache for an experiment's data, no student or trainer (--data.cache.fill_shard k/N)",
    "eval": "LongEmbed / LoCo / passkey / needle scores of any model or BM25: dewey-lab eval --model ... --tasks ...",
    "export": "a training checkpoint -> a sentence-transformers directory: dewey-lab export --ckpt ... --out ...",
    "cache": "stats, verify, gc or merge of a teacher cache directory: dewey-lab cache stats DIR",
}


def usage() -> str:
    """The top-level help: every command in a line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return ("usage: dewey-lab <command> [options]    (lightning <command> is an alias)\n\n"
            "Long-context text embeddings by chunk-alignment distillation (the Dewey recipe).\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\ndewey-lab <command> --help lists a command's options (fit --help: every config key, its type "
              "and its doc).\n")


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DEWEY_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):  # no command yet: the list of them, nothing imported
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command = list(argv)  # as typed (before a sweep variant's overrides are spelled out): the resume hint's
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass argv on purpose
    # lightning 2.6's CombinedLoader builds torch's LeafSpec, deprecated since torch 2.13: not ours to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    defaults = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    sub_kwargs = {"default_config_files": defaults, "exit_on_error": False}
    parser_kwargs = {"parser_mode": "omegaconf+", "exit_on_error": False}
    parser_kwargs.update({sub: dict(sub_kwargs) for sub in ("fit", "validate", "test", "predict")})
    run_info = None  # the callback that records a crash inside training (the Lightning commands)
    if "--help" in argv or "-h" in argv:  # the docstring under each field of StudentConfig, WindowConfig, ... is
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # its help (slow: --help only)
    try:
        if argv[:1] == ["eval"]:  # not a Trainer command: LongEmbed / LoCo scoring of any model
            from dewey_lab.eval.run import main as eval_main

            eval_main(argv[1:])
            return
        if argv[:1] == ["export"]:  # a checkpoint -> a sentence-transformers directory
            from dewey_lab.export import main as export_main

            export_main(argv[1:])
            return
        if argv[:1] == ["cache"]:  # stats / verify / gc of a teacher cache directory
            from dewey_lab.data.store.cli import main as cache_main

            cache_main(argv[1:])
            return
        if not argv[0].startswith("-") and argv[0] not in COMMANDS:
            raise ValueError(f"unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)} "
                             "(dewey-lab --help says what each does)")
        if argv[:1] == ["fill"]:  # the teacher fill alone (a CPU/GPU job, or one of an array with --data.cache.fill_shard)
            fill(argv[1:], parser_kwargs)
            return
        if argv[:1] == ["sweep"]:  # every variant of a study, each its own run
            run_sweep(argv[1:], parser_kwargs)
            return
        check_config_files(argv)  # before Lightning is imported: a missing file is one line, at once
        from dewey_lab.callbacks import RunInfo
        from dewey_lab.data.datamodule import DistillDataModule
        from dewey_lab.model.module import DistillModule
        from dewey_lab.runs.lightning_cli import DeweyCLI, merged_config
        from dewey_lab.runs.sweep import apply_sweep

        run_info = RunInfo()
        if argv[:1] == ["fit"]:
            argv = stack_maps(["fit", *apply_sweep(argv[1:], lambda a: merged_config(["fit", *a], parser_kwargs))])
            args = argv
        DeweyCLI(DistillModule, DistillDataModule, parser_kwargs=parser_kwargs, args=None if args is None else argv,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                 trainer_defaults={"callbacks": [run_info]})  # added to whatever callbacks a config lists
    except Exception as err:
        if run_info is not None and run_info.crash is not None:  # raised inside training: not bad input, so the whole traceback
            traceback.print_exception(err)
            print(f"error: {crash_line(run_info.crash, command)}", file=sys.stderr)
            sys.exit(1)
        if os.environ.get("DEWEY_TRACEBACK") or not isinstance(err, INPUT_ERRORS) or _is_out_of_memory(err):
            raise
        line = one_line(err)
        unknown = re.search(r"does not accept option '([\w.]+)'", line)
        if unknown:  # name the nearest real key (the merged defaults know them all)
            import difflib

            from dewey_lab.runs.lightning_cli import merged_config
            from dewey_lab.runs.sweep import _flatten

            known = [k for k, _ in _flatten(merged_config(["fit"], parser_kwargs))]
            near = difflib.get_close_matches(unknown.group(1), known, n=1, cutoff=0.6)
            if near:
                line = f"unknown key {unknown.group(1)}; did you mean {near[0]}?"
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


# Raised by a config or input the user can fix (a bad key or value, a missing file or package): one line.
# Anything else, and anything raised once training has begun, keeps its traceback.
INPUT_ERRORS = (ArgumentError, FileNotFoundError, ValueError, RuntimeError, ImportError, KeyError, OSError)


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # an error raised before torch was imported is no torch OOM
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def crash_line(crash: dict, argv: list[str]) -> str:
    """After a training crash's traceback: the last good checkpoint and the command that resumes from it."""
    import shlex

    from dewey_lab.runs.sweep import pop_option

    rerun, _ = pop_option(list(argv), "--ckpt_path")
    if crash["checkpoint"] is None:
        return (f"training stopped at step {crash['step']} before its first checkpoint; fix the cause above, "
                f"then rerun: {shlex.join(['dewey-lab', *rerun])}")
    at = "" if crash["checkpoint_step"] is None else f" (step {crash['checkpoint_step']})"
    return (f"training stopped at step {crash['step']}; last good checkpoint: {crash['checkpoint']}{at}; "
            f"resume: {shlex.join(['dewey-lab', *rerun, '--ckpt_path', 'last'])}")


def fill(argv: list[str], parser_kwargs: dict) -> None:
    """``dewey-lab fill -c <experiment>.yaml [--data.cache.fill_shard k/N]``: fill the teacher cache for an
    experiment's data without building a student or a trainer. N jobs with shards 0/N ... N-1/N
    fill one cache together (one writer per process), each text embedded once (a stream's shards are
    documents, so a chunk text two documents share may be embedded by two jobs)."""
    check_config_files(["fit", *argv])
    from dewey_lab.data.datamodule import DistillDataModule
    from dewey_lab.runs.lightning_cli import merged_config

    dm = DistillDataModule.from_config(merged_config(["fit", *argv], parser_kwargs))
    dm.fill_stream() if dm.stream.enabled else dm.prepare_data()  # a stream: every window, block by block


def run_sweep(argv: list[str], parser_kwargs: dict) -> None:
    """``dewey-lab sweep -c <study>.yaml [--force] [--print] [--sweep_index k]``: each variant as its own
    ``fit`` process (or only variant k). A variant is skipped when a finished run of the same identity
    (resolved config + data fingerprints, ``dewey_lab.runs.identity``; not its step or epoch limit) is under
    the study's run directory and trained as far as the limits ask; it is resumed from its own ``last.ckpt``
    when an unfinished run left it, or when a finished one stopped short of a limit raised since (trained
    longer). ``--force`` starts every variant afresh, each in its own directory: an earlier run there is moved
    aside to ``<variant>@replaced-<time>``."""
    import shlex

    from dewey_lab.runs.experiments import run_root
    from dewey_lab.runs.identity import (
        covers,
        data_fingerprints,
        finished_run,
        read_run_info,
        run_checkpoints,
        run_identity,
        scale_of,
    )
    from dewey_lab.runs.lightning_cli import merged_config
    from dewey_lab.runs.sweep import check_keys, config_files, pop_option, sweep_block, variant_args, variants

    force, show = "--force" in argv, "--print" in argv
    argv = [a for a in argv if a not in ("--force", "--print")]
    argv, only = pop_option(argv, "--sweep_index")
    argv, ckpt = pop_option(argv, "--ckpt_path")  # "last" is what a sweep does anyway; a path goes to every fit
    check_config_files(["fit", *argv])
    files = config_files(argv)
    block = sweep_block(files)
    study = Path(files[-1]).stem if files else "base"
    todo = list(enumerate(variants(block))) if block else [(None, ("default", {}))]
    if only is not None:
        if not block or not 0 <= int(only) < len(todo):
            raise ValueError(f"--sweep_index {only} is out of range: this study has {len(todo) if block else 0} "
                             "variants (dewey-lab sweep --print lists them)")
        todo = [todo[int(only)]]
    if block and not show:
        check_keys({key for _, (_, overrides) in todo for key in overrides}, merged_config(["fit", *argv], parser_kwargs))
    fingerprints: dict[str, dict] = {}  # variants that share a data block share its fingerprints
    failed = []
    for k, (name, _) in todo:
        cmd = [sys.executable, "-m", "dewey_lab.cli", "fit", *argv] + ([] if k is None else ["--sweep_index", str(k)])
        if ckpt not in (None, "last"):
            cmd += ["--ckpt_path", ckpt]
        if show:
            print(shlex.join(["dewey-lab", *cmd[3:]]))
            continue
        if not force:  # a plain file (k None) too: a '# start:' experiment is trained once, then skipped
            resolved = merged_config(["fit", *(argv if k is None else variant_args(argv, block, k))], parser_kwargs)
            data_key = json.dumps([resolved.get("data"), (resolved.get("model") or {}).get("student")],
                                  sort_keys=True, default=str)
            if data_key not in fingerprints:
                fingerprints[data_key] = data_fingerprints(resolved)
            identity = run_identity(resolved, fingerprints[data_key], scale_of(files))
            root = run_root(resolved, study)
            done = None if root is None else finished_run(root, identity)
            info = {} if done is None else read_run_info(done)
            if done is not None and covers(info, identity["limits"]):
                print(f"sweep: {study}/{name} finished before in {done} at step {info.get('global_step')} (identity "
                      f"{identity['id']}); skipped (--force reruns it)", file=sys.stderr)
                continue
            own = None if root is None or ckpt not in (None, "last") else run_checkpoints(root, identity)[0]
            if own is not None:
                more = "" if done is None else (f" (finished at step {info.get('global_step')}; continued to "
                                                f"{_limits_text(identity['limits'])})")
                print(f"sweep: {study}/{name} resumes from {own}{more}", file=sys.stderr)
                cmd += ["--ckpt_path", "last"]
        print(f"sweep: {study}/{name}", file=sys.stderr)
        if launch(cmd):
            failed.append(name)
    if failed:
        raise RuntimeError(f"sweep {study}: {len(failed)} variant(s) failed: {', '.join(failed)}; "
                           "rerun the same command to resume them")


def _limits_text(limits: dict) -> str:
    """``trainer.max_steps 400`` / ``trainer.max_epochs 3`` / both: the limits a run now trains to (-1: none)."""
    return " and ".join(f"trainer.{k} {v}" for k, v in limits.items() if v != -1) or "no limit"


def launch(cmd: list[str]) -> int:
    """Run one variant's ``fit`` as a process of its own (a crash or an OOM ends that variant only);
    its exit status."""
    import subprocess

    return subprocess.run(cmd, check=False).returncode


def one_line(err: BaseException) -> str:
    """One line that says what is wrong and how to fix it, from a (possibly nested) parser error."""
    text = str(err).strip().strip('"')
    key = re.search(r'Parser key "([^"]+)"', text)
    cls = re.search(r"Problem with given class_path '([^']+)'", text)
    base = re.search(r"Subtypes: \[<class '([\w.]+)'>", text)
    required = re.search(r"the following arguments are required: ([\w, ]+)", text)
    if key and cls and required:  # a known class missing a value it needs
        names = [n.strip() for n in required.group(1).split(",")]
        return (f"{key.group(1)}: {cls.group(1)} needs {', '.join(names)}; set "
                + ", ".join(f"{key.group(1)}.init_args.{n}" for n in names))
    if key and cls and base:
        module, _, name = base.group(1).rpartition(".")
        base_cls = getattr(importlib.import_module(module), name)
        valid = sorted(f"{c.__module__}.{c.__qualname__}" for c in _subclasses(base_cls))
        return f"{key.group(1)}: unknown class {cls.group(1)}; use one of {', '.join(valid)}"
    lines = [re.sub(r"^- ", "", ln.strip()) for ln in text.splitlines() if ln.strip(" -")]  # drop list bullets
    line = " ".join(lines)[:400]
    if isinstance(err, ArgumentError):
        line += " (dewey-lab fit --help lists every key and its type)"
    return line


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def __getattr__(name: str):
    """``DeweyCLI`` and ``merged_config`` live in ``dewey_lab.runs.lightning_cli`` (they import Lightning); they
    are still importable from here, and only then imported."""
    if name in ("DeweyCLI", "merged_config"):
        from dewey_lab.runs import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
