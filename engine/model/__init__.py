"""The model stage: load a causal LM as a weightless skeleton (load.py) whose decoder layers are read
from safetensors when their turn comes (weights.py), find its FFN sites (sites.py) and hook them, one
mechanism for reading and replacing g (hooks.py), run it one layer at a time with the rest streamed in
(runner.py) over batches of whole sequences (batches.py), and plan what fits the device and the host
(plan.py)."""
