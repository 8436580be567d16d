"""Where in a gated MLP the rule applies (its sites), and which sites each target covers.

A gated MLP is ``gate_up_proj`` (merged column-parallel) -> act-and-mul -> ``down_proj``
(row-parallel). The paper's sites (Sec. 2.2) are, in model order:

- ``input``: the MLP input, i.e. ``gate_up_proj``'s input;
- ``gate``: act(gate_proj x), the gate half of ``gate_up_proj``'s output after the activation;
- ``up``: up_proj x, the other half;
- ``intermediate``: act(gate) * up, i.e. ``down_proj``'s input.

``input`` and ``intermediate`` are inputs of linear layers: zeroed entries let a sparse GEMM skip
the matching weight columns (the cpu and triton backends). ``gate`` and ``up`` are for analysis:
sparsifying them changes the product fed to ``down_proj`` and skips no weight read.

A target is a named group (``TARGETS``) or a comma list of sites (``"gate,intermediate"``).
"""

from __future__ import annotations

# site -> the module of the gated MLP it belongs to (vLLM's attribute names), in model order.
SITES = {"input": "gate_up_proj", "gate": "act_fn", "up": "act_fn",
         "intermediate": "down_proj"}

# Sites whose zeroed entries can skip weight reads (inputs of a linear layer), and analysis-only
# sites (inside act-and-mul: no weights to skip).
WEIGHT_SITES = ("input", "intermediate")
ANALYSIS_SITES = ("gate", "up")

# named target -> the sites it sparsifies, in model order.
TARGETS = {"input": ("input",), "intermediate": ("intermediate",),
           "all_inputs": ("input", "intermediate")}


def sites_of(target: str) -> tuple[str, ...]:
    """The sites of ``target`` (a key of ``TARGETS`` or a comma list of ``SITES``), in model
    order. Raises ValueError for anything else (an unknown or repeated site, an empty list)."""
    if not isinstance(target, str):
        raise ValueError(f"not a target: {target!r}")
    if target in TARGETS:
        return TARGETS[target]
    names = target.split(",")
    if not names or any(n not in SITES for n in names) or len(set(names)) != len(names):
        raise ValueError(f"not a target: {target!r}")
    return tuple(s for s in SITES if s in names)


def target_of(sites) -> str:
    """The canonical target naming exactly ``sites`` (an iterable of ``SITES`` keys): the named
    target when one matches, else the sites in model order joined by commas."""
    wanted = tuple(s for s in SITES if s in set(sites))
    for name, covered in TARGETS.items():
        if covered == wanted:
            return name
    return ",".join(wanted)
