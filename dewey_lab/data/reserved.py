"""Text reserved for evaluation: the installed packages no training corpus may read (a leaf module, so the
corpus, its decontamination and the evaluation tasks can all import it without a circle)."""

EVAL_PACKAGES: tuple[str, ...] = ("networkx",)
"""Installed packages whose text is evaluation-only (``dewey_lab.eval.tasks.heldout``): never in a training
corpus. ``PydocCorpus`` refuses them by name and drops any page that shares a 50-token span with them.
networkx is a torch dependency, so it is in every environment that runs dewey_lab, with ~270 modules of
numpy-style docstrings, one-line summaries included."""
