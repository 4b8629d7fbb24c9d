"""The content-addressed vector store (teacher vectors for training, cached vectors for eval): ``vectors``
(the store: ``VectorStore``, ``cache_key``), ``index`` (its SQLite index), ``shards`` (its shard files and
their one writer), ``legacy`` (the former layout, read for its import on open), ``maintenance`` (verify, gc,
merge: built on the store, never imported by it) and ``cli`` (``dewey-lab cache``)."""
