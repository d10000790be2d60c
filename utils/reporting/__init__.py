"""Reporting: what a run writes besides checkpoints (results files, tables, figures, logs, a step's report)."""
