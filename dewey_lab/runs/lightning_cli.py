"""The LightningCLI behind ``dewey-lab fit|validate|test|predict`` (and the merged configs ``sweep`` and ``fill``
read): ``DeweyCLI`` adds the sweep key, periodic checkpoints and the data module's tokenizer link, names the
TensorBoard run after the last ``-c`` file, gives a fit its run identity, resumes ``--ckpt_path last`` from this
run's own checkpoint, and writes every checkpoint through ``SafeCheckpointIO``.

Imported only by the commands that build a Trainer or parse its config (it imports Lightning, torch and the
model): ``dewey_lab.cli`` stays cheap for ``--help``, ``eval``, ``export`` and ``cache``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dewey_lab.callbacks import RunInfo
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.model.module import DistillModule
from dewey_lab.runs.checkpoint import SafeCheckpointIO
from dewey_lab.runs.experiments import run_root, stack_maps


class FinalModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the weights training ended with.

    Lightning (2.6) writes ``last.ckpt`` at the end of a fit only when no periodic checkpoint was written during it:
    a 318-step run with a checkpoint every 50 steps kept step 300 as ``last.ckpt``, so evaluation, export and
    ``model.init_from`` read weights 18 steps short of the end. Here the end of training saves ``last.ckpt`` again
    unless the last periodic save was at the final step."""

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's saved state by its class name: this one's is ModelCheckpoint's, so checkpoints
        # written before it (and after) restore its last_model_path, and a resume keeps writing last.ckpt, not last-v1
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class DeweyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--sweep", type=dict | None, default=None,
                            help="a study's sweep: dotted key -> list of values (see dewey_lab/runs/sweep.py)")
        # periodic checkpoints (YAML `checkpoint:`), so a killed run loses at most every_n_train_steps steps
        parser.add_lightning_class_args(FinalModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        # the data module tokenises with the student's tokenizer: one setting, two readers
        parser.link_arguments(("model.student.tokenizer", "model.student.name_or_path"), "data.windows.tokenizer",
                              compute_fn=lambda tokenizer, name: tokenizer or name)
        _precision_hooks(parser)  # trainer.precision: auto

    identity: dict | None = None  # the fit's run identity (dewey_lab.runs.identity), set before anything is built

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _precision_hooks(config=config)  # auto -> bf16-mixed / 32-true before the Trainer and the identity see it
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
        root = run_root(resolved, experiment)
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            config["ckpt_path"] = ckpt = self._resume(root, init)
        elif ckpt:
            self._check_checkpoint(ckpt)
        if ckpt and Path(ckpt).is_file():  # never resume a run into a limit it has passed
            from dewey_lab.runs.identity import checkpoint_progress, limit_error

            error = limit_error(self.identity["limits"], *checkpoint_progress(ckpt), what=f"checkpoint {ckpt}")
            if error:
                raise ValueError(error)
        elif not ckpt and root is not None and isinstance(init.get("version"), str):  # a variant's named directory
            self._fresh_directory(root, init)

    def _fresh_directory(self, root: Path, logger_args) -> None:
        """A fresh start of a sweep variant: its directory (``version_for``), with a run of this identity already
        there moved aside (``set_aside``: ``sweep --force``, or a start after a kill before the first checkpoint),
        so TensorBoard never reads two runs' events as one. Only the launching process moves anything: the
        processes Lightning starts for the other ranks (and other nodes) find the directory rank 0 is writing."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from dewey_lab.runs.identity import set_aside, version_for

        version = version_for(root, logger_args["version"], self.identity)
        if version != logger_args["version"]:
            print(f"run: {root / logger_args['version']} holds another run; this one logs to {root / version}",
                  file=sys.stderr)
            logger_args["version"] = version
        if getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") == "0":
            moved = set_aside(root / version)
            if moved is not None:
                print(f"run: {root / version} held an earlier run of this identity, moved to {moved}; this run "
                      "starts afresh there", file=sys.stderr)

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
        from dewey_lab.runs.identity import checkpoint_identity, describe_differences, identity_key

        if ckpt in ("best", "hpc", "registry"):  # Lightning's own lookups
            return
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist; give a .ckpt file or 'last'")
        theirs = checkpoint_identity(ckpt)
        if identity_key(theirs) != identity_key(self.identity):
            print(f"resume: {ckpt} is of another run (it differs in {describe_differences(self.identity, theirs)}); "
                  "resuming it as asked", file=sys.stderr)


def _precision_hooks(parser=None, config=None) -> None:
    """``trainer.precision: auto`` (``dewey_lab.precision``): the parser takes the word, and the parsed config
    gets the precision it means on this machine before anything is built or hashed."""
    from dewey_lab.precision import allow_auto, resolve_trainer_precision

    if parser is not None:
        allow_auto(parser)
    if config is not None:
        resolve_trainer_precision(config)


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
