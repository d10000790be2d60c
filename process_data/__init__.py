"""Raw ISPRS archives -> crops, meta.json, split files (utils/data_layout.py); the synthetic ISPRS generator."""
