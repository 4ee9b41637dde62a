"""The analysis stage: pure functions on a cache's arrays, one module per analysis (dead.py,
ngrams.py, positional.py, suppression.py), and the job that reads a cache, runs them in dependency
order and stores their results beside the recording (job.py)."""
