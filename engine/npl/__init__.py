"""Neuron Predictability Lens (NPL paper, DESIGN.md "Analyses"): linear maps between the FFN
activation vectors g of two layers, substitution perplexity, functional and background neurons.

Modules (light ones import no torch, so tables and the TUI can read results without it):
- engine.npl.layout      pair specs, the 4 layer chunks (no torch)
- engine.npl.columns     neuron-table columns from the sidecar (no torch)
- engine.npl.capture     reading / replacing g (engine.model.hooks); progress; the LM head's loss
- engine.npl.fit         exact fit by streamed sufficient statistics, the Adagrad recipe, the passes
- engine.npl.maps        where each group's maps go (kept, or into the sidecar) and their held-out metrics
- engine.npl.plan        memory plans: the fit's pairs in groups that fit, one pass per group; which layers
                         stay resident under --device-memory / --host-memory (the rest stream)
- engine.npl.substitute  substitution perplexity (Table 1) and finer-grained substitution (Fig. 4)
- engine.npl.functional  functional neurons (variance reduction) and background neurons
- engine.npl.inputs      what a job reads: the recording's meta, model and sequences, fit data, held-out sequences
- engine.npl.job         the jobs: fit, substitute, functional, on a recording cache and its sidecar
The sidecar format is cache.npl_store.
"""
