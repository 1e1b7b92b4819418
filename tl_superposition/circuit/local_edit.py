"""The local edit: remove a signal from one head's query or key input, and nothing else.

ACC++ (Franco & Crovella, arXiv 2602.13483; ``experiments/interventions.py``,
``run_local_intervention``) scores an edge ``U -> D`` by editing only what the downstream
head ``D`` reads: the upstream head's write at the edge's position, projected onto the span of
the downstream firing's selected singular directions (its ``V`` side for a key-side edge, its
``U`` side for a query-side edge), divided by the downstream layer's clean
``ln1.hook_scale`` there (the scale is frozen), is subtracted from ``D``'s normalised input,
and ``D``'s query (or key) is recomputed from it. The residual stream, every other head of
the layer and every earlier activation are untouched; only ``D``'s attention pattern changes
directly, and what follows from it is read at the logits.

Here the edit is made with TransformerLens hooks on ``blocks.{L}.attn.hook_q`` /
``hook_k``: subtracting ``delta @ W_Q[D]`` (or ``W_K[D]``) there is the same as recomputing
the query (key) from the edited input, since the projection is linear and its bias does not
move. Grouped-query models share a key between heads, so while edits run the key heads are
ungrouped (:func:`ungrouped`, TransformerLens's ``ungroup_grouped_query_attention``), which
gives every query head its own key and leaves the outputs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import logit_diff_from_resid

SIDES = ("src", "dest")  # side 0 edits the key (source side), side 1 the query


@contextlib.contextmanager
def ungrouped(model: HookedTransformer) -> Iterator[None]:
    """Within the block, grouped-query attention computes one key and value per query head.

    A no-op for models without grouped-query attention.
    """
    if not model.cfg.n_key_value_heads or model.cfg.ungroup_grouped_query_attention:
        yield
        return
    model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        model.set_ungroup_grouped_query_attention(False)


@dataclass
class LocalEdits:
    """Edits of the query or key inputs of heads of one layer, for a batch of rows.

    One row is one forward pass (one prompt); a row may carry several edits.

    Attributes:
        layer: the downstream layer.
        row: ``[n]`` the batch row of each edit.
        head: ``[n]`` the downstream head.
        side: ``[n]`` 0 edits the key input (source side), 1 the query input.
        pos: ``[n]`` the position edited (the firing's source, or its destination).
        delta: ``[n, d_model]`` what is subtracted from the head's normalised input
            (``ln1.hook_normalized``) at that position.
    """

    layer: int
    row: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    side: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    delta: Float[Tensor, "n d_model"]

    def hooks(self, model: HookedTransformer) -> list[tuple[str | Callable, Callable]]:
        """The ``hook_q`` and ``hook_k`` hooks of :attr:`layer` making the edits (use them
        inside :func:`ungrouped`)."""
        attn = model.blocks[self.layer].attn
        hooks: list[tuple[str | Callable, Callable]] = []
        for side, name, weight in ((1, "hook_q", attn.W_Q), (0, "hook_k", attn.W_K)):
            sel = (self.side == side).nonzero()[:, 0]
            if not len(sel):
                continue
            head = self.head[sel]
            dev = weight.device
            change = torch.einsum(
                "nd,nde->ne", self.delta[sel].to(device=dev, dtype=weight.dtype), weight[head]
            )
            where = (self.row[sel].to(dev), self.pos[sel].to(dev), head.to(dev))

            def edit(t: Tensor, hook, where=where, change=change) -> Tensor:
                del hook
                t = t.clone()
                t.index_put_(where, -change.to(t.dtype), accumulate=True)
                return t

            hooks.append((block_hook(self.layer, f"attn.{name}"), edit))
        return hooks


@torch.inference_mode()
def run_local_edits(
    model: HookedTransformer,
    resid_pre: Float[Tensor, "rows pos d_model"],
    edits: LocalEdits,
    end_pos: Int[Tensor, " rows"],
    io_tokens: Int[Tensor, " rows"],
    s_tokens: Int[Tensor, " rows"],
) -> Float[Tensor, " rows"]:
    """``logit(IO) - logit(S)`` at END of each row after its local edits.

    Runs the model from block ``edits.layer`` (``start_at_layer``) on each row's clean
    ``blocks.{layer}.hook_resid_pre``, with the edits' hooks, to the last block; the logit
    difference comes from :func:`~tl_superposition.tracing.interventions.logit_diff_from_resid`.

    Args:
        model: the model.
        resid_pre: each row's clean residual stream entering the edited layer.
        edits: the edits (rows with none run clean).
        end_pos, io_tokens, s_tokens: where and which logits each row reads.

    Returns:
        float32 on the CPU.
    """
    keys = ungrouped(model) if bool((edits.side == 0).any()) else contextlib.nullcontext()
    with keys, model.hooks(fwd_hooks=edits.hooks(model)):
        resid = model(
            resid_pre, start_at_layer=edits.layer, stop_at_layer=model.cfg.n_layers
        )  # fmt: skip
    return logit_diff_from_resid(model, resid, end_pos, io_tokens, s_tokens)
