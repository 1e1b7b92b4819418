"""From a trace to a circuit (ACC++, Franco & Crovella, arXiv 2602.13483).

Data flow, one module per step:

- :mod:`.graphs` -- per-prompt graphs of role nodes (``A23.3:END>IO``) from a trace's files,
  and their unification over prompts.
- :mod:`.local_edit` -- the local edit: a signal removed from one head's query or key input
  only, read at ``logit(IO) - logit(S)``.
- :mod:`.extract` -- :func:`extract_circuit`: the clean run, every candidate edge edited in
  every prompt where it occurs, pruning to what connects to the logits.
- :mod:`.circuit` -- :class:`Circuit`: tables, the head ranking, the files it writes.
- :mod:`.views` -- the pruned circuit by role, as PNG and HTML.
"""

from tl_superposition.circuit.circuit import Circuit
from tl_superposition.circuit.config import CircuitConfig
from tl_superposition.circuit.extract import extract_circuit
from tl_superposition.circuit.graphs import node_name, parse_node, unify
from tl_superposition.circuit.local_edit import LocalEdits, run_local_edits

__all__ = [
    "Circuit",
    "CircuitConfig",
    "extract_circuit",
    "node_name",
    "parse_node",
    "unify",
    "LocalEdits",
    "run_local_edits",
]
