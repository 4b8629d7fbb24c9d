"""The content-addressed vector store (teacher vectors for training, cached vectors for eval): ``vectors``
(the store: ``VectorStore``, ``cache_key``), ``index`` (its SQLite index), ``shards`` (its shard files and
their one writer), ``maintenance`` (verify, gc, merge, legacy import) and ``cli`` (``dewey-lab cache``)."""
