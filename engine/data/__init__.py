"""The data stage: documents from text files, directories, JSONL, Parquet and saved datasets
(sources.py) or the builtin corpus (builtin.py), shuffled deterministically and packed into
fixed-length token sequences (packing.py)."""
