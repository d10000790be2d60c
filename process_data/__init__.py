"""Raw archives -> the processed layout (archive reading, tiling, split files, CLI); dataset commands; generators."""
