"""QK transcoders: sparse query/key dictionaries of one attention layer and their feature pairs.

Wynroe & Sharkey (2024), "Decomposing the QK circuit with bilinear sparse dictionary learning".
The data flow, one module per step:

- :mod:`.config` -- :class:`AttentionShape`, :class:`QKTranscoderConfig`, :class:`QKTrainConfig`;
- :mod:`.dictionaries` -- the SAELens ``Transcoder`` dictionaries (ReLU, or TopK);
- :mod:`.transcoder` -- :class:`QKTranscoder` (a ``HookedRootModule``): features,
  reconstructions, ``splice(model)``, save/load;
- :mod:`.attention` -- patterns and KL through the model's own attention code;
- :mod:`.source` -- whole-context batches of one or several layers, from a collection or
  streamed from a model (optionally in a context mix);
- :mod:`.loss`, :mod:`.resample`, :mod:`.trainer` -- :func:`train_qk`, and
  :func:`train_qk_layers` for several layers from one forward pass;
- :mod:`.evaluate` -- :func:`evaluate_qk` against mean-q/k and uniform baselines;
- :mod:`.attribution` -- :func:`attribute_score`: one score split into feature pairs;
- :mod:`.ioi_fit` -- :func:`ioi_fit`: the error term and spliced attention on IOI prompts;
- :mod:`.ioi_pairs` -- :func:`ioi_pairs`: the pairs that carry a head's IOI firings, and
  :func:`feature_card` to name their features from text;
- :mod:`.feature_edges` -- :func:`feature_edges`: each active feature's pre-activation split
  over the upstream heads, MLPs and embeddings (upstream -> feature -> firing);
- :mod:`.edge_agreement` -- :func:`edge_agreement`: feature-level edges beside the SVD
  trace's circuit edges of the same firings;
- :mod:`.pairs` -- bilinear map, feature-pair mask (step 2), pair statistics;
- :mod:`.tables` -- pandas tables of pairs and feature contexts; :mod:`.plots` -- figures.

Example::

    import tl_superposition as tls
    from tl_superposition.qk import QKTranscoder, StoreSource, train_qk, evaluate_qk

    model = tls.load_model("smollm2-135m")
    qkt = QKTranscoder.for_model(model, 23, d_hidden=2400)
    train_qk(qkt, model, StoreSource("acts/wt2_l23", qkt.shape), out_dir="runs/qk-l23")
    with qkt.splice(model):
        loss = model(tokens, return_type="loss")
"""

from tl_superposition.activations.packing import pack_text  # re-exported for convenience
from tl_superposition.qk.attribution import ScoreAttribution, attribute_score
from tl_superposition.qk.config import AttentionShape, QKTrainConfig, QKTranscoderConfig
from tl_superposition.qk.edge_agreement import EdgeAgreement, carrier_heads, edge_agreement
from tl_superposition.qk.evaluate import QKEvalResult, evaluate_qk
from tl_superposition.qk.feature_edges import edges_by_upstream, feature_edges
from tl_superposition.qk.ioi_fit import IOIFit, ioi_fit
from tl_superposition.qk.ioi_pairs import feature_card, ioi_pairs
from tl_superposition.qk.pairs import (
    FeaturePairMask,
    PairMaskConfig,
    bilinear_map,
    condensed_pairs,
    pair_statistics,
    train_pair_mask,
)
from tl_superposition.qk.source import MemorySource, ModelSource, QKBatch, StoreSource
from tl_superposition.qk.trainer import TrainResult, layer_folder, train_qk, train_qk_layers
from tl_superposition.qk.transcoder import QKOutput, QKTranscoder

__all__ = [
    "AttentionShape",
    "QKTranscoderConfig",
    "QKTrainConfig",
    "QKTranscoder",
    "QKOutput",
    "StoreSource",
    "ModelSource",
    "MemorySource",
    "QKBatch",
    "pack_text",
    "train_qk",
    "TrainResult",
    "train_qk_layers",
    "layer_folder",
    "evaluate_qk",
    "QKEvalResult",
    "attribute_score",
    "feature_edges",
    "edges_by_upstream",
    "edge_agreement",
    "EdgeAgreement",
    "carrier_heads",
    "ioi_fit",
    "IOIFit",
    "ioi_pairs",
    "feature_card",
    "ScoreAttribution",
    "bilinear_map",
    "train_pair_mask",
    "PairMaskConfig",
    "FeaturePairMask",
    "condensed_pairs",
    "pair_statistics",
]
