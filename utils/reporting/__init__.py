"""Reporting: results files, their tables and figures, the TensorBoard/text logger, a step's report."""
