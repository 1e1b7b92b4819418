"""SVD-sparse attention decomposition and signal tracing (Franco & Crovella, arXiv 2410.00340).

Data flow, one module per step:

- :mod:`.qk_svd` -- each head's QK bilinear form as an exact thin SVD (per RoPE offset).
- :mod:`.decompose` -- firings, per-component contributions to each score, sparse sets.
- :mod:`.trace` -- upstream writes into the selected directions, edges, recursion
  (:func:`trace` works on any prompts and seeds).
- :mod:`.graph` -- node names (``A9.6``, ``M3``, ``E``), the firings and edges tables, the
  networkx graph and the files they are saved to.
- :mod:`.ioi_trace` -- the IOI job (:func:`trace_ioi`), its outputs and summary.
- :mod:`.plots` -- circuit graph and component-usage figures.
"""

from tl_superposition.tracing.decompose import (
    LayerFirings,
    find_firings,
    project,
    selected_mask,
    shortest_prefix,
)
from tl_superposition.tracing.graph import Node, NodeKind, head_name, parse_heads
from tl_superposition.tracing.ioi_trace import (
    IOITrace,
    choose_seeds,
    head_logit_attribution,
    trace_ioi,
)
from tl_superposition.tracing.qk_svd import LayerQK, QKSVDCache
from tl_superposition.tracing.trace import (
    BatchCache,
    ResidualWriters,
    TraceConfig,
    TraceResult,
    run_batch,
    trace,
    upstream_writes,
)

__all__ = [
    "find_firings",
    "project",
    "selected_mask",
    "shortest_prefix",
    "LayerFirings",
    "LayerQK",
    "QKSVDCache",
    "Node",
    "NodeKind",
    "head_name",
    "parse_heads",
    "TraceConfig",
    "TraceResult",
    "BatchCache",
    "ResidualWriters",
    "run_batch",
    "trace",
    "upstream_writes",
    "trace_ioi",
    "IOITrace",
    "choose_seeds",
    "head_logit_attribution",
]
