"""Text corpora for distillation: every source yields `Document(doc_id, text)`.

Sources are plain classes with simply typed constructor arguments so a LightningCLI
config can pick one with ``class_path``/``init_args``. All of them skip empty and
whitespace-only texts (counted in ``skipped_empty``), honour ``limit`` (kept documents)
and expose ``fingerprint()``, a short hex id of their configuration and content for
run metadata.

``PydocCorpus``, the corpus that needs no download (the standard library's pydoc pages), is
in ``pydoc.py`` (``dewey_lab.data.pydoc.PydocCorpus``).
"""

import gzip
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


class CorpusSource(ABC):
    """Base class: yields Documents, skipping (and counting) empty/whitespace-only texts.

    Args:
        limit: Maximum number of kept documents; ``None`` means all.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        self.limit = limit
        self._skipped_empty = 0

    @property
    def skipped_empty(self) -> int:
        """Empty or whitespace-only texts skipped during the last `documents()` pass."""
        return self._skipped_empty

    def documents(self) -> Iterator[Document]:
        """Kept documents in source order; resets and updates `skipped_empty` as it goes."""
        self._skipped_empty = 0
        if self.limit == 0:
            return
        kept = 0
        raw = self._raw()
        try:
            for doc_id, text in raw:
                if not text or text.isspace():
                    self._skipped_empty += 1
                    continue
                yield Document(doc_id, text)
                kept += 1
                if self.limit is not None and kept >= self.limit:
                    return  # stop pulling: a streamed source should not read past the limit
        finally:
            raw.close()  # release open files now, not whenever the generator is collected

    @abstractmethod
    def _raw(self) -> Iterator[tuple[str, str]]:
        """Yield ``(doc_id, text)`` pairs, empty texts included."""

    def _fingerprint_payload(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def fingerprint(self) -> str:
        payload = {"class": type(self).__name__, **self._fingerprint_payload()}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _resolve_files(path: str, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """A file, or the sorted matching files of a directory (not recursive)."""
    p = Path(path)
    fix = f"set data.corpus.init_args.path to an existing {kind} file or directory"
    if not p.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist; {fix}")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"corpus directory {path} has no {'/'.join(suffixes)} files; {fix}")
    return files


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    # size + mtime_ns instead of a content hash: cheap for multi-GB corpora and changes on any rewrite.
    return [(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files]


class _LocalFileCorpus(CorpusSource):
    """Shared plumbing for sources reading a local file or directory."""

    _suffixes: tuple[str, ...] = ()
    _kind = ""

    def __init__(self, path: str, limit: int | None = None) -> None:
        super().__init__(limit)
        self.path = path

    def _files(self) -> list[Path]:
        # Resolved lazily so configs can be built/printed before the data exists.
        return _resolve_files(self.path, self._suffixes, self._kind)

    def _fingerprint_payload(self) -> dict[str, Any]:
        config = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {**config, "files": _file_stats(self._files())}


class _RecordCorpus(_LocalFileCorpus):
    """Local records with a text field and an optional id field (jsonl rows, parquet rows)."""

    def __init__(
        self, path: str, text_field: str = "text", id_field: str | None = "id", limit: int | None = None
    ) -> None:
        super().__init__(path, limit)
        self.text_field = text_field
        self.id_field = id_field


class JsonlCorpus(_RecordCorpus):
    """One JSON object per line (``.jsonl`` or ``.jsonl.gz``; a file or a directory of them).

    Args:
        path: A .jsonl/.jsonl.gz file, or a directory whose such files are read in name order.
        text_field: Key holding the document text.
        id_field: Key holding the document id; missing ids become ``"{filename}:{line_no}"``.
        limit: Maximum number of kept documents.
    """

    _suffixes = (".jsonl", ".jsonl.gz")
    _kind = ".jsonl"

    def _raw(self) -> Iterator[tuple[str, str]]:
        """Records of every file. Bytes that are not UTF-8 become U+FFFD (counted, logged); raw
        control characters inside strings are accepted; a last line cut off without its newline
        (a writer killed mid-line) is skipped with a warning. A bad line elsewhere is an error."""
        for file in self._files():
            opener = gzip.open if file.name.endswith(".gz") else open
            bad_utf8 = 0
            with opener(file, "rt", encoding="utf-8", errors="replace") as f:
                try:
                    for line_no, line in enumerate(f, start=1):
                        if not line.strip():  # tolerate blank lines (e.g. a trailing newline)
                            continue
                        bad_utf8 += "\ufffd" in line
                        row = self._parse(line, file.name, line_no, last=not line.endswith("\n"))
                        if row is not None:
                            yield row
                except EOFError:  # a .gz cut short
                    log.warning("%s ends early (truncated gzip); read what was there", file.name)
            if bad_utf8:
                log.warning("%s: %d lines had bytes that are not UTF-8, replaced with U+FFFD", file.name, bad_utf8)

    def _parse(self, line: str, name: str, line_no: int, last: bool = False) -> tuple[str, str] | None:
        where = f"{name}:{line_no}"
        try:
            row = json.loads(line, strict=False)  # strict=False: raw control characters in strings
        except json.JSONDecodeError as exc:
            if last:
                log.warning("%s: last line cut off mid-record (no newline, invalid JSON): skipped", where)
                return None
            raise ValueError(
                f"{where}: invalid JSON ({exc.msg}); expected one object with {self.text_field!r} per line"
            ) from None
        if not isinstance(row, dict) or self.text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where}: missing text field {self.text_field!r} (found {keys}); set text_field"
            )
        text = row[self.text_field]
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{where}: field {self.text_field!r} is {type(text).__name__}, expected a string"
            )
        raw_id = row.get(self.id_field) if self.id_field else None
        return (where if raw_id is None else str(raw_id)), text or ""  # null text counts as empty


class TextCorpus(_LocalFileCorpus):
    """Plain ``.txt`` files, read as UTF-8 with undecodable bytes replaced.

    Args:
        path: A .txt file, or a directory whose .txt files are read in name order.
        per_line: One document per line (id ``"{filename}:{line_no}"``) instead of per file.
        limit: Maximum number of kept documents.
    """

    _suffixes = (".txt",)
    _kind = ".txt"

    def __init__(self, path: str, per_line: bool = False, limit: int | None = None) -> None:
        super().__init__(path, limit)
        self.per_line = per_line

    def _raw(self) -> Iterator[tuple[str, str]]:
        for file in self._files():
            with open(file, encoding="utf-8", errors="replace") as f:
                if not self.per_line:
                    yield file.name, f.read()
                    continue
                for line_no, line in enumerate(f, start=1):
                    yield f"{file.name}:{line_no}", line.rstrip("\n")


class ParquetCorpus(_RecordCorpus):
    """Parquet file(s) read in record batches, so memory stays bounded for large shards.

    Args:
        path: A .parquet file, or a directory whose .parquet files are read in name order.
        text_field: Column holding the document text.
        id_field: Column holding the document id; without it ids are ``"{filename}:{row}"`` (0-based).
        limit: Maximum number of kept documents.
    """

    _suffixes = (".parquet",)
    _kind = ".parquet"
    _batch_rows = 1024

    def _raw(self) -> Iterator[tuple[str, str]]:
        import pyarrow.parquet as pq  # lazy: keeps `import dewey_lab.data.corpus` (and the pydoc child) light

        for file in self._files():
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            if self.text_field not in names:
                raise ValueError(
                    f"{file.name}: missing text column {self.text_field!r} (found {names}); set text_field"
                )
            columns = [self.text_field] + ([self.id_field] if self.id_field in names else [])
            row = 0
            for batch in pf.iter_batches(batch_size=self._batch_rows, columns=columns):
                texts = batch.column(self.text_field).to_pylist()
                ids = batch.column(self.id_field).to_pylist() if len(columns) == 2 else [None] * len(texts)
                for text, raw_id in zip(texts, ids, strict=True):
                    yield (f"{file.name}:{row}" if raw_id is None else str(raw_id)), text or ""
                    row += 1


class HFCorpus(CorpusSource):
    """A Hugging Face dataset via ``datasets.load_dataset`` (streamed by default).

    Args:
        path: Dataset repo id (e.g. ``HuggingFaceFW/fineweb-edu``) or a builder such as ``json``.
        name: Dataset config name.
        split: Split to read.
        revision: Git revision to pin, for reproducible runs.
        streaming: Stream rows instead of downloading the whole split first.
        schema: ``text`` (fineweb-edu style ``text`` column), ``conversations``
            (Infinity-Instruct style list of ``{"from", "value"}`` turns, values joined by
            a blank line) or ``auto`` (chosen per row by which column exists).
        data_files: Passed to ``load_dataset``; with ``path="json"`` it reads local files offline.
        limit: Maximum number of kept documents.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        revision: str | None = None,
        streaming: bool = True,
        schema: Literal["auto", "text", "conversations"] = "auto",
        data_files: str | list[str] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(limit)
        if schema not in ("auto", "text", "conversations"):
            raise ValueError(f"schema must be 'auto', 'text' or 'conversations', got {schema!r}")
        self.path, self.name, self.split, self.revision = path, name, split, revision
        self.streaming, self.schema, self.data_files = streaming, schema, data_files

    def _row_text(self, row: dict[str, Any], index: int) -> str:
        schema = self.schema
        if schema == "auto":
            schema = "text" if "text" in row else "conversations" if "conversations" in row else ""
        if schema not in row:
            raise ValueError(
                f"{self.path} ({self.split}) row {index}: no {schema or 'text/conversations'!r} column "
                f"(columns: {sorted(row)}); set schema or pick another dataset"
            )
        if schema == "text":
            return row["text"] or ""
        turns = row["conversations"] or []
        return "\n\n".join(t["value"] for t in turns if t.get("value"))

    def _raw(self) -> Iterator[tuple[str, str]]:
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("HFCorpus needs the `datasets` package: pip install -e .[hub]") from exc
        ds = datasets.load_dataset(
            self.path,
            self.name,
            split=self.split,
            revision=self.revision,
            streaming=self.streaming,
            data_files=self.data_files,
        )
        # ds.iter, not iter(ds): in a DataLoader worker, iter(ds) hands each worker only some of the
        # dataset's files, and a stream's shards (dewey_lab.data.streaming) must see every document
        index = 0
        for block in ds.iter(batch_size=256):
            for row in (dict(zip(block, values)) for values in zip(*block.values())):
                raw_id = row.get("id")
                yield (f"{self.split}:{index}" if raw_id is None else str(raw_id)), self._row_text(row, index)
                index += 1

    def _fingerprint_payload(self) -> dict[str, Any]:
        config = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        files = [self.data_files] if isinstance(self.data_files, str) else self.data_files or []
        local = [Path(f) for f in files if Path(f).is_file()]  # remote files: revision pins them
        return {**config, "files": _file_stats(local)}


class MixtureCorpus(CorpusSource):
    """Several sources as one; ids become ``"{source_index}:{doc_id}"`` so they stay unique.

    Args:
        sources: Corpus sources (each with its own limit).
        interleave: take one document from each source in turn (sources that run out drop out)
            instead of reading them one after another: a stream then mixes them from its start.
        limit: Maximum number of kept documents over the whole mixture.
    """

    def __init__(self, sources: list[CorpusSource], interleave: bool = False, limit: int | None = None) -> None:
        super().__init__(limit)
        if not sources:
            raise ValueError("MixtureCorpus needs at least one source")
        self.sources, self.interleave = list(sources), interleave

    @property
    def skipped_empty(self) -> int:
        return self._skipped_empty + sum(s.skipped_empty for s in self.sources)

    def _raw(self) -> Iterator[tuple[str, str]]:
        for source in self.sources:  # sources the limit never reaches must not report stale counts
            source._skipped_empty = 0
        if not self.interleave:
            for index, source in enumerate(self.sources):
                for doc in source.documents():
                    yield f"{index}:{doc.doc_id}", doc.text
            return
        streams = {index: source.documents() for index, source in enumerate(self.sources)}
        try:
            while streams:
                for index in list(streams):
                    doc = next(streams[index], None)
                    if doc is None:
                        del streams[index]
                    else:
                        yield f"{index}:{doc.doc_id}", doc.text
        finally:
            for stream in streams.values():
                stream.close()

    def _fingerprint_payload(self) -> dict[str, Any]:
        return {"sources": [s.fingerprint() for s in self.sources], "limit": self.limit,
                "interleave": self.interleave}
