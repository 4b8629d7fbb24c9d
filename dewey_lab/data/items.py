"""A window -> the student's item (its token ids, content mask and chunk token spans, with the teacher's
vectors), and items -> one batch (``collate``: one text per row, or packed several per row).

Items are read straight from a window's token ids (``windows.Example``): nothing is tokenised here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dewey_lab.data.packing import first_fit_decreasing
from dewey_lab.data.windows import Example


def item_of(ex: Example) -> dict:
    """What the student reads of a window: ``input_ids`` (T,), ``content_mask`` (T,) and chunk token ``spans``."""
    return {"input_ids": ex.input_ids, "content_mask": ex.content_mask, "spans": list(ex.spans)}


class WindowDataset(Dataset):
    """Windows as items, with their teacher vectors read from the cache (``store``)."""

    def __init__(self, examples: list[Example], store) -> None:
        self.examples, self.store = examples, store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        item = item_of(ex)
        vecs = self.store.get_many(ex.keys)  # (1 + C, D): the window's, then each chunk's
        item["t_whole"], item["t_chunk"] = vecs[0], vecs[1:]
        return item


def text_token_mask(special: list[int], offsets: list[tuple[int, int]], prompt_chars: int) -> list[bool]:
    """For a text tokenised with its prompt in front (``encode``, eval): True for tokens of the text
    itself: not special, not inside the prompt's first ``prompt_chars`` characters, not empty (pooling
    never sees CLS, SEP, prompt or padding). Training windows carry their own mask (``Example``)."""
    return [not sp and start >= prompt_chars and end > start for sp, (start, end) in zip(special, offsets)]


def collate(items: list[dict], pad_id: int = 0, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """One batch: token ids laid out in rows, where each text and chunk is, and the teacher's vectors.

    Unpacked (``pack_length`` None): one text per row, padded to the longest. Packed: texts are
    placed first-fit-decreasing into rows of at most ``pack_length`` tokens, with ``position_ids``
    restarting at each text and ``cu_seqlens`` marking every text (and each row's padding) for
    varlen attention. Either way, text b's CLS token is ``(doc_row[b], doc_start[b])``,
    ``token_doc`` (R, T) says which text owns each token (-1: padding), and chunk i is tokens
    ``[chunk_start[i], chunk_end[i])`` of row ``chunk_row[i]``, in the items' order.
    """
    B = len(items)
    lengths = [len(it["input_ids"]) for it in items]
    rows = [[b] for b in range(B)] if pack_length is None else first_fit_decreasing(lengths, pack_length)
    R, T = len(rows), max(sum(lengths[b] for b in row) for row in rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    token_doc = torch.full((R, T), -1, dtype=torch.long)
    content = torch.zeros(R, T, dtype=torch.bool)
    doc_row, doc_start, segments = [0] * B, [0] * B, []
    for r, row in enumerate(rows):
        at = 0
        for b in row:
            n = lengths[b]
            input_ids[r, at:at + n] = torch.as_tensor(np.asarray(items[b]["input_ids"], dtype=np.int64))
            position_ids[r, at:at + n] = torch.arange(n)
            token_doc[r, at:at + n] = b
            content[r, at:at + n] = torch.as_tensor(np.asarray(items[b]["content_mask"], dtype=bool))
            doc_row[b], doc_start[b] = r, at
            segments.append(n)
            at += n
        if at < T:  # the row's padding: a segment of its own that attends only to itself
            position_ids[r, at:] = torch.arange(T - at)
            segments.append(T - at)
    rows_, starts, ends = [], [], []
    for b, it in enumerate(items):
        for s, e in it["spans"]:
            rows_.append(doc_row[b])
            starts.append(doc_start[b] + s)
            ends.append(doc_start[b] + e)
    t_chunk = [it["t_chunk"] for it in items if len(it["t_chunk"])]
    batch = {
        "input_ids": input_ids, "attention_mask": (token_doc >= 0).long(), "content_mask": content,
        "token_doc": token_doc, "doc_row": torch.tensor(doc_row), "doc_start": torch.tensor(doc_start),
        "chunk_row": torch.tensor(rows_, dtype=torch.long), "chunk_start": torch.tensor(starts, dtype=torch.long),
        "chunk_end": torch.tensor(ends, dtype=torch.long),
        "t_whole": torch.from_numpy(np.stack([it["t_whole"] for it in items])),
        "t_chunk": torch.from_numpy(np.concatenate(t_chunk)) if t_chunk else torch.zeros(0, len(items[0]["t_whole"])),
    }
    if pack_length is not None:
        batch["position_ids"] = position_ids
        batch["cu_seqlens"] = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch["max_seqlen"] = max(segments)
    return batch
