"""Shared fixtures: offline, CPU, small. Expensive objects are built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# "auto" precision (trainer, eval, teacher) means fp32 here: the suite's exactness checks (packed = padded to 1e-4,
# PCW = its reference to 1e-5, fp32 cache keys) are fp32 checks; tests/test_precision.py runs the bf16 side
os.environ.setdefault("DEWEY_PRECISION", "32-true")

import pytest
import torch

from dewey_lab.resolve import OFFLINE_TEACHER

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_MODULES = ["json", "csv", "textwrap", "heapq", "bisect", "string", "glob", "shlex", "fnmatch", "colorsys"]


# Tests that start processes and train in them (minutes, not seconds) go first, so that make test's two
# workers (pytest-xdist) do not end with one of them alone on a long test.
HEAVY_MODULES = {"test_distributed", "test_faults", "test_streaming"}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not (item.get_closest_marker("fault") or item.module.__name__ in HEAVY_MODULES))


@pytest.fixture(scope="session")
def tokenizer():
    from dewey_lab.model.student import load_tokenizer

    return load_tokenizer(OFFLINE_TEACHER)


@pytest.fixture(scope="session")
def small_corpus_path(tmp_path_factory):
    """A ten-module pydoc corpus as jsonl, built once."""
    from dewey_lab.data.pydoc import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "pydoc_small.jsonl"
    list(PydocCorpus(cache_path=str(path), modules=SMALL_MODULES).documents())
    return path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    """A teacher cache shared by the tests that only read what the teacher produced."""
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.fixture(scope="session")
def student_ckpt(tmp_path_factory):
    """A randomly initialised small student + linear head to 384-d, saved as a Lightning checkpoint
    (what ``dewey-lab fit`` writes) under runs/<experiment>/<version>/checkpoints/."""
    import lightning as L

    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig

    torch.manual_seed(0)
    spec = StudentConfig(config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "max_position_embeddings": 1024,
                                 "local_attention": 32, "initializer_range": 0.3},  # context matters
                         tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa")
    module = DistillModule(student=spec, teacher_dim=384, projection="linear")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("runs") / "small" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    return path
