"""Sweeps: variants, names, overrides through the real parser, bad keys -> one line naming the nearest."""


import pytest
import yaml

from dewey_lab.cli import REPO, main
from dewey_lab.runs.sweep import check_keys, override_args, sweep_block, variants

TINY = str(REPO / "experiments" / "tiny.yaml")
THETA = str(REPO / "experiments" / "theta_ablation.yaml")


def test_variants_are_the_product_in_file_order():
    vs = variants({"model.lr": [1e-3, 1e-4], "model.losses.cosine.init_args.weight": [0, 10]})
    assert [overrides for _, overrides in vs] == [{"model.lr": 1e-3, "model.losses.cosine.init_args.weight": 0},
                                                  {"model.lr": 1e-3, "model.losses.cosine.init_args.weight": 10},
                                                  {"model.lr": 1e-4, "model.losses.cosine.init_args.weight": 0},
                                                  {"model.lr": 1e-4, "model.losses.cosine.init_args.weight": 10}]
    assert vs[1][0] == "lr=0.001,weight=10"
    assert override_args({"a.b": [1, 2], "c": True}) == ["--a.b=[1, 2]", "--c=true"]


def test_a_named_axis_moves_its_keys_together():
    block = {"loss": {"cos": {"model.c": 10.0, "model.s": 0.0}, "both": {"model.c": 1.0, "model.s": 1.0}},
             "model.lr": [0.1, 0.2]}
    assert variants(block) == [("loss=cos,lr=0.1", {"model.c": 10.0, "model.s": 0.0, "model.lr": 0.1}),
                               ("loss=cos,lr=0.2", {"model.c": 10.0, "model.s": 0.0, "model.lr": 0.2}),
                               ("loss=both,lr=0.1", {"model.c": 1.0, "model.s": 1.0, "model.lr": 0.1}),
                               ("loss=both,lr=0.2", {"model.c": 1.0, "model.s": 1.0, "model.lr": 0.2})]


def test_malformed_sweep_blocks(tmp_path):
    for text, expect in (("sweep:\n  model.lr: 0.1\n", "must list its values"),
                         ("sweep:\n  loss: {cos: 3}\n", "names its variants")):
        f = tmp_path / "s.yaml"
        f.write_text(text)
        with pytest.raises(ValueError, match=expect):
            sweep_block([str(f)])


def test_keys_below_a_list_are_left_to_the_parser():
    config = {"trainer": {"callbacks": [{"class_path": "x"}]}, "model": {"lr": 1}}
    check_keys(["trainer.callbacks.init_args.pooling", "model.lr"], config)
    with pytest.raises(ValueError, match="did you mean model.lr"):
        check_keys(["model.lrr"], config)


def test_nearest_key():
    with pytest.raises(ValueError) as err:
        check_keys(["model.student.global_rope_thta"], {"model": {"student": {"global_rope_theta": 1}}})
    assert "did you mean model.student.global_rope_theta?" in str(err.value)


@pytest.mark.parametrize("index", [0, 2])
def test_each_variant_reads_back_its_theta(index, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", THETA, "--sweep_index", str(index), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    name, overrides = variants(sweep_block([THETA]))[index]  # the study file's own block (a named axis or a list)
    assert printed["model"]["student"]["global_rope_theta"] == overrides["model.student.global_rope_theta"]
    assert printed["trainer"]["logger"]["init_args"]["version"] == name


def test_sweep_prints_one_command_per_variant(capsys):
    main(["sweep", "-c", TINY, "-c", THETA, "--print"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[3].endswith("--sweep_index 3")
    main(["sweep", "-c", TINY, "-c", THETA, "--print", "--sweep_index", "2"])  # make train VARIANT=2
    assert capsys.readouterr().out.splitlines() == [lines[2]]
    with pytest.raises(SystemExit):
        main(["sweep", "-c", TINY, "-c", THETA, "--print", "--sweep_index", "4"])
    assert "out of range: this study has 4 variants" in capsys.readouterr().err


def test_bad_sweep_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  model.student.global_rope_thta: [1, 2]\n")
    for argv, expect in ((["fit", "-c", TINY, "-c", str(bad)], "did you mean model.student.global_rope_theta"),
                         (["fit", "-c", TINY, "-c", THETA, "--sweep_index", "7"], "out of range")):
        with pytest.raises(SystemExit):
            main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and expect in err[0]
