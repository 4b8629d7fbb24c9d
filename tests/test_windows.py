"""The teacher embeds exactly the text the student reads: for every window and chunk of a real corpus (the
offline pydoc corpus with the tiny config's tokenizer and window), the text behind each teacher vector is
the text the student's tokens for that span cover, as the tokenizer's own offsets say, computed here."""

import json

import numpy as np
import pytest
import yaml

from dewey_lab.cli import REPO
from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.fill import CacheConfig
from dewey_lab.data.items import collate
from dewey_lab.data.packing import BatchConfig
from dewey_lab.data.teacher import Teacher
from dewey_lab.data.windows import WindowConfig
from dewey_lab.model.student import load_tokenizer

TINY = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())


class IndexTeacher(Teacher):
    """Each text's vector is its number in ``texts``: a batch's teacher vector says which text it is."""

    def __init__(self):
        self.texts: list[str] = []

    @property
    def fingerprint(self) -> str:
        return "index-teacher"

    def encode(self, texts):
        out = np.zeros((len(texts), 2), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = (len(self.texts), 1.0)  # exact in float32 below 2**24 texts
            self.texts.append(text)
        return out


@pytest.fixture(scope="module")
def index_teacher():
    return IndexTeacher()  # one numbering for the module: the caches below only ever hold its vectors


@pytest.fixture(scope="module")
def corpus_path(small_corpus_path, tmp_path_factory):
    """The small pydoc corpus and one document that cuts windows and chunks inside words: long words of
    several WordPiece tokens, and runs of identifiers with no space, longer than any chunk (the recursive
    splitter then cuts them between any two characters)."""
    rows = []
    for k in range(4):  # the chunker draws a splitter per window: four tries at the recursive one
        words = " ".join(f"internationalization{k}{i} antidisestablishmentarianism" for i in range(100))
        run = ",".join(f"sp_field{k}{i}_expire" for i in range(60))
        rows.append(json.dumps({"id": f"inside_words{k}", "text": f"{run}\n{words}\n" * 3}) + "\n")
    path = tmp_path_factory.mktemp("windows") / "corpus.jsonl"
    path.write_text(small_corpus_path.read_text() + "".join(rows))
    return path


@pytest.mark.parametrize("overflow", ["split", "truncate"])
@pytest.mark.parametrize("prompt", [None, "passage: "])
def test_every_teacher_text_is_the_text_of_the_students_tokens(corpus_path, tmp_path, index_teacher, overflow, prompt):
    tokenizer_name, max_length = TINY["model"]["student"]["tokenizer"], TINY["data"]["windows"]["max_length"]
    windows = WindowConfig(tokenizer=tokenizer_name, max_length=max_length, overflow=overflow, prompt=prompt,
                           max_windows_per_doc=TINY["data"]["windows"]["max_windows_per_doc"], val_fraction=0.0)
    dm = DistillDataModule(corpus=JsonlCorpus(str(corpus_path)), teacher=index_teacher, windows=windows,
                           batching=BatchConfig(batch_size=8), cache=CacheConfig(str(tmp_path / "cache")))
    dm.prepare_data()
    dm.setup("fit")
    data = dm.datasets["train"]
    items = [data[i] for i in range(len(data))]

    # the reference, independent of the data module: each document tokenised whole, with offsets
    tok = load_tokenizer(tokenizer_name)
    tok.model_max_length = 1 << 30
    docs = {d.doc_id: d.text for d in JsonlCorpus(str(corpus_path)).documents()}
    ref = {d: tok(t, add_special_tokens=False, return_offsets_mapping=True) for d, t in docs.items()}
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    head = 1 + len(prompt_ids)  # CLS, then the prompt
    seen = {"spans": 0, "chunks": 0, "retokenised": 0, "starts_inside_a_word": 0, "widened": 0}
    for pack_length in (None, max_length):
        cursor = dict.fromkeys(docs, 0)  # where the next window of a document starts in its tokens
        batch = collate(items, pad_id=tok.pad_token_id, pack_length=pack_length)
        chunk = 0
        for b, ex in enumerate(data.examples):
            r, at, n = int(batch["doc_row"][b]), int(batch["doc_start"][b]), len(items[b]["input_ids"])
            ids = batch["input_ids"][r, at:at + n].tolist()
            content = batch["content_mask"][r, at:at + n].tolist()
            assert n <= max_length and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            assert ids[1:head] == prompt_ids and content == [False] * head + [True] * (n - head - 1) + [False]
            doc = Reference(docs[ex.doc_id], ref[ex.doc_id], cursor[ex.doc_id] - head, tok)
            assert ids[head:-1] == doc.ids[cursor[ex.doc_id]:cursor[ex.doc_id] + n - head - 1]  # the document's own
            cursor[ex.doc_id] = cursor[ex.doc_id] + n - head - 1 if overflow == "split" else len(doc.ids)
            k = len(items[b]["spans"])  # chunk rows come in the items' order
            whole = doc.covered(head, n - 1)
            drawn = [whole[s:e] for s, e in dm.chunker(whole)]
            assert k == len(drawn)  # every chunk the chunker drew on the window, none cut away
            assert (batch["chunk_row"][chunk:chunk + k] == r).all()
            spans = [(head, n - 1)] + [(int(s) - at, int(e) - at) for s, e in
                                       zip(batch["chunk_start"][chunk:chunk + k], batch["chunk_end"][chunk:chunk + k])]
            vectors = [batch["t_whole"][b], *batch["t_chunk"][chunk:chunk + k]]
            chunk += k
            seen["starts_inside_a_word"] += tok.convert_ids_to_tokens(ids[head]).startswith("##")
            for i, ((first, last), vec) in enumerate(zip(spans, vectors, strict=True)):
                assert head <= first < last <= n - 1 and vec[1] == 1.0
                text = index_teacher.texts[int(vec[0])]
                assert text == doc.covered(first, last)  # what the teacher embedded is what the student reads
                seen["spans"] += 1
                if i > 0:  # a chunk's tokens are those its characters touch: whole tokens around the drawn text
                    assert drawn[i - 1] in text
                    seen["chunks"] += 1
                    seen["widened"] += drawn[i - 1] != text
                if doc.word_aligned(first, last):  # WordPiece re-tokenises such a span into the same tokens
                    assert tok(text, add_special_tokens=False)["input_ids"] == ids[first:last]
                    seen["retokenised"] += 1
        assert chunk == len(batch["chunk_row"])  # every chunk of the batch was checked
    # the checks are not vacuous: most spans re-tokenise, some windows and chunks edge inside words
    assert seen["chunks"] > 2 * len(items) and seen["retokenised"] > 0.6 * seen["spans"] and seen["widened"] > 0
    assert seen["starts_inside_a_word"] > 0 or overflow == "truncate"


class Reference:
    """A document tokenised whole (ids and character offsets); token i of a window is token ``shift + i``."""

    def __init__(self, text: str, enc, shift: int, tok) -> None:
        self.text, self.ids, self.offsets, self.shift, self.tok = text, enc["input_ids"], enc["offset_mapping"], shift, tok

    def covered(self, first: int, last: int) -> str:
        """The characters of the window's tokens [first, last)."""
        return self.text[self.offsets[self.shift + first][0]:self.offsets[self.shift + last - 1][1]]

    def word_aligned(self, first: int, last: int) -> bool:
        """Whether tokens [first, last) start at a word start and end at a word end."""
        after = self.shift + last
        return (not self.tok.convert_ids_to_tokens(self.ids[self.shift + first]).startswith("##")
                and (after >= len(self.ids) or not self.tok.convert_ids_to_tokens(self.ids[after]).startswith("##")))
