"""The Textual explorer. Screens read caches through engine/ (no torch); long work runs in thread
workers, recordings and analyses in job processes (engine.jobs.launcher)."""
