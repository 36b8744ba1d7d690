"""Prefect flows: thin shells over the stage functions in ``coin.stages``."""
