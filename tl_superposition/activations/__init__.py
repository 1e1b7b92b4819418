"""Activation collection to safetensors shards, and a memory-mapped reader.

The data flow, one module each:

- :mod:`.config` -- :class:`CollectConfig`, every setting of a collection, checked up front;
- :mod:`.sources` -- a source (the built-in ``pydoc`` corpus, ``"auto"``, a text file or
  folder, a hub dataset, strings, token ids) -> documents -> packed contexts;
- :mod:`.packing` -- :func:`open_packing` / :func:`pack_text`: which BOS and separator a model's
  contexts carry (every method packs text through it);
- :mod:`.collector` -- :func:`collect`: run a ``HookedTransformer`` over the contexts and stream
  the requested hooks (residual stream, normalised input, queries, keys, z, patterns, attention
  output) to ``shard_*.safetensors`` files; resumable, atomic, refuses to mix runs;
- :mod:`.folder` -- the layout of a collection folder and its manifest;
- :mod:`.store` -- :class:`ActivationStore`: shuffled minibatches of whole contexts or single
  tokens from those shards, memory-mapped; recomputes attention patterns from stored q and k;
- :mod:`.patterns` -- :func:`pattern_from_qk`, the recomputation itself.

Example::

    import tl_superposition as tls
    model = tls.load_model("smollm2-135m")
    config = tls.CollectConfig(
        out_dir="acts/wt2_l15", hooks=["ln1.hook_normalized", "attn.hook_q", "attn.hook_k"],
        layers=15, context_size=128, max_tokens=100_000, split="valid")
    tls.collect(model, config, "path/to/wikitext-2")
    store = tls.ActivationStore("acts/wt2_l15")
    batch = next(store.iter_contexts(16))          # {hook: [16, 128, ...], "tokens": [16, 128]}
    pattern = store.attention_pattern(batch, 15)   # [16, 9, 128, 128]
"""

from tl_superposition.activations.collector import CollectSummary, collect, resolve_hooks
from tl_superposition.activations.config import SHORT_HOOKS, STORAGE_DTYPES, CollectConfig
from tl_superposition.activations.packing import Packing, open_packing, pack_text, special_tokens
from tl_superposition.activations.patterns import attention_params, pattern_from_qk
from tl_superposition.activations.sources import pack_contexts, resolve_source
from tl_superposition.activations.store import ActivationStore

__all__ = [
    "collect",
    "CollectConfig",
    "CollectSummary",
    "ActivationStore",
    "pattern_from_qk",
    "attention_params",
    "resolve_hooks",
    "resolve_source",
    "pack_contexts",
    "pack_text",
    "open_packing",
    "Packing",
    "special_tokens",
    "SHORT_HOOKS",
    "STORAGE_DTYPES",
]
