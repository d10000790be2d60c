"""Shared helpers: errors, metrics, logging, schedulers, checkpoints, distributed, colour maps, crop-store files."""
