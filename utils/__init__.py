"""Infrastructure: errors, files, checkpoints, run ids, options, distributed, optimiser, metrics, specs; reporting/."""
