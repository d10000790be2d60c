"""Infrastructure (errors, files, checkpoints, run ids, option roles, distributed, optimiser, metrics); reporting/."""
