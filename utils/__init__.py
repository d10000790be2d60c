"""Shared helpers: errors, metrics, logging, schedulers, optimisers, checkpoints, distributed, colour maps,
crop-store files, results files and their tables/figures."""
