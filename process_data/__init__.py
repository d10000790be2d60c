"""Raw archives -> the processed layout (archive reading, tiling, split files, CLI); per-dataset commands; generators."""
