"""ResNet backbones with a pluggable normalisation+activation (in-place ABN or pure PyTorch)."""
