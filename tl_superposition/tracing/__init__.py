"""SVD-sparse attention decomposition and signal tracing (Franco & Crovella, arXiv 2410.00340).

Data flow, one module per step:

- :mod:`.qk_svd` -- each head's QK bilinear form as an exact thin SVD (per RoPE offset).
- :mod:`.config` -- :class:`TraceConfig`; :mod:`.cache` -- the one forward pass per batch.
- :mod:`.decompose` -- firings, per-component contributions to each score, sparse sets,
  signal directions; a sample of non-firings decomposed the same way (step 1).
- :mod:`.writes` -- upstream writes into a firing's signal directions (step 2).
- :mod:`.edges` -- the edge rules (the paper's and ours) as pure functions.
- :mod:`.walk` -- edges by the rule and the walk from seed firings (step 3).
- :mod:`.seeds` -- seed choosers fed by the same forward pass; :mod:`.prompt_seeds` --
  ACC++'s per-prompt seeds (direct logit attribution split by source).
- :mod:`.trace` -- :func:`trace` runs the steps batch by batch on any prompts and seeds.
- :mod:`.store` -- the trace's files, streamed to parquet batch by batch.
- :mod:`.graph` -- node names (``A9.6``, ``M3``, ``E``), aggregated tables, networkx graphs
  (ours and the paper's shape).
- :mod:`.ioi_trace` -- the IOI job (:func:`trace_ioi`): per-prompt or DLA seeds, ACC++'s
  positions, its outputs and summary. The circuit made from it is
  :mod:`tl_superposition.circuit`'s, its scoring :mod:`tl_superposition.evaluation`'s.
- :mod:`.interventions` -- batched edits of the residual stream read out at scores and logits.
- :mod:`.validate` -- every edge ablated, boosted and compared with a random control
  (:func:`validate_edges`).
- :mod:`.patching` -- a trace's raw head set against activation patching (precision, recall,
  F1) and faithfulness under mean ablation.
- :mod:`.plots`, :mod:`.html` -- figures and the self-contained interactive view.
"""

from tl_superposition.tracing.cache import BatchCache, run_batch
from tl_superposition.tracing.config import TraceConfig
from tl_superposition.tracing.decompose import (
    LayerFirings,
    find_firings,
    project,
    selected_mask,
    shortest_prefix,
)
from tl_superposition.tracing.edges import paper_rule, positive_rule, select_edges
from tl_superposition.tracing.graph import Node, NodeKind, head_name, parse_heads
from tl_superposition.tracing.ioi_trace import (
    DLASeeds,
    IOITrace,
    choose_seeds,
    head_logit_attribution,
    trace_ioi,
)
from tl_superposition.tracing.patching import PatchingComparison, compare_with_patching
from tl_superposition.tracing.prompt_seeds import PromptSeeds, end_attribution, seed_mask
from tl_superposition.tracing.qk_svd import LayerQK, QKSVDCache
from tl_superposition.tracing.seeds import FixedSeeds, SeedChooser
from tl_superposition.tracing.trace import TraceResult, trace
from tl_superposition.tracing.validate import EdgeValidation, validate_edges
from tl_superposition.tracing.walk import walk_upstream
from tl_superposition.tracing.writes import ResidualWriters, upstream_writes

__all__ = [
    "find_firings",
    "project",
    "selected_mask",
    "shortest_prefix",
    "LayerFirings",
    "LayerQK",
    "QKSVDCache",
    "paper_rule",
    "positive_rule",
    "select_edges",
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
    "walk_upstream",
    "SeedChooser",
    "FixedSeeds",
    "trace_ioi",
    "IOITrace",
    "DLASeeds",
    "PromptSeeds",
    "end_attribution",
    "seed_mask",
    "choose_seeds",
    "head_logit_attribution",
    "validate_edges",
    "EdgeValidation",
    "compare_with_patching",
    "PatchingComparison",
]
