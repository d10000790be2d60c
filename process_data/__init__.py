"""Raw ISPRS archives -> crops, meta.json and split files; the synthetic ISPRS generator."""
