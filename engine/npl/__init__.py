"""Neuron Predictability Lens (NPL paper, DESIGN.md "Analyses"): linear maps between the FFN
activation vectors g of two layers, substitution perplexity, functional and background neurons.

Modules (light ones import no torch, so tables and the TUI can read results without it):
- engine.npl.layout      pair specs, the 4 layer chunks (no torch)
- engine.npl.columns     neuron-table columns from the sidecar (no torch)
- engine.npl.capture     reading / replacing g (engine.model.hooks); progress; the LM head's loss
- engine.npl.fit         exact fit by streamed sufficient statistics, the Adagrad recipe, metrics
- engine.npl.plan        the fit's memory plan: pairs in groups that fit, one pass per group
- engine.npl.substitute  substitution perplexity (Table 1) and finer-grained substitution (Fig. 4)
- engine.npl.functional  functional neurons (variance reduction) and background neurons
- engine.npl.job         the jobs: fit, substitute, functional, on a recording cache and its sidecar
The sidecar format is cache.npl_store.
"""
