"""Run identity (``dewey_lab.runs.identity``): a sweep skips only a finished run of the same resolved config
and data, ``--ckpt_path last`` resumes only its own run, a crash inside training keeps its traceback and
says how to resume, and ``make compare`` never puts two scales in one table."""

import json
import shlex

import pytest
import yaml
from faults import in_process

from dewey_lab.cli import REPO, main
from dewey_lab.runs.identity import (
    covers,
    describe_differences,
    finished_run,
    flat_config,
    identity_key,
    limit_error,
    run_identity,
    version_for,
)

TINY = str(REPO / "experiments" / "tiny.yaml")


QUICK_CHECK = {"class_path": "dewey_lab.callbacks.PasskeyCallback",  # one check at the end, one short length
               "init_args": {"lengths": [64], "tasks": ["passkey"], "n_queries": 3, "n_docs": 4, "modes": ["single"],
                             "check_at_start": False}}


def _scale(path, corpus, cache, *, max_length=96, save_dir=None, passkey=False, **trainer):
    """A tiny 'scale' file stacked on tiny.yaml: ten small documents, a 2-layer student; ``passkey``: one tiny
    passkey check at the end (its per-query results feed make compare's intervals)."""
    cfg = {"trainer": {"max_steps": 1, "max_epochs": 1, "log_every_n_steps": 1, "limit_val_batches": 0,
                       "num_sanity_val_steps": 0, "enable_progress_bar": False,
                       "callbacks": [{"class_path": "faults.RaiseAt"}, *([QUICK_CHECK] if passkey else [])],
                       **trainer},
           "data": {"corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(corpus)}},
                    "cache": {"dir": str(cache)}, "batching": {"batch_size": 4},
                    "windows": {"max_length": max_length, "max_windows_per_doc": 2, "val_fraction": 0.3}},
           "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 2}}}}
    if save_dir is not None:
        cfg["trainer"]["logger"] = {"init_args": {"save_dir": save_dir}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _info(run_dir):
    return json.loads((run_dir / "run_info.json").read_text())


def test_identity_leaves_out_only_bookkeeping_and_names_what_differs(tmp_path):
    config = {"seed_everything": 0, "config": ["a.yaml"], "ckpt_path": "last",
              "trainer": {"max_steps": 10, "logger": {"init_args": {"save_dir": "runs", "version": "v", "name": "x"}}},
              "model": {"lr": 0.001, "student": {"tokenizer": None}},
              "data": {"cache": {"dir": "/c"}, "windows": {"max_length": 96}}}
    flat = flat_config(config)
    assert flat == {"seed_everything": 0, "model.lr": 0.001, "data.windows.max_length": 96}  # no trainer.max_steps
    moved = json.loads(json.dumps(config))
    moved["trainer"]["logger"]["init_args"].update(save_dir="elsewhere", version="w")
    moved.update(ckpt_path=None, config=["b.yaml", "a.yaml"])
    moved["data"]["cache"]["dir"] = "/d"
    fp = {"corpus": "JsonlCorpus:1", "teacher": "t"}
    a = run_identity(config, fp, "tiny")
    assert run_identity(moved, fp, "dewey")["id"] == a["id"]  # where it writes, how it started: same run
    b = run_identity({**config, "model": {"lr": 0.5}}, {**fp, "corpus": "JsonlCorpus:2"})
    assert b["id"] != a["id"]
    assert describe_differences(b, a) == "model.lr (0.5 here, 0.001 there), the corpus fingerprint"
    assert describe_differences(a, None) == "it was written before runs had identities"

    root = tmp_path / "study"
    for name, ident in (("v", b), ("v@tiny", b)):  # another run holds both plain and scaled names
        (root / name).mkdir(parents=True)
        (root / name / "run_info.json").write_text(json.dumps({"identity": ident}))
    assert version_for(root, "v", a) == f"v@tiny-{a['id'][:8]}"
    assert version_for(root, "v", b) == "v"
    assert version_for(root, "w", a) == "w"


def test_training_longer_is_the_same_run_and_ids_of_the_former_recipe_still_match(tmp_path):
    """trainer.max_steps / max_epochs are no part of the id (recorded as ``limits``); an identity written when the
    id hashed them (reference: that recipe, sha256 of the JSON of config + fingerprints) rehashes to today's id;
    a finished run covers a limit it reached, and a limit below a checkpoint is one line naming the fix."""
    import hashlib

    fp = {"corpus": "JsonlCorpus:1", "teacher": "t"}
    short = run_identity({"trainer": {"max_steps": 200, "max_epochs": 10}, "model": {"lr": 0.001}}, fp, "tiny")
    longer = run_identity({"trainer": {"max_steps": 400, "max_epochs": 10}, "model": {"lr": 0.001}}, fp, "tiny")
    assert short["id"] == longer["id"] and short["limits"] == {"max_steps": 200, "max_epochs": 10}
    assert run_identity({"model": {"lr": 0.001}}, fp)["limits"] == {"max_steps": -1, "max_epochs": 1000}  # Trainer's
    assert run_identity({"trainer": {"max_steps": 5}}, fp)["limits"] == {"max_steps": 5, "max_epochs": -1}

    old_config = {"model.lr": 0.001, "trainer.max_epochs": 10, "trainer.max_steps": 200}
    old_id = hashlib.sha256(json.dumps({"config": old_config, "fingerprints": fp}, sort_keys=True).encode()
                            ).hexdigest()[:12]
    old = {"id": old_id, "config": old_config, "fingerprints": fp, "scale": "tiny"}
    assert old_id != short["id"] and identity_key(old) == short["id"] == identity_key(longer)
    assert describe_differences(longer, old) == "nothing"  # the limits are no difference
    root = tmp_path / "study"
    (root / "v").mkdir(parents=True)
    (root / "v" / "run_info.json").write_text(json.dumps({"identity": old, "finished": True, "global_step": 200}))
    assert version_for(root, "v", longer) == "v" and finished_run(root, longer) == root / "v"

    info = {"identity": short, "finished": True, "global_step": 200, "epochs": 3}
    assert covers(info, short["limits"]) and covers(info, {"max_steps": 100, "max_epochs": 10})
    assert not covers(info, longer["limits"])  # 400 steps asked, 200 reached: continue it
    assert covers(info, {"max_steps": -1, "max_epochs": 3}) and not covers(info, {"max_steps": -1, "max_epochs": 4})
    legacy = {"identity": old, "finished": True, "global_step": 200}  # no "epochs": judged by its own limits
    assert covers(legacy, {"max_steps": 150, "max_epochs": 10}) and not covers(legacy, {"max_steps": -1,
                                                                                        "max_epochs": 10})
    assert limit_error(longer["limits"], 200, 3) is None and limit_error(short["limits"], 200, 3) is None
    assert limit_error({"max_steps": 100, "max_epochs": 10}, 200, 3) == (
        "trainer.max_steps 100 is below the checkpoint's step 200: raise it, or start a new run without --ckpt_path")
    assert limit_error({"max_steps": -1, "max_epochs": 2}, 200, 3) == (
        "trainer.max_epochs 2 is below the checkpoint's 3 epochs (step 200): raise it, or start a new run without "
        "--ckpt_path")


def test_a_sweep_continues_a_run_trained_longer_and_force_starts_a_fresh_directory(
        tmp_path, small_corpus_path, shared_cache_dir, monkeypatch, capsys):
    """A finished 2-step variant is skipped at 2 steps and continued in its own directory when max_steps is raised
    to 4 (its step-2 checkpoint, same identity); a limit below the checkpoint's step is one line. ``--force``
    moves the run aside and starts afresh in the variant's directory, so no directory holds two runs' events,
    and make compare reports the newest finished run of the identity."""
    import dewey_lab.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dewey_lab.cli, "launch", in_process)
    study = tmp_path / "mini_study.yaml"
    study.write_text("sweep:\n  model.student.global_rope_theta: [1000.0]\n")
    scale = _scale(tmp_path / "a.yaml", small_corpus_path, shared_cache_dir, max_steps=2, max_epochs=20)
    sweep = ["sweep", "-c", TINY, "-c", scale, "-c", str(study)]
    root = tmp_path / "runs" / "mini_study"
    run = root / "global_rope_theta=1000.0"

    def events(run_dir):
        return sorted(p.name for p in run_dir.glob("events.out.tfevents*"))

    main(sweep)
    first = _info(run)
    assert first["finished"] and first["global_step"] == 2 and first["identity"]["limits"]["max_steps"] == 2
    assert len(events(run)) == 1
    main(sweep)
    assert "skipped" in capsys.readouterr().err  # the same limit: nothing to do

    main([*sweep, "--trainer.max_steps=4"])
    err = capsys.readouterr().err
    assert "skipped" not in err and "continued to trainer.max_steps 4" in err, err
    longer = _info(run)
    assert longer["finished"] and longer["global_step"] == 4 and longer["identity"]["id"] == first["identity"]["id"]
    assert longer["resumed_from"]["step"] == 2 and longer["resumed_from"]["limits"]["max_steps"] == 2
    assert sorted(p.name for p in root.iterdir()) == [run.name] and len(events(run)) == 2  # its curve continued
    main([*sweep, "--trainer.max_steps=4"])
    assert "skipped" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY, "-c", scale, "-c", str(study), "--trainer.max_steps=3", "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.max_steps 3 is below checkpoint ")
    assert lines[0].endswith("step 4: raise it, or start a new run without --ckpt_path"), lines[0]

    from dewey_lab.runs.compare import compare

    def report():
        return compare("mini_study", runs_dir=str(root.parent), out_dir=str(tmp_path / "results"),
                       study_file=str(study)).read_text()

    assert f"Trained longer: {run.name} (from step 2; max_steps 2 -> 4)" in report()

    old_events = events(run)
    main([*sweep, "--trainer.max_steps=4", "--force"])
    moved = [p for p in root.iterdir() if p.name != run.name]
    assert len(moved) == 1 and moved[0].name.startswith(f"{run.name}@replaced-"), moved
    assert events(moved[0]) == old_events and len(events(run)) == 1  # one run's events per directory
    fresh = _info(run)
    assert fresh["finished"] and fresh["global_step"] == 4 and "resumed_from" not in fresh
    assert fresh["identity"]["id"] == first["identity"]["id"] and fresh["started"] >= longer["started"]
    rows = [line for line in report().splitlines() if line.startswith("| global_rope_theta=")]
    assert len(rows) == 1 and rows[0].startswith(f"| {run.name} |") and rows[0].endswith("| 2 |")  # newest of two


@pytest.mark.parametrize("save_dir", [None, "elsewhere"])
def test_a_sweep_runs_each_scale_once_and_a_rerun_skips_it(save_dir, tmp_path, small_corpus_path, shared_cache_dir,
                                                           monkeypatch, capsys):
    import dewey_lab.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dewey_lab.cli, "launch", in_process)
    study = tmp_path / "mini_study.yaml"
    study.write_text("sweep:\n  model.student.global_rope_theta: [1000.0]\n")
    scales = {s: _scale(tmp_path / f"{s}.yaml", small_corpus_path, shared_cache_dir, max_length=n, save_dir=save_dir,
                        passkey=save_dir is None)  # the check costs ~2 s a fit: once is enough
              for s, n in (("a", 96), ("b", 64))}
    for s in ("a", "b"):
        main(["sweep", "-c", TINY, "-c", scales[s], "-c", str(study)])
        assert "skipped" not in capsys.readouterr().err, f"scale {s} must run: the other scale is not this run"
    root = tmp_path / (save_dir or "runs") / "mini_study"
    assert not (tmp_path / "runs").exists() or save_dir is None  # nothing under the default when told elsewhere
    runs = sorted(p.name for p in root.iterdir())
    assert runs == ["global_rope_theta=1000.0", "global_rope_theta=1000.0@tiny+b"]  # plain name, then scale added
    infos = [_info(root / r) for r in runs]
    assert [i["identity"]["scale"] for i in infos] == ["tiny+a", "tiny+b"] and all(i["finished"] for i in infos)
    assert infos[0]["identity"]["id"] != infos[1]["identity"]["id"]
    assert [i["identity"]["config"]["data.windows.max_length"] for i in infos] == [96, 64]
    for s in ("a", "b"):
        main(["sweep", "-c", TINY, "-c", scales[s], "-c", str(study)])
        err = capsys.readouterr().err
        assert err.count("skipped") == 1 and infos["ab".index(s)]["identity"]["id"] in err, err
    assert sorted(p.name for p in root.iterdir()) == runs

    from dewey_lab.runs.compare import compare

    report = compare("mini_study", runs_dir=str(root.parent), out_dir=str(tmp_path / "results"),
                     study_file=str(study)).read_text()
    tables = report.split("## scale: ")[1:]
    assert [t.split("\n", 1)[0] for t in tables] == ["tiny+a", "tiny+b"]  # two tables, never one
    for table, run in zip(tables, runs, strict=True):
        rows = [line for line in table.splitlines() if line.startswith("| global_rope_theta=")]
        assert len(rows) == 1 and rows[0].startswith(f"| {run} |")
        if save_dir is not None:
            continue
        last = json.loads((root / run / "passkey_last.json").read_text())  # the check's per-query results
        got = last["results"]["passkey"]["single"]["64"]
        assert len(got["qids"]) == len(got["correct"]) == 3 and set(got["correct"]) <= {0, 1}
        assert f"{sum(got['correct']) / 3:.2f} [" in rows[0]  # the scalar, with its interval
    if save_dir is None:  # same tokenizer and seed: every run scores the same queries
        sets = {json.loads((root / r / "passkey_last.json").read_text())["results"]["passkey"]["single"]["64"]["set"]
                for r in runs}
        assert len(sets) == 1


def _fake_run(root, name, scalars, correct=None, order=0):
    """A run directory as a fit leaves it: TensorBoard scalars, run_info.json, and passkey_last.json when given
    per-query results {length: [0/1, ...]}."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    writer = SummaryWriter(str(run))
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, 10)
    writer.close()
    ident = {"id": f"id{order}", "scale": "tiny", "config": {}}
    (run / "run_info.json").write_text(json.dumps({"identity": ident, "finished": True, "started": str(order)}))
    if correct is not None:
        per_length = {str(n): {"qids": [f"q{i}" for i in range(len(c))], "correct": c, "set": f"set{n}"}
                      for n, c in correct.items()}
        (run / "passkey_last.json").write_text(json.dumps({"step": 10, "results": {"passkey": {"single": per_length}}}))


def test_compare_shows_intervals_and_marks_variants_against_the_first(tmp_path):
    """Three variants over the same 40 queries per length: the reference right on 10, one right on all (marked),
    one on 12 (not marked); a fourth run written before per-query results is shown as before, with a note."""
    from dewey_lab.eval.stats import bootstrap_ci
    from dewey_lab.runs.compare import compare

    root = tmp_path / "runs" / "st"
    study = tmp_path / "st.yaml"
    study.write_text("sweep:\n  model.lr: [1, 2, 3, 4]\n")
    for i, k in enumerate((10, 40, 12)):
        c = [1] * k + [0] * (40 - k)
        _fake_run(root, f"lr={i + 1}", {"val/passkey@256": k / 40, "val/passkey@512": k / 40},
                  {256: c, 512: c}, order=i)
    _fake_run(root, "lr=4", {"val/passkey@256": 0.5, "val/passkey@512": 0.25}, order=3)
    report = compare("st", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"),
                     study_file=str(study)).read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report.splitlines() if line.startswith("| lr=")}
    head = next(line for line in report.splitlines() if line.startswith("| variant")).split(" | ")
    col = {name: head.index(name) for name in ("passkey@256", "passkey avg")}
    _, lo, hi = bootstrap_ci([1] * 10 + [0] * 30)
    assert rows["lr=1"][col["passkey@256"]] == f"0.25 [{lo:.2f}, {hi:.2f}]"  # the reference: no mark
    assert rows["lr=2"][col["passkey@256"]].endswith("] *") and rows["lr=2"][col["passkey avg"]].endswith("] *")
    assert "*" not in rows["lr=3"][col["passkey@256"]] + rows["lr=3"][col["passkey avg"]]
    assert rows["lr=4"][col["passkey@256"]] == "0.50" and rows["lr=4"][col["passkey avg"]] == "0.38"
    assert "differs from lr=1" in report and "No per-query results (passkey_last.json) for lr=4" in report
    assert (tmp_path / "results" / "st" / "passkey.png").stat().st_size > 0


def test_compare_opens_with_the_endpoint_and_gives_seeds_and_holm(tmp_path):
    """Two variants x two seeds (a sweep over seed_everything names them ``lr=1,seed_everything=0``, ...), 20 queries
    at two lengths. The report opens with the declared endpoint, each variant's per-query scores averaged over its
    seeds and paired; the seeds table gives the t-interval over seeds; the training table's marks are Holm-adjusted
    over its 9 tests, and stats.json keeps the raw p beside the adjusted one."""
    from dewey_lab.eval.stats import holm, paired_test, t_quantile
    from dewey_lab.runs.compare import compare

    root = tmp_path / "runs" / "st"
    study = tmp_path / "st.yaml"
    study.write_text("# Q?\n# endpoint: passkey single acc@1, lr=2 vs lr=1\n"
                     "sweep:\n  model.lr: [1, 2]\n  seed_everything: [0, 1]\n")
    right = {("lr=1", 0): 5, ("lr=1", 1): 7, ("lr=2", 0): 18, ("lr=2", 1): 20}
    for i, ((variant, seed), k) in enumerate(right.items()):
        c = [1] * k + [0] * (20 - k)
        _fake_run(root, f"{variant},seed_everything={seed}", {"val/passkey@256": k / 20, "val/passkey@512": k / 20},
                  {256: c, 512: c}, order=i)
    report = compare("st", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"),
                     study_file=str(study)).read_text()
    assert report.startswith("# st\n\n## Primary endpoint (declared before the run)\n\n`passkey single acc@1, "
                             "lr=2 vs lr=1`: the study file's `# endpoint:` line")
    a = [(int(i < 18) + int(i < 20)) / 2 for i in range(20)] * 2  # lr=2, averaged over its seeds, both lengths
    b = [(int(i < 5) + int(i < 7)) / 2 for i in range(20)] * 2
    p = paired_test(a, b, groups=[256] * 20 + [512] * 20)["p"]
    line = next(ln for ln in report.splitlines() if ln.startswith("| lr=2 − lr=1 |"))
    assert line.startswith("| lr=2 − lr=1 | +65.00 | [") and line.endswith(f"| p = {p:.4g} |")
    half = t_quantile(1) * 0.05  # seeds 0.90 and 1.00: sd 0.0707, se 0.05
    assert "| lr=2 | 95.00 | [" in report and f"95% t-interval [{100 * (0.95 - half):.2f}, " in report
    seeds = next(ln for ln in report.splitlines() if ln.startswith("| lr=2: single | 0, 1 |"))
    assert f"95.00 seeds [{100 * (0.95 - half):.2f}, {100 * (0.95 + half):.2f}] queries [" in seeds
    assert "Holm family (m = 9)" in report
    record = json.loads((tmp_path / "results" / "st" / "stats.json").read_text())
    tests = [t for run in record["training"]["tiny"].values() for t in run.values() if t["p"] is not None]
    assert len(tests) == 9 and [t["p_holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    assert record["endpoint"]["p"] == p and record["endpoint"]["a"]["seeds"] == [0, 1]


def test_last_resumes_its_own_variant_while_another_is_newer_and_a_crash_says_how(
        tmp_path, small_corpus_path, shared_cache_dir, monkeypatch, capsys):
    """Variant 0 crashes inside training at step 3 (a RuntimeError: a crash, not bad input): its traceback,
    then the last good checkpoint and the resume command. Variant 1 then runs to the end, so its last.ckpt
    is the newest. The printed command resumes variant 0 from its own step-2 checkpoint, in its own
    directory. A changed config is refused, naming the key."""
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "mini_study.yaml"
    study.write_text("sweep:\n  model.student.global_rope_theta: [1000.0, 2000000.0]\n")
    scale = _scale(tmp_path / "a.yaml", small_corpus_path, shared_cache_dir, max_steps=4, max_epochs=10)
    argv = ["fit", "-c", TINY, "-c", scale, "-c", str(study), "--checkpoint.every_n_train_steps=1"]
    root = tmp_path / "runs" / "mini_study"
    own, other = root / "global_rope_theta=1000.0", root / "global_rope_theta=2000000.0"
    own_last = own.relative_to(tmp_path) / "checkpoints" / "last.ckpt"  # as printed: under the working directory

    monkeypatch.setenv("DEWEY_RAISE_AT", "3")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--sweep_index", "0"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: injected failure at step 3" in err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("error: training stopped at step 3; last good checkpoint: ")
    assert f"{own_last} (step 2); resume: dewey-lab fit " in hint
    assert _info(own)["finished"] is False and _info(own)["crash"]["checkpoint_step"] == 2
    monkeypatch.delenv("DEWEY_RAISE_AT")

    main([*argv, "--sweep_index", "1"])
    assert _info(other)["finished"]
    newer = (other / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert newer > (own / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()

    resume = shlex.split(hint.split("; resume: ", 1)[1])
    assert resume[0] == "dewey-lab" and resume[-2:] == ["--ckpt_path", "last"]
    main(resume[1:])
    assert f"resume: {own_last}" in capsys.readouterr().err
    info = _info(own)
    assert info["finished"] and info["global_step"] == 4 and "crash" not in info
    assert (other / "checkpoints" / "last.ckpt").stat().st_mtime_ns == newer  # the other variant untouched
    assert sorted(p.name for p in root.iterdir()) == [own.name, other.name]

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--sweep_index", "0", "--model.lr=0.5", "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is of this run" in lines[0] and "model.lr (0.5 here, 0.001 there)" in lines[0]


def test_a_plain_experiment_runs_once_and_a_rerun_skips_it(tmp_path, small_corpus_path, shared_cache_dir, monkeypatch,
                                                           capsys):
    """A file with no sweep (a '# start:' experiment such as small_start) is trained once: make train runs it before
    every variant of a study on its scale, and a finished run of the same identity is skipped, not trained again."""
    import dewey_lab.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dewey_lab.cli, "launch", in_process)
    plain = _scale(tmp_path / "plain_start.yaml", small_corpus_path, shared_cache_dir)
    main(["sweep", "-c", TINY, "-c", plain])
    assert "skipped" not in capsys.readouterr().err
    root = tmp_path / "runs" / "plain_start"
    first = sorted(p.name for p in root.iterdir())
    assert len(first) == 1 and _info(root / first[0])["finished"]
    main(["sweep", "-c", TINY, "-c", plain])
    err = capsys.readouterr().err
    assert "plain_start/default finished before" in err and "skipped" in err, err
    assert sorted(p.name for p in root.iterdir()) == first


def test_compare_reads_runs_kept_with_the_results_when_the_run_folder_lacks_them(tmp_path):
    """A study trained over several sessions keeps each finished run's record (no checkpoints) under
    results/<study>/runs/; make compare on a fresh machine reports those beside whatever runs/<study>/ holds, and a
    run present in both is read from runs/ once."""
    from dewey_lab.runs.compare import compare

    study = tmp_path / "st.yaml"
    study.write_text("sweep:\n  model.lr: [1, 2, 3]\n")
    kept = tmp_path / "results" / "st" / "runs"
    _fake_run(kept, "lr=1", {"val/cos_whole": 0.25}, order=0)
    _fake_run(kept, "lr=2", {"val/cos_whole": 0.5}, order=1)
    _fake_run(tmp_path / "runs" / "st", "lr=2", {"val/cos_whole": 0.5}, order=1)
    _fake_run(tmp_path / "runs" / "st", "lr=3", {"val/cos_whole": 0.75}, order=2)
    report = compare("st", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"),
                     study_file=str(study)).read_text()
    rows = [line.split(" | ")[0][2:] for line in report.splitlines() if line.startswith("| lr=")]
    assert rows == ["lr=1", "lr=2", "lr=3"]
    assert next(line for line in report.splitlines() if line.startswith("| lr=2 |")).rstrip(" |").endswith("1")
    with pytest.raises(FileNotFoundError, match="run make train EXP=nothing first"):
        compare("nothing", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"), study_file=str(study))
