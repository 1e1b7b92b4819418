"""Activation collection to safetensors shards, and a memory-mapped reader.

- :func:`collect` -- run a ``HookedTransformer`` over a text source and stream the requested
  hooks (residual stream, normalised input, queries, keys, z, patterns, attention output) to
  ``shard_*.safetensors`` files with a JSON manifest; resumable, atomic, refuses to mix runs.
- :class:`ActivationStore` -- shuffled minibatches of whole contexts or single tokens from those
  shards, memory-mapped; recomputes attention patterns from stored queries and keys.
- :func:`pattern_from_qk` -- the recomputation itself.

Example::

    import tl_superposition as tls
    model = tls.load_model("smollm2-135m")
    tls.collect(model, "../shared/data/wikitext-2", split="valid",
                hooks=["ln1.hook_normalized", "attn.hook_q", "attn.hook_k"], layers=15,
                context_size=128, max_tokens=100_000, out_dir="acts/wt2_l15")
    store = tls.ActivationStore("acts/wt2_l15")
    batch = next(store.iter_contexts(16))          # {hook: [16, 128, ...], "tokens": [16, 128]}
    pattern = store.attention_pattern(batch, 15)   # [16, 9, 128, 128]
"""

from tl_superposition.activations.collector import (
    SHORT_HOOKS,
    STORAGE_DTYPES,
    CollectSummary,
    collect,
    resolve_hooks,
)
from tl_superposition.activations.patterns import attention_params, pattern_from_qk
from tl_superposition.activations.sources import pack_contexts, resolve_source
from tl_superposition.activations.store import ActivationStore, mmap_safetensors

__all__ = [
    "collect",
    "CollectSummary",
    "ActivationStore",
    "pattern_from_qk",
    "attention_params",
    "resolve_hooks",
    "resolve_source",
    "pack_contexts",
    "mmap_safetensors",
    "SHORT_HOOKS",
    "STORAGE_DTYPES",
]
