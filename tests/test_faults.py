"""Fault injection: SIGKILL a teacher fill and a fit at seeded random points, resume, and check
that nothing was lost, nothing stored was computed twice, and the resumed loss curve is the
uninterrupted one step for step. ``pytest -m fault`` runs only these (CI runs them with the rest)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faults import ENV, KILLABLE, fit_here, loss_curve, run_fit, vectors_of, write_yaml

from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.fill import CacheConfig
from dewey_lab.data.store.vectors import VectorStore
from dewey_lab.data.windows import WindowConfig

pytestmark = pytest.mark.fault

FILL = """
import sys
from faults import LoggingTeacher
from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.fill import CacheConfig
from dewey_lab.data.windows import WindowConfig
corpus, cache, log = sys.argv[1:4]
DistillDataModule(corpus=JsonlCorpus(corpus), teacher=LoggingTeacher(log), cache=CacheConfig(cache, fill_block=16),
                  windows=WindowConfig(max_length=96, overflow="split", val_fraction=0.2)).prepare_data()
"""


def _fill_texts(corpus, cache_dir) -> dict[bytes, str]:
    """Every text the fill must embed, by cache key (the data module's own view)."""
    from faults import LoggingTeacher

    dm = DistillDataModule(corpus=JsonlCorpus(str(corpus)), teacher=LoggingTeacher(os.devnull),
                           cache=CacheConfig(str(cache_dir), fill_block=16),
                           windows=WindowConfig(max_length=96, overflow="split", val_fraction=0.2))
    out = {}
    for split in ("train", "val"):
        for ex in dm.examples()[split]:
            out.update(zip(ex.keys, ex.teacher_texts()))
    return out


def _embedded(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [bytes.fromhex(line).decode("utf-8", "surrogatepass") for line in log.read_text().split()]


def test_teacher_fill_killed_three_times_loses_nothing_and_recomputes_nothing_stored(small_corpus_path, tmp_path):
    cache_dir = tmp_path / "cache"
    texts = _fill_texts(small_corpus_path, cache_dir)
    by_text = {t: k for k, t in texts.items()}
    rng = random.Random(8)
    kill_after = [rng.randrange(20, len(texts) // 4) for _ in range(3)]  # texts each killed run embeds first
    report, stored_before, stored = [], set(), set()
    for attempt in range(4):
        log = tmp_path / f"embedded_{attempt}.log"
        proc = subprocess.Popen([sys.executable, "-c", FILL, str(small_corpus_path), str(cache_dir), str(log)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 3:
            deadline = time.time() + 120
            while len(_embedded(log)) < kill_after[attempt] and time.time() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) in (0, -signal.SIGKILL)
        cache = VectorStore(cache_dir)
        stored = set(texts) - set(cache.missing(list(texts)))
        cache.close()
        embedded = _embedded(log)
        recomputed = [t for t in embedded if by_text[t] in stored_before]
        assert recomputed == [], f"{len(recomputed)} stored texts embedded again"
        assert stored_before <= stored  # nothing committed was lost
        report.append({"attempt": attempt, "embedded": len(embedded), "stored": len(stored),
                       "in_flight_lost": len(embedded) - (len(stored) - len(stored_before)), "recomputed": 0})
        stored_before = stored
    assert stored == set(texts)  # the last run finished the fill
    cache = VectorStore(cache_dir)
    keys = list(texts)
    np.testing.assert_array_equal(cache.get_many(keys), vectors_of([texts[k] for k in keys]))
    print(json.dumps(report))


def test_fit_killed_three_times_resumes_onto_the_uninterrupted_loss_curve(small_corpus_path, shared_cache_dir, tmp_path):
    steps = 15
    base = {
        "trainer": {"max_steps": steps, "max_epochs": 100, "log_every_n_steps": 1, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "callbacks": []},
        "checkpoint": {"every_n_train_steps": 2},
        "data": {"corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(small_corpus_path)}},
                 "cache": {"dir": str(shared_cache_dir)}, "batching": {"batch_size": 4},
                 "windows": {"max_length": 96, "max_windows_per_doc": 2, "val_fraction": 0.3}},
        "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2}}, "warmup_steps": 3},
    }
    runs = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        cfg = json.loads(json.dumps(base))
        cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                    "init_args": {"save_dir": str(tmp_path / name / "runs"), "name": "run"}}
        runs[name] = write_yaml(tmp_path / name / "run.yaml", cfg)
    fit_here(runs["straight"])
    straight = loss_curve(tmp_path / "straight" / "runs")
    assert sorted(straight) == list(range(steps))

    rng = random.Random(3)  # one kill in each third of the run, each of a different kind
    points = [rng.randrange(a, a + 4) for a in (2, 6, 10)]
    kinds = rng.sample(["batch_end", "before_optimizer", "checkpoint"], 3)
    killable = write_yaml(tmp_path / "killed" / "killable.yaml", KILLABLE)  # on every run: one identity
    for i, (step, where) in enumerate(zip(points, kinds, strict=True)):
        out = run_fit(tmp_path / "killed", runs["killed"], killable, resume=i > 0, kill=f"{step}:{where}")
        assert out.returncode == -signal.SIGKILL, f"kill {where}@{step} did not happen: {out.stderr[-3000:]}"
        if i > 0:  # a resumed run never touches the teacher: every vector is in the cache
            assert "resume: " in out.stderr and " 0 misses" in out.stdout
    out = run_fit(tmp_path / "killed", runs["killed"], killable, resume=True)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = loss_curve(tmp_path / "killed" / "runs")
    assert sorted(resumed) == sorted(straight)
    diff = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in straight)
    print(json.dumps({"kills": list(zip(points, kinds)), "max_relative_loss_difference": diff}))
    assert diff <= 1e-6, [(s, straight[s], resumed[s]) for s in straight if straight[s] != resumed[s]]
    assert len(list((tmp_path / "killed" / "runs" / "run").glob("version_*"))) == 1  # one run, continued
