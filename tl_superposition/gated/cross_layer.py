"""Cross-layer gating: gated blocks for several layers, trained together.

The within-layer method sees only one layer: a penalty on the gates of one block cannot tell
that a layer-0 head and a layer-1 head serve the same (query, key) pair, so superposition
spread across layers survives it (the known limit noted with the method). Here the blocks of
several layers replace their layers *together*:

- the model runs with every block spliced in, so a later block reads the residual stream
  that the earlier blocks wrote;
- the target is the sum of the replaced layers' original attention outputs (for an
  attention-only toy model, the whole change those layers make to the residual stream), so
  work may move from one layer to another;
- the penalty is the L0.6 quasi-norm of the gates of *all* the blocks' heads together on
  each (query, key) pair (``penalty="joint"``): co-attention across layers costs as much as
  co-attention within one. ``penalty="per_layer"`` sums the blocks' separate penalties
  instead, which isolates the effect of training together from that of the joint penalty.

:class:`CrossLayerGatedBlocks` is trained with
:func:`~tl_superposition.gated.train.train_gated_block` on (tokens, summed target) batches from
:func:`cross_layer_source`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule

from tl_superposition.activations.batches import run_hooks
from tl_superposition.core.hooks import block_hook
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.config import GatedAttentionConfig
from tl_superposition.gated.sources import TensorBatches
from tl_superposition.gated.splice import splice

PENALTIES = ("joint", "per_layer")


@dataclass
class CrossLayerConfig:
    """Settings of a :class:`CrossLayerGatedBlocks`.

    Attributes:
        layers: the replaced layers, ascending.
        penalty: ``"joint"`` (one quasi-norm over every block's heads) or ``"per_layer"``.
        blocks: each block's config as a dict.
    """

    layers: list[int]
    penalty: str = "joint"
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be distinct and ascending, got {self.layers}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"layers": list(self.layers), "penalty": self.penalty, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossLayerConfig:
        """Inverse of :meth:`to_dict`; each block's config through
        :meth:`GatedAttentionConfig.from_dict`, so fields it lacks take their defaults.

        Raises:
            ValueError: unknown block config fields.
        """
        blocks = [GatedAttentionConfig.from_dict(b).to_dict() for b in d["blocks"]]
        return cls(list(d["layers"]), d["penalty"], blocks)


class CrossLayerGatedBlocks(HookedRootModule):
    """Gated blocks for several layers of one model, run and trained as a unit.

    Args:
        model: the ``HookedTransformer`` (its weights stay frozen; it is not a submodule).
        blocks: ``{layer: GatedAttentionBlock}``.
        penalty: see :class:`CrossLayerConfig`.

    The blocks are reachable as ``self.blocks[str(layer)]``, with their own hook points.
    """

    def __init__(
        self, model: Any, blocks: dict[int, GatedAttentionBlock], penalty: str = "joint"
    ) -> None:
        super().__init__()
        layers = sorted(blocks)
        self.cfg = CrossLayerConfig(layers, penalty, [blocks[lay].cfg.to_dict() for lay in layers])
        self.blocks = nn.ModuleDict({str(lay): blocks[lay] for lay in layers})
        self._model = [model]  # a list keeps the model out of parameters() and state_dict()
        self.setup()

    @property
    def model(self) -> Any:
        """The model the blocks are spliced into."""
        return self._model[0]

    def block_dict(self) -> dict[int, GatedAttentionBlock]:
        """``{layer: block}``."""
        return {int(k): b for k, b in self.blocks.items()}  # type: ignore[misc]

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Sum of the blocks' outputs with all of them spliced in."""
        return self.forward_with_gate(tokens)[0]

    def forward_with_gate(
        self, tokens: Int[Tensor, "batch pos"]
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor | list[Tensor]]:
        """Summed block outputs and the gates to penalise.

        Returns:
            ``(sum of outputs, gates)``: gates concatenated along heads for the joint
            penalty, a list of per-block gates for the per-layer one.
        """
        outs: dict[int, Tensor] = {}
        gates: dict[int, Tensor] = {}
        blocks = self.block_dict()
        with contextlib.ExitStack() as stack:
            stack.enter_context(splice(self.model, blocks))
            for layer, block in blocks.items():

                def keep_out(t: Tensor, layer: int = layer, **_: Any) -> None:
                    outs[layer] = t

                def keep_gate(t: Tensor, layer: int = layer, **_: Any) -> None:
                    gates[layer] = t

                stack.enter_context(
                    block.hooks(fwd_hooks=[("hook_out", keep_out), ("hook_gate", keep_gate)])
                )
            self.model(tokens, stop_at_layer=max(blocks) + 1)
        layers = sorted(blocks)
        total = torch.stack([outs[lay] for lay in layers]).sum(dim=0)
        if self.cfg.penalty == "joint":
            return total, torch.cat([gates[lay] for lay in layers], dim=1)
        return total, [gates[lay] for lay in layers]


@torch.no_grad()
def summed_attention_output(
    model: Any, tokens: Int[Tensor, "n pos"], layers: list[int], batch_size: int = 5000
) -> Float[Tensor, "n pos d_model"]:
    """Sum over ``layers`` of the model's own ``blocks.L.hook_attn_out``."""
    names = [block_hook(lay, "hook_attn_out") for lay in layers]
    out = []
    device = next(model.parameters()).device
    for lo in range(0, tokens.shape[0], batch_size):
        cache = run_hooks(model, tokens[lo : lo + batch_size].to(device), names)
        out.append(torch.stack([cache[n] for n in names]).sum(dim=0).cpu())
    return torch.cat(out)


def cross_layer_source(
    model: Any, tokens: Int[Tensor, "n pos"], layers: list[int], batch_size: int
) -> TensorBatches:
    """(tokens, summed original attention output) batches, in order, for joint training."""
    return TensorBatches(tokens, summed_attention_output(model, tokens, layers), batch_size)
