"""The engine: everything ffnscope computes, usable without the TUI, in pipeline order.

    model     load a causal LM, find its FFN sites, run it layer by layer within a memory plan
    data      documents from files and datasets (or the builtin corpus), packed into token sequences
    record    stream the packed tokens through the model layer-major and accumulate firing statistics
    analysis  pure functions on a cache's arrays: dead, n-gram detectors, positional, suppression
    npl       the Neuron Predictability Lens: linear maps between layers and substitution checks
    jobs      background jobs: launch, progress files and liveness, one stop mechanism
    explore   the read model the TUI and exports share: neuron index, per-layer figures, detail, catalog
    table     columnar tables, the filter language, exports

Dependencies point down this list's stages and into ffnscope.cache (the HDF5 format), never up.
paths, units and safe_text are leaves any stage may use.
"""
