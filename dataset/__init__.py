"""ISPRS crop datasets, the incremental wrapper (split files + label remapping) and joint transforms."""
