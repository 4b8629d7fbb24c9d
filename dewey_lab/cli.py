"""Command line: ``dewey-lab fit -c experiments/<name>.yaml`` (``lightning fit ...`` is an alias).

A LightningCLI with ``experiments/base.yaml`` loaded implicitly under every experiment file and
the ``omegaconf+`` parser mode, so an experiment file holds only the keys it changes. The
TensorBoard run lands in ``runs/<experiment>/`` where ``<experiment>`` is the last ``-c`` file's
stem.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from dewey_lab.datamodule import DistillDataModule
from dewey_lab.module import DistillModule

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "experiments" / "base.yaml"


class DeweyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data module tokenises with the student's tokenizer: one setting, two readers
        parser.link_arguments(("model.student.tokenizer", "model.student.name_or_path"), "data.tokenizer",
                              compute_fn=lambda tokenizer, name: tokenizer or name)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        files = [Path(str(c)) for c in (config.get("config") or [])]
        experiment = files[-1].stem if files else "base"
        logger = config.get("trainer", {}).get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if init.get("name") in (None, "", "auto"):
                init["name"] = experiment


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DEWEY_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    defaults = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    parser_kwargs = {"parser_mode": "omegaconf+"}
    parser_kwargs.update({sub: {"default_config_files": defaults} for sub in ("fit", "validate", "test", "predict")})
    try:
        DeweyCLI(DistillModule, DistillDataModule, parser_kwargs=parser_kwargs, args=args,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, KeyError) as err:
        if os.environ.get("DEWEY_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
