"""Runs you can trust: a run's identity, study sweeps, checkpoint I/O and ``make compare``."""
