"""Command line: ``dewey-lab fit -c experiments/<name>.yaml`` (``lightning fit ...`` is an alias),
and ``dewey-lab eval --model ... --tasks ...`` (see ``dewey_lab.eval.run``).

A LightningCLI with ``experiments/base.yaml`` loaded implicitly under every experiment file and
the ``omegaconf+`` parser mode, so an experiment file holds only the keys it changes. The
TensorBoard run lands in ``runs/<experiment>/`` where ``<experiment>`` is the last ``-c`` file's
stem.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dewey_lab.callbacks import RunInfo
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.model.module import DistillModule
from dewey_lab.runs.checkpoint import SafeCheckpointIO
from dewey_lab.runs.sweep import apply_sweep

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "experiments" / "base.yaml"


class DeweyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--sweep", type=dict | None, default=None,
                            help="a study's sweep: dotted key -> list of values (see dewey_lab/runs/sweep.py)")
        # periodic checkpoints (YAML `checkpoint:`), so a killed run loses at most every_n_train_steps steps
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        # the data module tokenises with the student's tokenizer: one setting, two readers
        parser.link_arguments(("model.student.tokenizer", "model.student.name_or_path"), "data.windows.tokenizer",
                              compute_fn=lambda tokenizer, name: tokenizer or name)

    identity: dict | None = None  # the fit's run identity (dewey_lab.runs.identity), set before anything is built

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        files = [str(c) for c in (config.get("config") or [])]
        experiment = Path(files[-1]).stem if files else "base"
        logger = config.get("trainer", {}).get("logger")
        init = None
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if init.get("name") in (None, "", "auto"):
                init["name"] = experiment
        if self.subcommand != "fit":
            return
        import yaml

        from dewey_lab.runs.identity import data_fingerprints, run_identity, scale_of

        resolved = yaml.safe_load(self._parser(self.subcommand).dump(config))  # what --print_config prints
        self.identity = run_identity(resolved, data_fingerprints(resolved), scale_of(files))
        root = _run_root(resolved, experiment)
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            config["ckpt_path"] = self._resume(root, init)
        elif ckpt:
            self._check_checkpoint(ckpt)
        elif root is not None and isinstance(init.get("version"), str):  # a sweep variant's named directory
            from dewey_lab.runs.identity import version_for

            version = version_for(root, init["version"], self.identity)
            if version != init["version"]:
                print(f"run: {root / init['version']} holds another run; this one logs to {root / version}",
                      file=sys.stderr)
                init["version"] = version

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Every Trainer writes through SafeCheckpointIO (atomic, finite checkpoints) unless the config names
        its own CheckpointIO. Added here, not as a trainer default: jsonargparse cannot serialise a plugin
        instance and warned on every fit and --print_config. RunInfo learns the run's identity here."""
        from lightning.pytorch.plugins.io import CheckpointIO

        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        config["plugins"] = plugins
        trainer = super()._instantiate_trainer(config, callbacks)
        for cb in trainer.callbacks:
            if isinstance(cb, RunInfo):
                cb.identity = self.identity
        return trainer

    def _resume(self, root: Path | None, logger_args) -> str | None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this run's identity among the experiment's run
        directories; the resumed run logs into that directory, so its curves continue the killed run's.
        Another run's checkpoint is never taken: one line names the keys in which it differs."""
        from dewey_lab.runs.identity import describe_differences, run_checkpoints

        if root is None:
            raise ValueError("--ckpt_path last needs trainer.logger (the run directory); give a checkpoint path")
        ckpt, others = run_checkpoints(root, self.identity)
        if ckpt is not None:
            logger_args["version"] = ckpt.parent.parent.name
            print(f"resume: {ckpt}", file=sys.stderr)
            # its own checkpoints are in that directory, of course: Lightning's warning is for a fresh run
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            return str(ckpt)
        if not others:
            print(f"resume: no last.ckpt under {root}; starting from scratch", file=sys.stderr)
            return None
        newest, theirs = others[0]
        raise ValueError(f"--ckpt_path last: none of the {len(others)} checkpoints under {root} is of this run "
                         f"(identity {self.identity['id']}); the newest, {newest}, differs in "
                         f"{describe_differences(self.identity, theirs)}; give its path as --ckpt_path to resume it "
                         "anyway, or leave --ckpt_path out to start this run")

    def _check_checkpoint(self, ckpt: str) -> None:
        """An explicit checkpoint path is resumed as asked; if it is of another run, say how it differs."""
        from dewey_lab.runs.identity import checkpoint_identity, describe_differences

        if ckpt in ("best", "hpc", "registry"):  # Lightning's own lookups
            return
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist; give a .ckpt file or 'last'")
        theirs = checkpoint_identity(ckpt)
        if theirs is None or theirs["id"] != self.identity["id"]:
            print(f"resume: {ckpt} is of another run (it differs in {describe_differences(self.identity, theirs)}); "
                  "resuming it as asked", file=sys.stderr)


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DEWEY_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if args is None else list(args)
    command = list(argv)  # as typed (before a sweep variant's overrides are spelled out): the resume hint's
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass argv on purpose
    # lightning 2.6's CombinedLoader builds torch's LeafSpec, deprecated since torch 2.13: not ours to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    defaults = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    sub_kwargs = {"default_config_files": defaults, "exit_on_error": False}
    parser_kwargs = {"parser_mode": "omegaconf+", "exit_on_error": False}
    parser_kwargs.update({sub: dict(sub_kwargs) for sub in ("fit", "validate", "test", "predict")})
    run_info = RunInfo()
    if "--help" in argv or "-h" in argv:  # the docstring under each field of StudentConfig, WindowConfig, ... is
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
        if argv[:1] == ["fill"]:  # the teacher fill alone (a CPU/GPU job, or one of an array with --data.cache.fill_shard)
            fill(argv[1:], parser_kwargs)
            return
        if argv[:1] == ["sweep"]:  # every variant of a study, each its own run
            run_sweep(argv[1:], parser_kwargs)
            return
        check_config_files(argv)
        if argv[:1] == ["fit"]:
            argv = stack_maps(["fit", *apply_sweep(argv[1:], lambda a: merged_config(["fit", *a], parser_kwargs))])
            args = argv
        DeweyCLI(DistillModule, DistillDataModule, parser_kwargs=parser_kwargs, args=None if args is None else argv,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                 trainer_defaults={"callbacks": [run_info]})  # added to whatever callbacks a config lists
    except Exception as err:
        if run_info.crash is not None:  # raised inside training: not bad input, so the whole traceback
            traceback.print_exception(err)
            print(f"error: {crash_line(run_info.crash, command)}", file=sys.stderr)
            sys.exit(1)
        if os.environ.get("DEWEY_TRACEBACK") or not isinstance(err, INPUT_ERRORS) or _is_out_of_memory(err):
            raise
        line = one_line(err)
        unknown = re.search(r"does not accept option '([\w.]+)'", line)
        if unknown:  # name the nearest real key (the merged defaults know them all)
            import difflib

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
    import torch

    return isinstance(err, torch.OutOfMemoryError)


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


def merged_config(argv: list[str], parser_kwargs: dict) -> dict:
    """The merged config ``argv`` would run, as a dict (the parser's --print_config, in process)."""
    import contextlib
    import io

    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        DeweyCLI(DistillModule, DistillDataModule, parser_kwargs=parser_kwargs,
                 args=[*stack_maps(argv), "--print_config"], auto_configure_optimizers=False)
    return yaml.safe_load(out.getvalue()) or {}


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


def fill(argv: list[str], parser_kwargs: dict) -> None:
    """``dewey-lab fill -c <experiment>.yaml [--data.cache.fill_shard k/N]``: fill the teacher cache for an
    experiment's data without building a student or a trainer. N jobs with shards 0/N ... N-1/N
    fill one cache together (one writer per process), each text embedded once (a stream's shards are
    documents, so a chunk text two documents share may be embedded by two jobs)."""
    check_config_files(["fit", *argv])
    dm = DistillDataModule.from_config(merged_config(["fit", *argv], parser_kwargs))
    dm.fill_stream() if dm.stream.enabled else dm.prepare_data()  # a stream: every window, block by block


def run_sweep(argv: list[str], parser_kwargs: dict) -> None:
    """``dewey-lab sweep -c <study>.yaml [--force] [--print] [--sweep_index k]``: each variant as its own
    ``fit`` process (or only variant k). A variant is skipped when a finished run of the same identity
    (resolved config + data fingerprints, ``dewey_lab.runs.identity``) is under the study's run directory,
    and resumed from its own ``last.ckpt`` when an unfinished one left it; ``--force`` starts every
    variant afresh."""
    import shlex

    from dewey_lab.runs.identity import (
        data_fingerprints,
        finished_run,
        run_checkpoints,
        run_identity,
        scale_of,
    )
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
        if k is not None and not force:
            resolved = merged_config(["fit", *variant_args(argv, block, k)], parser_kwargs)
            data_key = json.dumps([resolved.get("data"), (resolved.get("model") or {}).get("student")],
                                  sort_keys=True, default=str)
            if data_key not in fingerprints:
                fingerprints[data_key] = data_fingerprints(resolved)
            identity = run_identity(resolved, fingerprints[data_key], scale_of(files))
            root = _run_root(resolved, study)
            done = None if root is None else finished_run(root, identity)
            if done is not None:
                print(f"sweep: {study}/{name} finished before in {done} (identity {identity['id']}); skipped "
                      "(--force reruns it)", file=sys.stderr)
                continue
            own = None if root is None or ckpt not in (None, "last") else run_checkpoints(root, identity)[0]
            if own is not None:
                print(f"sweep: {study}/{name} resumes from {own}", file=sys.stderr)
                cmd += ["--ckpt_path", "last"]
        print(f"sweep: {study}/{name}", file=sys.stderr)
        if launch(cmd):
            failed.append(name)
    if failed:
        raise RuntimeError(f"sweep {study}: {len(failed)} variant(s) failed: {', '.join(failed)}; "
                           "rerun the same command to resume them")


def launch(cmd: list[str]) -> int:
    """Run one variant's ``fit`` as a process of its own (a crash or an OOM ends that variant only);
    its exit status."""
    import subprocess

    return subprocess.run(cmd, check=False).returncode


def _run_root(config: dict, experiment: str) -> Path | None:
    """``<save_dir>/<name>``: where a config's TensorBoard runs land (None without a logger)."""
    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, dict):
        return None
    init = logger.get("init_args") or {}
    name = init.get("name")
    return Path(init.get("save_dir") or "runs") / (experiment if name in (None, "", "auto") else str(name))


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


if __name__ == "__main__":
    main()
