"""The model stage: load a causal LM (load.py), find its FFN sites and the hook on them (sites.py),
run it one decoder layer at a time with the rest streamed in (runner.py), and plan what fits the
device and the host (plan.py)."""
