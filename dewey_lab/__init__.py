"""dewey_lab: long-context text embeddings by chunk-alignment distillation (the Dewey recipe)."""

__version__ = "0.1.0"
