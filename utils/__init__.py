"""Shared helpers: errors, metrics, logging, schedulers, optimisers, checkpoints, atomic files, distributed,
colour maps, dataset specs (specs/: the built-in datasets and task files), the processed-data layout and crop-store
files, results files and their tables/figures."""
