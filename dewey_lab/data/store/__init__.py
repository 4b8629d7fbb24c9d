"""The content-addressed vector store (teacher vectors for training, cached vectors for eval) and
its maintenance commands (``dewey-lab cache``)."""
