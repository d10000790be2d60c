"""Incremental-learning methods: a registry from name to Method class; each owns its losses, presets and state."""
