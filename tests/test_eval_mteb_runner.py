"""An independent MTEB check: all-MiniLM-L6-v2 loaded and run by mteb itself (``mteb.get_model`` on the
model's real name, its registered revision and loader, i.e. sentence-transformers, with mteb's own
encoder wrapper, dataloaders, search and pytrec_eval scoring) against ``dewey-lab eval`` on the same
local LEMB-format files. None of our Embedder, retrievers or metrics runs on mteb's side.

The hub is a stand-in: the packaged copy of all-MiniLM-L6-v2 placed in a hub cache, in the hub's own
layout, at the revision mteb pins, with the hub switched off.
"""

import json
import shutil
from pathlib import Path

import pytest

from dewey_lab.cli import main
from dewey_lab.eval.metrics import METRICS
from dewey_lab.eval.mteb_wrapper import mteb_task
from dewey_lab.eval.tasks.longembed import load_longembed
from dewey_lab.resolve import OFFLINE_TEACHER, resolve_model

mteb = pytest.importorskip("mteb")

DATA = Path(__file__).parent / "data" / "longembed"
NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Relevant documents ranked 2nd to 13th of 17 (tests/test_eval_mteb.py), so no metric is 0 or 1.
HARD_QRELS = {"qmsum-q0": ["qmsum-0", "qmsum-2"], "qmsum-q1": ["qmsum-0"], "qmsum-q2": ["qmsum-3", "qmsum-0"],
              "qmsum-q3": ["qmsum-0"]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """qmsum with the other stand-ins' passages as distractors and hard qrels, and the passkey stand-in."""
    root = tmp_path_factory.mktemp("lemb")
    corpus = []
    for name in ("qmsum", "2wikimqa", "passkey"):
        for t in load_longembed(name, source=str(DATA)):
            corpus += [{"doc_id": d, "text": x} for d, x in t.corpus.items()]
    (standin,) = load_longembed("qmsum", source=str(DATA))
    (root / "qmsum").mkdir()
    for split, rows in (("corpus", corpus),
                        ("queries", [{"qid": q, "text": x} for q, x in standin.queries.items()]),
                        ("qrels", [{"qid": q, "doc_id": d} for q, ds in HARD_QRELS.items() for d in ds])):
        (root / "qmsum" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # passkey: generated in the benchmark's format (12 queries over 24 documents at 256 and 512 tokens) and
    # written as LEMB files; at a 256-token window the keys past it are missed, so Acc@1 is neither 0 nor 1
    from dewey_lab.eval.tasks.synthetic import make_synthetic
    from dewey_lab.model.student import load_tokenizer

    rows = {"corpus": [], "queries": [], "qrels": []}
    for t in make_synthetic("passkey", load_tokenizer(OFFLINE_TEACHER), [256, 512], n_queries=12, n_docs=24, seed=3):
        rows["corpus"] += [{"doc_id": d, "text": x, "context_length": t.length} for d, x in t.corpus.items()]
        rows["queries"] += [{"qid": q, "text": x, "context_length": t.length} for q, x in t.queries.items()]
        rows["qrels"] += [{"qid": q, "doc_id": d, "context_length": t.length} for q, ds in t.qrels.items() for d in ds]
    (root / "passkey").mkdir()
    for split, split_rows in rows.items():
        (root / "passkey" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return root


@pytest.fixture(scope="module")
def mteb_model(tmp_path_factory):
    import huggingface_hub.constants

    revision = mteb.get_model_meta(NAME).revision
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / ("models--" + NAME.replace("/", "--"))
    shutil.copytree(resolve_model(OFFLINE_TEACHER), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    mp.setenv("HF_HUB_OFFLINE", "1")
    model = mteb.get_model(NAME, device="cpu")
    yield model
    mp.undo()


def _mteb_scores(model, tasks) -> dict[int | None, dict[str, float]]:
    result = mteb.evaluate(model, mteb_task(tasks), cache=None, overwrite_strategy="always", show_progress_bar=False)
    (task_result,) = result.task_results
    out = {}
    for t in tasks:
        (scores,) = task_result.scores["test" if t.length is None else f"test_{t.length}"]
        out[t.length] = {m: float(scores[m.replace("@", "_at_")]) for m in METRICS}
    return out


def _dewey_scores(tmp_path, source, task, *args) -> dict[int | None, dict[str, float]]:
    out = tmp_path / task
    main(["eval", "--model", OFFLINE_TEACHER, "--tasks", task, "--synthetic", "benchmark", "--source", str(source),
          "--out_dir", str(out), "--cache_dir", "", "--progress", "false", *args])
    (found,) = sorted(out.rglob("*.json"))
    return {r["length"]: {m: r[m] for m in METRICS} for r in json.loads(found.read_text())["rows"]}


def test_mteb_runner_is_mteb_and_sentence_transformers(mteb_model):
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    assert isinstance(mteb_model, SentenceTransformerEncoderWrapper)
    assert mteb_model.mteb_model_meta.name == NAME
    assert mteb_model.model.max_seq_length == 256  # sentence-transformers' own cap for this model


def test_qmsum_equals_dewey_eval(mteb_model, source, tmp_path):
    theirs = _mteb_scores(mteb_model, load_longembed("qmsum", source=str(source)))
    ours = _dewey_scores(tmp_path, source, "qmsum")
    assert 0 < ours[None]["ndcg@10"] < 1 and 0 < ours[None]["recall@10"] < 1  # not a trivial ranking
    for metric in METRICS:
        assert theirs[None][metric] == pytest.approx(ours[None][metric], abs=1e-4), metric


def test_passkey_equals_dewey_eval_at_the_same_window(mteb_model, source, tmp_path):
    # sentence-transformers cuts all-MiniLM-L6-v2 at 256 tokens; dewey-lab eval reads 512 (LongEmbed's window
    # for it) unless told: with --max_length 256 both read the same tokens of every 512-token document
    theirs = _mteb_scores(mteb_model, load_longembed("passkey", source=str(source)))
    ours = _dewey_scores(tmp_path, source, "passkey", "--max_length", "256")
    assert set(ours) == set(theirs) == {256, 512}
    assert 0 < ours[512]["ndcg@1"] < 1  # keys past the window are missed: not a trivial score
    for length in (256, 512):
        for metric in METRICS:
            assert theirs[length][metric] == pytest.approx(ours[length][metric], abs=1e-4), (length, metric)
