"""Shared helpers: errors, metrics, logging, schedulers, checkpoints, distributed, colour maps, results files and their tables/figures."""
