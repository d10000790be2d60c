"""Infrastructure (errors, files, checkpoints, run ids, distributed, optimiser, metrics, dataset specs); reporting/."""
