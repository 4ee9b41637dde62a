"""Columnar tables (table.py), their filter language (filter.py), and exports to CSV, JSONL, Parquet
and Markdown (export.py). No torch, no textual."""
