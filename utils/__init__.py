"""Shared helpers: errors, metrics, logging, schedulers, checkpoints, distributed and colour maps."""
