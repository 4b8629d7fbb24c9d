"""The command line starts cheap: ``import dewey_lab.cli``, ``dewey-lab --help`` and ``dewey-lab eval --help``
import none of torch, Lightning or transformers (on 2 shared cores that is seconds per command; the figures are
in results/startup.md, from benchmarks/startup.py). Behaviour, not timings: what lands in ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dewey_lab.cli import COMMANDS, REPO, main

HEAVY = ("torch", "lightning", "transformers", "sentence_transformers")


def _heavy_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter, then report which of HEAVY it imported (and its exit status)."""
    probe = ("import json, sys\ncode = 0\ntry:\n" + "".join(f"    {ln}\n" for ln in code.splitlines())
             + "except SystemExit as e:\n    code = e.code\n"
             f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], 'code': code}}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_torch_lightning_or_transformers():
    assert _heavy_after("import dewey_lab.cli") == {"heavy": [], "code": 0}


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"]])
def test_top_level_and_eval_help_import_no_torch(argv):
    assert _heavy_after(f"from dewey_lab.cli import main\nmain({argv!r})") == {"heavy": [], "code": 0}


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", "sweep", "fill", "eval", "export", "cache"]
    assert listed == list(COMMANDS)


def test_no_command_prints_the_help_and_an_unknown_one_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "-c", "experiments/tiny.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: unknown command 'fitt'; use one of {', '.join(COMMANDS)} "
                    "(dewey-lab --help says what each does)")]


def test_eval_help_names_the_pooling_heads_the_model_defines(capsys):
    from dewey_lab.eval.run import POOLING_NAMES
    from dewey_lab.model.pooling import PoolingHead

    assert POOLING_NAMES == tuple(PoolingHead.choices())
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert f"a pooling head: {', '.join(POOLING_NAMES)}" in " ".join(capsys.readouterr().out.split())


def test_the_lightning_names_stay_importable_from_the_cli():
    """``DeweyCLI`` and ``merged_config`` moved to dewey_lab.runs.lightning_cli; old imports still work."""
    import dewey_lab.cli
    from dewey_lab.runs import lightning_cli

    assert dewey_lab.cli.DeweyCLI is lightning_cli.DeweyCLI
    assert dewey_lab.cli.merged_config is lightning_cli.merged_config
    with pytest.raises(AttributeError):
        dewey_lab.cli.no_such_name  # noqa: B018
