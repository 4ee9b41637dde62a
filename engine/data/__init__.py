"""The data stage: documents from text files, directories, JSONL, Parquet and saved datasets (each
format's reader in formats.py; sources.py opens the specs and shuffles their documents
deterministically) or the builtin corpus (builtin.py), packed into fixed-length token sequences
(packing.py)."""
