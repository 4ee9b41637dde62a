"""The record stage: a recording's settings and up-front checks (config.py), its provenance
(meta.py), the layer-major executor (executor.py) accumulating per-batch statistics (stats.py,
kernels.py) and the n-grams they are counted under (grams.py), and the job around them with
checkpoints and resume (job.py)."""
