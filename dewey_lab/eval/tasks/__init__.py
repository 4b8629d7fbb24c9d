"""Retrieval tasks: the RetrievalTask record, LongEmbed / LoCoV1 loaders and synthetic passkey / needle."""
