"""Where in a gated MLP the rule applies (its sites), and which sites each target covers.

A gated MLP is ``gate_up_proj`` (merged column-parallel) -> act-and-mul -> ``down_proj``
(row-parallel); the paper's input targets (Sec. 3) are the inputs of those two linear layers.
"""

# site -> the linear layer of the gated MLP whose input the site is (vLLM's attribute names).
SITES = {"input": "gate_up_proj", "intermediate": "down_proj"}

# target -> the sites it sparsifies, in model order.
TARGETS = {"input": ("input",), "intermediate": ("intermediate",),
           "all_inputs": ("input", "intermediate")}
