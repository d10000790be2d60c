"""Data: the processed-data contract (layout, crop store, colours), crop datasets, one step's datasets and loaders."""
