"""Batched interventions on the residual stream, read out at attention scores and logits.

Two edits, after Franco & Crovella's intervention experiments (arXiv 2410.00340, Sec. 6;
their ``interventions_single_edge.py``), both made with TransformerLens hooks and run from
cached activations (``start_at_layer``) as far as the read-out needs (``stop_at_layer``):

- :func:`run_output_edits` adds a vector to the output of the attention layer
  ``blocks.{L}.hook_attn_out`` at one position: a change of one head's output that
  propagates through every later layer (their intervention "A"). Many edits of different
  prompts and layers share one forward pass, one edit per batch row.
- :func:`run_input_edits` adds a vector to ``blocks.{L}.ln1.hook_normalized`` at one position
  and runs only block ``L``: the normalisation scale is frozen, so the change of a score is
  exactly the change the bilinear form predicts (their intervention "B").

:func:`span_projector` gives the orthogonal projector onto the span of a firing's selected
singular directions, so an edit can remove (or add back) the part of an upstream write that
lies in that span.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import logit_diff_from_resid
from tl_superposition.tracing.decompose import project
from tl_superposition.tracing.qk_svd import LayerQK, QKSVDCache


def singular_directions(
    qk: QKSVDCache | Mapping[int, LayerQK],
    layer: Int[Tensor, " n"],
    head: Int[Tensor, " n"],
    offset: Int[Tensor, " n"],
    side: Int[Tensor, " n"],
) -> Float[Tensor, "n d_model d_head"]:
    """Every singular direction of each firing's form, ``d_model`` part, float64.

    Column ``k`` is ``v_k`` (source side, ``side == 0``) or ``u_k`` (destination side) of
    head ``head`` of layer ``layer`` at offset ``offset``, without the bias coordinate.
    """
    n = len(layer)
    q0 = qk[int(layer[0])] if n else None
    d_aug, d_head = (q0.q_basis.shape[1], q0.q_basis.shape[2]) if q0 is not None else (1, 1)
    out = torch.zeros(n, d_aug - 1, d_head, dtype=torch.float64)
    for L in layer.unique().tolist():
        rows = (layer == L).nonzero()[:, 0]
        lq = qk[L]
        uc, _, vc = lq.cores(offset[rows])
        h = head[rows].to(uc.device)
        i = torch.arange(len(rows), device=uc.device)
        is_src = (side[rows] == 0).to(uc.device)
        core = torch.where(is_src[:, None, None], vc[i, h], uc[i, h])
        basis = torch.where(is_src[:, None, None], lq.k_basis[h], lq.q_basis[h])
        out[rows] = (basis @ core)[:, :-1].cpu()
    return out


def component_removal(
    qk: LayerQK,
    x_dest: Float[Tensor, "n d_model"],
    x_src: Float[Tensor, "n d_model"],
    head: Int[Tensor, " n"],
    offset: Int[Tensor, " n"],
    selected: Tensor,
    side: int,
) -> Float[Tensor, "n d_model"]:
    """The least-norm ``delta`` whose removal from the normalised input zeroes components.

    On the source side (``side=0``), ``x_src - delta`` has ``(x~ . v_k) = 0`` for every
    selected ``k`` and keeps ``(x~ . v_k)`` of the others (the ``d_model`` parts of the
    ``v_k`` are linearly independent), so the score becomes exactly the sum of the
    contributions of the unselected components; on the destination side the same with
    ``u_k`` and ``x_dest``. Used with :func:`run_input_edits` (scale frozen).

    Args:
        qk: the layer's QK decomposition.
        x_dest, x_src: ``ln1.hook_normalized`` at the firings' positions.
        head, offset: each firing's head and ``dest - src``.
        selected: ``[n, d_head]`` boolean, the components to remove.
        side: 0 (source) or 1 (destination).

    Returns:
        ``delta`` (float64); add ``-delta`` at the edited position.
    """
    proj = project(qk, x_dest, x_src, head, offset)
    coords = (proj.b if side == 0 else proj.a) * selected.to(proj.a.device)
    layer = torch.full_like(head, qk.layer)
    dirs = singular_directions({qk.layer: qk}, layer, head, offset, torch.full_like(head, side))
    dirs = dirs.to(coords.device)
    gram = dirs.transpose(1, 2) @ dirs
    return (dirs @ torch.linalg.solve(gram, coords[:, :, None]))[:, :, 0]


def span_basis(
    directions: Float[Tensor, "n d_model k"], centred: bool = False
) -> Float[Tensor, "n d_model k"]:
    """An orthonormal basis of the span of each row's ``k`` directions (columns).

    Args:
        directions: e.g. the ``d_model`` part of a firing's selected singular vectors;
            all-zero columns (padding) add nothing to the span.
        centred: centre each direction first (LayerNorm models, whose readers never see
            the mean of the residual stream).

    Returns:
        ``Q`` with orthonormal columns spanning the same space (zero columns where the
        span has fewer than ``k`` dimensions), so ``Q Q^T y`` is the projection of ``y``.
    """
    d = directions.to(torch.float64)
    if centred:
        d = d - d.mean(1, keepdim=True)
    q, r = torch.linalg.qr(d)
    diag = torch.diagonal(r, dim1=-2, dim2=-1).abs()
    tol = 1e-10 * d.flatten(1).abs().amax(1, keepdim=True).clamp(min=1e-30)
    return q * (diag > tol)[:, None, :]


def compact_columns(
    directions: Float[Tensor, "n d k"], mask: Bool[Tensor, "n k"]
) -> Float[Tensor, "n d k"]:
    """The masked columns of each row moved to the front, the others zeroed (for
    :func:`span_basis` of a subset of directions, such as a firing's sparse set)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    cols = torch.gather(directions, 2, order[:, None, :].expand_as(directions))
    keep = torch.gather(mask, 1, order)
    return cols * keep[:, None, :]


def project_onto(
    basis: Float[Tensor, "n d_model k"], y: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_model"]:
    """``Q Q^T y`` per row (float64)."""
    y = y.to(torch.float64)
    return torch.einsum("ndk,nk->nd", basis, torch.einsum("ndk,nd->nk", basis, y))


@dataclass
class Readout:
    """Where each batch row is read after an edit.

    Attributes:
        layer, head, dest, src: the attention score (``hook_attn_scores``) and probability
            (``hook_pattern``) read per row.
        end_pos, io_tokens, s_tokens: where and which logits give ``logit(IO) - logit(S)``
            per row; ``None`` reads no logits (and the run stops after the last read layer).
    """

    layer: Int[Tensor, " rows"]
    head: Int[Tensor, " rows"]
    dest: Int[Tensor, " rows"]
    src: Int[Tensor, " rows"]
    end_pos: Int[Tensor, " rows"] | None = None
    io_tokens: Int[Tensor, " rows"] | None = None
    s_tokens: Int[Tensor, " rows"] | None = None


@dataclass
class ReadValues:
    """Values read per batch row: score, pattern and (if asked) logit difference."""

    score: Float[Tensor, " rows"]
    pattern: Float[Tensor, " rows"]
    logit_diff: Float[Tensor, " rows"] | None


def _reader(
    readout: Readout, rows: Tensor, key: str, store: dict[str, Tensor]
) -> Callable[..., None]:
    """A hook reading ``[row, head, dest, src]`` of the rows ``rows`` into ``store[key]``."""

    def read(t: Tensor, hook) -> None:
        del hook
        dev = t.device
        r = rows.to(dev)
        vals = t[
            r, readout.head[rows].to(dev), readout.dest[rows].to(dev), readout.src[rows].to(dev)
        ]
        if key not in store:
            store[key] = torch.full((len(readout.layer),), float("nan"))
        store[key][rows] = vals.detach().float().cpu()

    return read


def _read_hooks(
    readout: Readout, store: dict[str, Tensor]
) -> list[tuple[str, Callable[..., None]]]:
    hooks = []
    for L in readout.layer.unique().tolist():
        rows = (readout.layer == L).nonzero()[:, 0]
        for name, key in (("attn.hook_attn_scores", "score"), ("attn.hook_pattern", "pattern")):
            hooks.append((block_hook(L, name), _reader(readout, rows, key, store)))
    return hooks


@torch.inference_mode()
def run_output_edits(
    model: HookedTransformer,
    resid_pre: Float[Tensor, "rows pos d_model"],
    start_layer: int,
    edit_layer: Int[Tensor, " rows"],
    edit_pos: Int[Tensor, " rows"],
    delta: Float[Tensor, "rows d_model"],
    readout: Readout,
) -> ReadValues:
    """Add ``delta[r]`` to ``blocks.{edit_layer[r]}.hook_attn_out`` at ``edit_pos[r]``, run on.

    Args:
        model: the model.
        resid_pre: each row's ``blocks.{start_layer}.hook_resid_pre`` (from a clean run).
        start_layer: the first block run; at most ``edit_layer.min()``.
        edit_layer, edit_pos, delta: the edit of each row (a zero ``delta`` is a clean row).
        readout: what to read per row (layers at or above ``start_layer``).

    Returns:
        The values read. With logits asked for, the model runs to its last block and
        :func:`logit_diff_from_resid` gives the logit difference; otherwise it stops after
        the highest read layer.

    Raises:
        ValueError: an edit or a read below ``start_layer``.
    """
    if len(edit_layer) and int(edit_layer.min()) < start_layer:
        raise ValueError(f"an edit is below start_layer {start_layer}")
    if int(readout.layer.min()) < start_layer:
        raise ValueError(f"a read-out layer is below start_layer {start_layer}")
    dev = resid_pre.device
    delta = delta.to(device=dev, dtype=resid_pre.dtype)
    hooks = []
    for L in edit_layer.unique().tolist():
        rows = (edit_layer == L).nonzero()[:, 0].to(dev)
        pos = edit_pos.to(dev)[rows]

        def add(t: Tensor, hook, rows=rows, pos=pos) -> Tensor:
            del hook
            t = t.clone()
            t[rows, pos] += delta[rows]
            return t

        hooks.append((block_hook(L, "hook_attn_out"), add))
    store: dict[str, Tensor] = {}
    hooks += _read_hooks(readout, store)
    with_logits = readout.end_pos is not None
    stop = model.cfg.n_layers if with_logits else int(readout.layer.max()) + 1
    with model.hooks(fwd_hooks=hooks):
        resid = model(resid_pre, start_at_layer=start_layer, stop_at_layer=stop)
    ld = None
    if with_logits:
        assert readout.io_tokens is not None and readout.s_tokens is not None
        assert readout.end_pos is not None
        ld = logit_diff_from_resid(
            model, resid, readout.end_pos, readout.io_tokens, readout.s_tokens
        )
    return ReadValues(score=store["score"], pattern=store["pattern"], logit_diff=ld)


@torch.inference_mode()
def run_input_edits(
    model: HookedTransformer,
    resid_pre: Float[Tensor, "rows pos d_model"],
    layer: int,
    edit_pos: Int[Tensor, " rows"],
    delta: Float[Tensor, "rows d_model"],
    readout: Readout,
) -> ReadValues:
    """Add ``delta[r]`` to ``ln1.hook_normalized`` of block ``layer``; run that block only.

    The normalisation scale of the edited position is the clean one (frozen), so the
    score of a head at ``(dest, src)`` with ``src = edit_pos`` changes by exactly
    ``x~_dest^T Omega [delta; 0]`` (and symmetrically on the destination side).

    Args:
        model: the model.
        resid_pre: each row's ``blocks.{layer}.hook_resid_pre``.
        layer: the block.
        edit_pos, delta: the edit of each row.
        readout: places read (all in ``layer``; logits are not read).
    """
    dev = resid_pre.device
    delta = delta.to(device=dev, dtype=resid_pre.dtype)
    rows = torch.arange(len(edit_pos), device=dev)
    pos = edit_pos.to(dev)

    def add(t: Tensor, hook) -> Tensor:
        del hook
        t = t.clone()
        t[rows, pos] += delta
        return t

    store: dict[str, Tensor] = {}
    hooks = [(block_hook(layer, "ln1.hook_normalized"), add), *_read_hooks(readout, store)]
    with model.hooks(fwd_hooks=hooks):
        model(resid_pre, start_at_layer=layer, stop_at_layer=layer + 1)
    return ReadValues(score=store["score"], pattern=store["pattern"], logit_diff=None)


@torch.inference_mode()
def resid_pre_cache(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos n_layers d_model"], dict[str, Tensor]]:
    """A clean run keeping ``hook_resid_pre`` of every block, ``hook_z`` and the scores.

    Returns:
        ``(resid_pre, cache)``: resid_pre stacked over layers; ``cache`` maps each layer's
        ``attn.hook_z``, ``attn.hook_attn_scores``, ``attn.hook_pattern`` names to tensors
        and ``"resid_final"`` to the residual stream after the last block.
    """
    n = model.cfg.n_layers
    keep = ("hook_resid_pre", "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern")
    resid, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name.endswith(keep), stop_at_layer=n
    )
    assert isinstance(resid, Tensor)
    stacked = torch.stack([cache[block_hook(L, "hook_resid_pre")] for L in range(n)], 2)
    out = {k: v for k, v in cache.items() if not k.endswith("hook_resid_pre")}
    out["resid_final"] = resid
    return stacked, out
