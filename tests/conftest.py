"""Shared fixtures: offline, CPU, small. Expensive objects are built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest
import torch

from dewey_lab.resolve import OFFLINE_TEACHER

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_MODULES = ["json", "csv", "textwrap", "heapq", "bisect", "string", "glob", "shlex", "fnmatch", "colorsys"]


@pytest.fixture(scope="session")
def tokenizer():
    from dewey_lab.student import load_tokenizer

    return load_tokenizer(OFFLINE_TEACHER)


@pytest.fixture(scope="session")
def small_corpus_path(tmp_path_factory):
    """A ten-module pydoc corpus as jsonl, built once."""
    from dewey_lab.corpus import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "pydoc_small.jsonl"
    list(PydocCorpus(cache_path=str(path), modules=SMALL_MODULES).documents())
    return path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    """A teacher cache shared by the tests that only read what the teacher produced."""
    return tmp_path_factory.mktemp("teacher_cache")
