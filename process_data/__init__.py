"""Raw archives of any tiled dataset (a spec) -> crops, meta.json, split files (dataset/layout.py); the built-in
datasets' commands (ISPRS with its archive quirks); the synthetic ISPRS, LoveDA and OpenEarthMap generators."""
