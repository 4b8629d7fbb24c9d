"""Several processes: a 2-process DDP fit (gloo, CPU) follows the 1-process loss curve with the same
global batch, and two processes filling one teacher cache at once leave one consistent cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dewey_lab.cli import REPO
from dewey_lab.distributed import balance
from dewey_lab.teacher_cache import TeacherCache

TESTS = Path(__file__).resolve().parent
TINY = str(REPO / "experiments" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_balance_splits_by_tokens_and_feeds_every_rank():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    parts = balance(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(8))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert sorted(loads) == [140, 170]  # LPT: 100 | 90 + 80, then the short ones to the lighter rank
    assert max(loads) <= 4 / 3 * sum(lengths) / 2  # LPT's bound against the perfect split
    assert all(balance([1, 1, 1000], 3))  # every rank gets a text, however long the others
    with pytest.raises(ValueError, match="global batch|data.batch_size"):
        balance([5], 2)


def _loss_curve(run_dir: Path) -> dict[int, float]:
    out = {}
    for event in run_dir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(event))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def test_two_process_ddp_follows_the_single_process_loss(small_corpus_path, shared_cache_dir, tmp_path):
    curves = {}
    for devices in (1, 2):
        run = tmp_path / f"ddp{devices}"
        run.mkdir()
        cfg = {
            "trainer": {"max_steps": 4, "max_epochs": 100, "log_every_n_steps": 1, "limit_val_batches": 0,
                        "num_sanity_val_steps": 0, "enable_progress_bar": False, "callbacks": [],
                        "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                        "use_distributed_sampler": False,
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(run / "runs"), "name": "run"}}},
            "data": {"corpus": {"class_path": "dewey_lab.corpus.JsonlCorpus",
                                "init_args": {"path": str(small_corpus_path)}},
                     "cache_dir": str(shared_cache_dir), "max_length": 96, "max_windows_per_doc": 3,
                     "batch_size": 6, "val_fraction": 0.2},  # 6 texts per step, over all ranks
            "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 2}}, "warmup_steps": 2},
        }
        (run / "run.yaml").write_text(yaml.safe_dump(cfg))
        out = subprocess.run([sys.executable, "-m", "dewey_lab.cli", "fit", "-c", TINY, "-c", str(run / "run.yaml")],
                             cwd=run, env=ENV, capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        curves[devices] = _loss_curve(run / "runs")
    assert sorted(curves[1]) == sorted(curves[2]) == [0, 1, 2, 3]
    diff = max(abs(curves[1][s] - curves[2][s]) / abs(curves[1][s]) for s in curves[1])
    print(json.dumps({"single": curves[1], "ddp2": curves[2], "max_relative_difference": diff}))
    assert diff < 1e-4, (curves[1], curves[2])


def test_two_fill_jobs_share_one_cache_without_embedding_a_text_twice(small_corpus_path, tmp_path):
    """``dewey-lab fill --data.fill_shard k/2`` twice at once: disjoint work, one consistent cache."""
    from faults import vectors_of

    from dewey_lab.teacher_cache import cache_key

    cache_dir = tmp_path / "cache"
    procs = []
    for k in range(2):
        cfg = tmp_path / f"fill{k}.yaml"
        cfg.write_text(yaml.safe_dump({"data": {
            "corpus": {"class_path": "dewey_lab.corpus.JsonlCorpus", "init_args": {"path": str(small_corpus_path)}},
            "teacher": {"class_path": "faults.LoggingTeacher", "init_args": {"log": str(tmp_path / f"log{k}")}},
            "cache_dir": str(cache_dir), "max_length": 96, "max_windows_per_doc": None, "fill_block": 32}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "dewey_lab.cli", "fill", "-c", TINY, "-c", str(cfg),
                                       "--data.fill_shard", f"{k}/2"], env=ENV, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    logs = [[bytes.fromhex(x).decode() for x in (tmp_path / f"log{k}").read_text().split()] for k in range(2)]
    assert logs[0] and logs[1] and not set(logs[0]) & set(logs[1])  # both worked, never on the same text
    texts = sorted(logs[0] + logs[1])
    assert len(texts) == len(set(texts))
    cache = TeacherCache(cache_dir)
    keys = [cache_key("logging-12", t) for t in texts]
    assert cache.missing(keys) == [] and len(cache) == len(texts)
    assert cache.get_many(keys).tolist() == vectors_of(texts).tolist()
    assert cache.verify()["bad"] == 0
