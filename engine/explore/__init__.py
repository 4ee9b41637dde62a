"""The read model of a finished cache that the TUI, the CLI's exports and the Python API share: the
neuron index (index.py, its per-neuron n-gram lists in grams.py), neuron and layer tables and the
one computation of the per-layer figures (tables.py), one neuron's detail (detail.py), the
catalog of recordings on disk (catalog.py), job duration estimates (estimate.py) and the split-half
comparison of two recordings, finding by finding (reproduce.py). No torch, no textual."""
