"""Streaming corpora (``data.stream``): shards cover the corpus exactly once per epoch, batches
resume exactly from a saved position (also through a killed and resumed ``fit``), texts the cache
lacks are embedded as they come or named as an error, and ``dewey-lab fill`` fills a stream."""

import collections
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from faults import KILLABLE, LoggingTeacher, fit_here, loss_curve, run_fit, write_yaml
from test_datamodule import CountingTeacher, config_groups

from dewey_lab.data.corpus import JsonlCorpus, MixtureCorpus, TextCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.streaming import ShardState, WindowStream


@pytest.fixture(scope="module")
def many_docs(small_corpus_path, tmp_path_factory):
    """~150 documents (the small pydoc corpus cut every 25 lines) and one exact duplicate."""
    rows = []
    for doc in JsonlCorpus(str(small_corpus_path)).documents():
        lines = doc.text.splitlines()
        rows += [{"id": f"{doc.doc_id}-{i}", "text": "\n".join(lines[i:i + 25])} for i in range(0, len(lines), 25)]
    rows.append({"id": "copy", "text": rows[3]["text"]})
    path = tmp_path_factory.mktemp("stream") / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dm(path, cache_dir, teacher=None, **kw) -> DistillDataModule:
    """A streamed data module (``enabled=False``: the same data in memory); fields by their own names."""
    args = {"max_length": 64, "overflow": "split", "max_windows_per_doc": 2, "val_fraction": 0.1, "batch_size": 3,
            "enabled": True, "block": 8}
    args.update(kw)
    return DistillDataModule(corpus=JsonlCorpus(str(path)), teacher=teacher or CountingTeacher(),
                             **config_groups(dir=str(cache_dir), **args))


def _stream(dm, rank=0, world_size=1, **kw) -> WindowStream:
    args = {"batch_size": dm.batching.batch_size, "batch_tokens": None, "packed": dm.batching.pack,
            "block": dm.stream.block}
    args.update(kw)
    return WindowStream(dm.corpus, dm.windower, dm.cache, dm._collate, rank=rank, world_size=world_size, seed=dm.seed,
                        **args)


def _windows(examples) -> collections.Counter:
    return collections.Counter((e.doc_id, e.text, tuple(e.input_ids.tolist())) for e in examples)


@pytest.fixture(scope="module")
def filled(many_docs, tmp_path_factory):
    """A cache holding every text of the corpus (the in-memory path's fill)."""
    cache = tmp_path_factory.mktemp("stream_cache")
    _dm(many_docs, cache, enabled=False).prepare_data()
    return cache


def test_the_shards_of_one_epoch_are_the_in_memory_training_set(many_docs, filled):
    memory = _dm(many_docs, filled, enabled=False)
    expected = _windows(memory.examples()["train"])
    assert memory.duplicates_skipped == 1 and len(expected) > 100
    dm = _dm(many_docs, filled)
    per_shard = []
    for rank in range(2):  # 2 ranks x 2 workers: 4 shards
        stream = _stream(dm, rank, 2)
        for worker in range(2):
            per_shard.append([ex for _, _, windows in stream.blocks(rank * 2 + worker, 4, 0) for ex in windows])
    got = _windows(ex for shard in per_shard for ex in shard)
    assert got == expected  # every training window once: none lost, none twice, the duplicate dropped
    docs = [{e.doc_id for e in shard} for shard in per_shard]
    assert all(docs) and sum(map(len, docs)) == len(set().union(*docs))  # a document lives in one shard


@pytest.mark.parametrize("budget", [None, 200])
def test_a_shard_serves_each_window_once_per_epoch_and_carries_the_rest(many_docs, filled, budget):
    dm = _dm(many_docs, filled)
    stream = _stream(dm, batch_tokens=budget, batch_size=None if budget else 3)
    epoch_windows = _windows(ex for _, _, windows in stream.blocks(0, 1, 0) for ex in windows)
    served = collections.Counter()
    for batch, after in stream.batches(0, 1, ShardState()):
        assert batch["_missing"] == []  # a full cache: nothing to embed
        if budget:
            assert batch["attention_mask"].sum() <= budget or len(batch["doc_row"]) == 1
        else:
            assert len(batch["doc_row"]) == 3
        ids = [tuple(row[row != 0].tolist()) for row in batch["input_ids"]]
        served.update(ids)
        if after.epoch == 1:
            break
    carried = [tuple(ids) for _, _, ids, *_ in after.carry]  # Example.to_plain: [doc_id, text, input_ids, ...]
    assert (budget is None) == (len(carried) > 0)  # fixed batches carry their leftover into the next epoch
    want = collections.Counter(ids for _, _, ids in epoch_windows.elements())
    assert served + collections.Counter(carried) == want


def _take(loader, n) -> list[dict]:
    out, it = [], iter(loader)
    for _ in range(n):
        out.append(next(it))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumes_at_the_batch_after_the_last_one_consumed(many_docs, filled, tmp_path, workers):
    """The position a checkpoint keeps (after 7 consumed batches, while 4 more were fetched ahead) gives,
    in a new process, batches 7, 8, ... of the uninterrupted stream: same texts, same order, same vectors."""
    consumed = [0]
    dm = _dm(many_docs, filled, num_workers=workers)
    dm._batches_done = lambda: consumed[0]
    dm.prepare_data()
    dm.setup("fit")
    straight = _take(dm.train_dataloader(), 11)
    consumed[0] = 7
    saved = io.BytesIO()
    torch.save(dm.state_dict(), saved)  # what the checkpoint holds, loaded as SafeCheckpointIO loads it
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    assert state["stream"][0]["batches_done"] == 7 and state["stream"][0]["workers"] == max(1, workers)
    again = _dm(many_docs, filled, num_workers=workers)
    again._batches_done = lambda: 7
    again.load_state_dict(state)
    again.setup("fit")
    resumed = _take(again.train_dataloader(), 4)
    for a, b in zip(straight[7:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["t_whole"], b["t_whole"])
    assert not torch.equal(straight[6]["input_ids"], resumed[0]["input_ids"])

    other = _dm(many_docs, filled, num_workers=workers + 3)
    other.load_state_dict(state)
    other.setup("fit")
    with pytest.raises(ValueError, match="same devices x nodes and data.batching.num_workers"):
        other.train_dataloader()


def test_texts_the_cache_lacks_are_embedded_as_their_batch_arrives(many_docs, tmp_path):
    teacher = CountingTeacher()
    dm = _dm(many_docs, tmp_path / "cache", teacher)
    dm.prepare_data()  # the held-out windows only
    held_out = len(teacher.calls)
    assert 0 < held_out < 60
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = _take(loader, 5)
    assert loader.filled == len(teacher.calls) - held_out > 0
    for batch in batches:  # what the cache now holds is what the batch carried
        assert batch["t_whole"].norm(dim=1).min() > 0.99 and batch["t_chunk"].norm(dim=1).min() > 0.99

    strict = _dm(many_docs, tmp_path / "empty", fill=False)
    strict.prepare_data()
    strict.setup("fit")
    with pytest.raises(RuntimeError, match="dewey-lab fill"):
        _take(strict.train_dataloader(), 1)


def test_two_fill_jobs_fill_the_whole_stream_then_it_needs_no_teacher(many_docs, tmp_path):
    logs = []
    for k in range(2):
        log = tmp_path / f"log{k}"
        _dm(many_docs, tmp_path / "cache", LoggingTeacher(str(log), delay=0), fill_shard=f"{k}/2",
            fill_block=16).fill_stream()
        logs.append([bytes.fromhex(x).decode() for x in log.read_text().split()])
    assert logs[0] and logs[1]
    dm = _dm(many_docs, tmp_path / "cache", LoggingTeacher(str(tmp_path / "none"), delay=0), fill=False)
    dm.prepare_data()
    dm.setup("fit")
    stream = _stream(dm)
    for batch, after in stream.batches(0, 1, ShardState()):  # a whole epoch, no text missing
        assert batch["_missing"] == []
        if after.epoch == 1:
            break
    assert not (tmp_path / "none").exists()


def test_a_stream_needs_max_steps(many_docs, filled):
    dm = _dm(many_docs, filled)
    dm.trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(ValueError, match="trainer.max_steps"):
        dm.setup("fit")


def test_an_interleaved_mixture_takes_turns(tmp_path):
    for name, n in (("a", 4), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text("\n".join(f"{name}{i}" for i in range(n)))
    sources = [TextCorpus(str(tmp_path / n), per_line=True) for n in ("a", "b")]
    mixed = [d.text for d in MixtureCorpus(sources, interleave=True).documents()]
    assert mixed == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert [d.text for d in MixtureCorpus(sources).documents()] == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert [d.text for d in MixtureCorpus(sources, interleave=True, limit=3).documents()] == ["a0", "b0", "a1"]


def _fit_config(run: Path, corpus: Path, cache: Path, devices: int, steps: int) -> dict:
    return {
        "trainer": {"max_steps": steps, "log_every_n_steps": 1, "val_check_interval": 4, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "callbacks": [], "accelerator": "cpu",
                    "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "use_distributed_sampler": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(run / "runs"), "name": "run"}}},
        "checkpoint": {"every_n_train_steps": 2},
        "data": {"corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(corpus)}},
                 "cache": {"dir": str(cache)}, "windows": {"max_length": 64, "max_windows_per_doc": 2, "val_fraction": 0.1},
                 "batching": {"batch_size": 4, "num_workers": 1}, "stream": {"enabled": True, "block": 8}},
        "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2}}, "warmup_steps": 2},
    }


@pytest.mark.fault
@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2 processes: make test-slow
def test_a_streamed_fit_killed_midway_resumes_onto_the_uninterrupted_loss_curve(many_docs, tmp_path, devices):
    """``fit`` on a stream (1 process, and 2 DDP processes on gloo; one loader worker each), SIGKILLed
    after step 5 with its last checkpoint at step 4, resumed with ``--ckpt_path last``: the same loss
    at every step as the run never stopped, with the teacher vectors embedded on the fly."""
    steps, curves = 8, {}
    for name in ("straight", "killed"):
        run = tmp_path / name
        run.mkdir()
        cfg = write_yaml(run / "run.yaml", _fit_config(run, many_docs, tmp_path / f"cache_{name}", devices, steps))
        killable = write_yaml(run / "killable.yaml", KILLABLE)  # on every run of both: one identity each
        if name == "killed":
            out = run_fit(run, cfg, killable, kill="5:batch_end")
            assert out.returncode != 0 and (run / "runs/run/version_0/checkpoints/last.ckpt").exists(), out.stderr[-3000:]
            state = torch.load(run / "runs/run/version_0/checkpoints/last.ckpt", weights_only=False)
            saved = state["DistillDataModule"]["stream"]
            assert [s["batches_done"] for s in saved] == [4] * devices  # every rank's position, at step 4
        if name == "straight" and devices == 1:
            fit_here(cfg, killable)  # the reference run, in this process
        else:
            out = run_fit(run, cfg, killable, resume=name == "killed")
            assert out.returncode == 0, out.stderr[-3000:]
        curves[name] = loss_curve(run / "runs")
        info = json.loads((run / "runs/run/version_0/run_info.json").read_text())
        assert info["finished"] and (name == "killed" or info["data"]["stream_texts_embedded"] > 0)  # on the fly
    assert sorted(curves["straight"]) == sorted(curves["killed"]) == list(range(steps))
    diff = max(abs(curves["straight"][s] - curves["killed"][s]) / abs(curves["straight"][s]) for s in range(steps))
    print(json.dumps({"devices": devices, "max_relative_loss_difference": diff}))
    assert diff <= 1e-6, (curves["straight"], curves["killed"])


def test_a_stream_of_two_hf_datasets_in_their_own_formats(many_docs, tmp_path, monkeypatch):
    """The paper's two sources as local stand-ins in their hub formats (fineweb-edu ``text`` rows,
    Infinity-Instruct ``conversations``), streamed through ``datasets`` and interleaved: batches carry
    windows of both from the first block on."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows = [json.loads(line) for line in many_docs.read_text().splitlines()]
    web, chat = tmp_path / "fineweb.jsonl", tmp_path / "instruct.jsonl"
    web.write_text("".join(json.dumps({"id": f"<urn:{r['id']}>", "text": r["text"], "score": 3.0}) + "\n"
                           for r in rows[::2]))
    chat.write_text("".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": r["text"][:80]},
                                                                  {"from": "gpt", "value": r["text"][80:]}]}) + "\n"
                            for i, r in enumerate(rows[1::2])))
    from dewey_lab.data.corpus import HFCorpus

    corpus = [HFCorpus("json", data_files=str(web), schema="text", streaming=True),
              HFCorpus("json", data_files=str(chat), schema="conversations", streaming=True)]
    dm = DistillDataModule(corpus=corpus, teacher=CountingTeacher(), **config_groups(
        dir=str(tmp_path / "cache"), max_length=64, batch_size=4, enabled=True, block=16, val_fraction=0.1))
    assert dm.corpus.interleave
    dm.prepare_data()
    dm.setup("fit")
    stream = _stream(dm)
    first_block = next(stream.blocks(0, 1, 0))[2]
    assert {e.doc_id.split(":")[0] for e in first_block} == {"0", "1"}  # both sources from the start
    batches = _take(dm.train_dataloader(), 3)
    assert all(len(b["doc_row"]) == 4 and b["t_whole"].norm(dim=1).min() > 0.99 for b in batches)


class _CountDocuments(torch.utils.data.IterableDataset):
    def __init__(self, corpus):
        self.corpus = corpus

    def __iter__(self):
        yield sum(1 for _ in self.corpus.documents())


def test_an_hf_stream_gives_every_loader_worker_every_document(tmp_path, monkeypatch):
    """``datasets`` splits a streamed dataset's files over DataLoader workers when iterated inside one;
    a stream's shards must each see every document (they pick theirs by content hash)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    for k in range(2):  # two files: datasets would give each of 2 workers one
        (tmp_path / f"part{k}.jsonl").write_text("".join(json.dumps({"text": f"doc {k}-{i}"}) + "\n" for i in range(5)))
    from dewey_lab.data.corpus import HFCorpus

    corpus = HFCorpus("json", data_files=[str(tmp_path / f"part{k}.jsonl") for k in range(2)], streaming=True)
    counts = list(torch.utils.data.DataLoader(_CountDocuments(corpus), batch_size=None, num_workers=2))
    assert counts == [10, 10]
