"""Shared helpers: errors, metrics, logging, schedulers, optimisers, checkpoints, atomic files, distributed,
colour maps, the processed-data layout and crop-store files, results files and their tables/figures."""
