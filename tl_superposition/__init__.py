"""tl_superposition: study attention-head superposition in TransformerLens models.

Main entry points:

- :func:`load_model` -- a processed ``HookedTransformer`` from a name, a local Hugging Face
  folder, or the offline ``"smollm2-135m"``.
- :mod:`tl_superposition.ioi` -- IOI prompt generation and the logit-difference metric.
- :mod:`tl_superposition.tracing` -- SVD-sparse attention decomposition and signal tracing
  (Franco & Crovella, arXiv 2410.00340).
- :func:`collect` / :class:`CollectConfig` / :class:`ActivationStore` -- activation collection to
  safetensors shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # torch, TransformerLens and `datasets` load on first use (__getattr__)
    from tl_superposition.activations import ActivationStore, CollectConfig, collect
    from tl_superposition.models import load_model

__all__ = ["load_model", "collect", "CollectConfig", "ActivationStore", "__version__"]


def __getattr__(name: str) -> Any:
    # TransformerLens takes seconds to import: `import tl_superposition` (and the command
    # line's --help) stays instant, and the API loads on first use.
    if name == "load_model":
        from tl_superposition.models import load_model

        return load_model
    if name in ("collect", "CollectConfig", "ActivationStore"):
        from tl_superposition import activations

        return getattr(activations, name)
    raise AttributeError(f"module 'tl_superposition' has no attribute {name!r}")
