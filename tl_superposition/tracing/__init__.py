"""SVD-sparse attention decomposition and signal tracing (Franco & Crovella, arXiv 2410.00340).

Data flow, one module per step:

- :mod:`.qk_svd` -- each head's QK bilinear form as an exact thin SVD (per RoPE offset).
- :mod:`.decompose` -- firings, per-component contributions to each score, sparse sets.
- :mod:`.trace` -- upstream writes into the selected directions, edges, recursion
  (:func:`trace` works on any prompts and seeds).
- :mod:`.ioi_trace` -- the IOI job (:func:`trace_ioi`), its outputs and summary.
- :mod:`.plots` -- circuit graph and component-usage figures.
"""

from tl_superposition.tracing.decompose import find_firings, project, shortest_prefix
from tl_superposition.tracing.ioi_trace import (
    IOITrace,
    choose_seeds,
    head_logit_attribution,
    trace_ioi,
)
from tl_superposition.tracing.qk_svd import LayerQK, QKSVDCache
from tl_superposition.tracing.trace import (
    TraceConfig,
    TraceResult,
    parse_heads,
    trace,
    upstream_writes,
)

__all__ = [
    "find_firings",
    "project",
    "shortest_prefix",
    "LayerQK",
    "QKSVDCache",
    "TraceConfig",
    "TraceResult",
    "parse_heads",
    "trace",
    "upstream_writes",
    "trace_ioi",
    "IOITrace",
    "choose_seeds",
    "head_logit_attribution",
]
