"""Which heads carry which task: head-subset ablations of toy models (gated or not).

The central quantity is :func:`correct_under_ablation`: for every *kept* subset of heads (the
others zero-ablated, i.e. their outputs ``hook_result`` removed from the residual stream),
whether the model still answers each asked position correctly (argmax of the logits). Toy
models have no final normalisation, so the last layer's contribution to the logits is linear
in its heads' outputs: one forward pass serves every subset of the last layer's heads, and
only subsets of earlier layers' heads need their own forward pass.

From it:

- :func:`ablation_table` -- accuracy per task for every subset of heads (a pandas table,
  plotted by :func:`tl_superposition.toys.plots.plot_ablation`);
- :func:`head_usage` -- per task and head: needed (ablating it alone breaks the task),
  sufficient alone, solely encoding (see :func:`tl_superposition.toys.check.solely_encoded`);
- :func:`minimal_head_sets` -- the smallest head sets that keep a task above threshold;
- :func:`attention_ranking` -- each head's ranking of the signal tokens on the OV-coherent
  task (the "inverted attention preferences" of Greenspan & Wynroe).

Heads are labelled ``"L.H"`` (layer, head), e.g. ``"0.3"``; for a spliced gated block ``H``
is the block's head.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from tl_superposition.core.hooks import block_hook
from tl_superposition.toys.datasets import ToyDataset

MAX_ABLATION_HEADS = 12


def heads_of(model: Any, blocks: Mapping[int, Any] | None = None) -> list[tuple[int, int]]:
    """Every head ``(layer, head)`` of ``model`` with ``blocks`` spliced in, in layer order."""
    blocks = blocks or {}
    out = []
    for layer in range(model.cfg.n_layers):
        n = blocks[layer].cfg.n_heads if layer in blocks else model.cfg.n_heads
        out += [(layer, h) for h in range(n)]
    return out


def head_label(layer: int, head: int) -> str:
    """``"layer.head"``."""
    return f"{layer}.{head}"


def all_subsets(n: int) -> Bool[Tensor, "n_subsets n"]:
    """Every subset of ``n`` items as a boolean keep-mask, ordered by size then position."""
    rows = [
        [i in combo for i in range(n)]
        for size in range(n + 1)
        for combo in itertools.combinations(range(n), size)
    ]
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, n)


def _check_toy(model: Any) -> None:
    if model.cfg.normalization_type is not None or not model.cfg.attn_only:
        raise ValueError(
            "head ablations here need an attention-only toy model without normalisation "
            "(tl_superposition.toys.models.make_toy_model)"
        )


def _result_hook(
    stack: contextlib.ExitStack, model: Any, blocks: Mapping[int, Any], layer: int, fn: Any
) -> None:
    """Attach ``fn`` to layer ``layer``'s per-head outputs (the model's or the block's)."""
    if layer in blocks:
        stack.enter_context(blocks[layer].hooks(fwd_hooks=[("hook_result", fn)]))
    else:
        stack.enter_context(model.hooks(fwd_hooks=[(block_hook(layer, "attn.hook_result"), fn)]))


@torch.inference_mode()
def correct_under_ablation(
    model: Any,
    dataset: ToyDataset,
    keep: Bool[Tensor, "n_masks n_heads_total"],
    blocks: Mapping[int, Any] | None = None,
    batch_size: int = 10_000,
    include_residual: bool = True,
) -> Bool[Tensor, "n_masks n_asked"]:
    """Whether each asked position is answered correctly with only the kept heads.

    Args:
        model: an attention-only toy ``HookedTransformer`` (``use_attn_result`` on).
        dataset: the samples; columns of the result follow :meth:`ToyDataset.asked`.
        keep: one row per ablation, one column per head of :func:`heads_of` (True = kept).
        blocks: ``{layer: GatedAttentionBlock}`` spliced in place of those layers.
        batch_size: samples per forward pass.
        include_residual: argmax the model's logits (True), or only the unembedded sum of
            the last layer's kept head outputs and its bias, without the residual stream it
            adds to (False; the reading of cmathw/gated-attn's check, for one-layer models).

    Returns:
        ``[n_masks, n_asked]`` booleans.

    Raises:
        ValueError: not a toy model, or ``keep`` has the wrong number of columns.
    """
    from tl_superposition.gated.splice import splice

    _check_toy(model)
    blocks = dict(blocks or {})
    heads = heads_of(model, blocks)
    if keep.ndim != 2 or keep.shape[1] != len(heads):
        raise ValueError(f"keep must be [n_masks, {len(heads)}] (one column per head)")
    last = model.cfg.n_layers - 1
    last_cols = torch.tensor([i for i, (lay, _) in enumerate(heads) if lay == last])
    early_cols = torch.tensor(
        [i for i, (lay, _) in enumerate(heads) if lay < last], dtype=torch.long
    )
    early_layers = list(range(last))
    if early_cols.numel():
        uniq, inverse = torch.unique(keep[:, early_cols], dim=0, return_inverse=True)
    else:  # one layer: a single forward pass serves every subset
        uniq, inverse = keep.new_zeros((1, 0)), torch.zeros(keep.shape[0], dtype=torch.long)
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(dataset), batch_size):
        part = dataset.subset(slice(lo, lo + batch_size))
        s, p = part.asked()
        target = part.targets[s, p].to(device)
        correct = torch.zeros(keep.shape[0], s.numel(), dtype=torch.bool)
        for u in range(uniq.shape[0]):
            resid_pre, bias, res = _last_layer_terms(
                model, blocks, part.tokens.to(device), uniq[u], early_layers, heads, splice
            )
            base = resid_pre + bias
            if not include_residual:
                base = base - resid_pre
            base, res = base[s, p], res[s, p]  # [n_asked, d_model], [n_asked, H_last, d_model]
            rows = (inverse == u).nonzero().squeeze(1)
            for chunk in rows.split(64):
                k_last = keep[chunk][:, last_cols].to(res.dtype).to(device)
                resid = base[None] + torch.einsum("mh,nhd->mnd", k_last, res)
                pred = model.unembed(resid).argmax(-1)
                correct[chunk] = (pred == target[None]).cpu()
        out.append(correct)
    return torch.cat(out, dim=1)


def _last_layer_terms(
    model: Any,
    blocks: dict[int, Any],
    tokens: Tensor,
    early_keep: Tensor,
    early_layers: list[int],
    heads: list[tuple[int, int]],
    splice: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Last layer's residual input, bias and per-head outputs, with early heads masked."""
    last = model.cfg.n_layers - 1
    got: dict[str, Tensor] = {}
    offsets = {
        lay: [i for i, (other, _) in enumerate(heads) if other == lay] for lay in early_layers
    }
    early_index = {
        i: j for j, i in enumerate(sorted(i for lay in early_layers for i in offsets[lay]))
    }
    with contextlib.ExitStack() as stack:
        if blocks:
            stack.enter_context(splice(model, blocks))
        for layer in early_layers:
            mask = early_keep[[early_index[i] for i in offsets[layer]]].to(tokens.device)

            def ablate(r: Tensor, mask: Tensor = mask, **_: Any) -> Tensor:
                return r * mask.to(r.dtype)[None, None, :, None]

            _result_hook(stack, model, blocks, layer, ablate)

        def save(name: str):
            def fn(t: Tensor, **_: Any) -> None:
                got[name] = t

            return fn

        _result_hook(stack, model, blocks, last, save("result"))
        stack.enter_context(
            model.hooks(
                fwd_hooks=[
                    (block_hook(last, "hook_resid_pre"), save("resid_pre")),
                    (block_hook(last, "hook_attn_out"), save("attn_out")),
                ]
            )
        )
        model(tokens)
    bias = got["attn_out"] - got["result"].sum(dim=2)
    return got["resid_pre"], bias, got["result"]


@dataclass
class SubsetAblation:
    """Correctness of every asked position under every kept head subset.

    Attributes:
        labels: head labels ``"L.H"``, one per column of ``keep``.
        keep: ``[n_masks, n_heads]`` kept subsets.
        correct: ``[n_masks, n_asked]`` from :func:`correct_under_ablation`.
        task: ``[n_asked]`` task index of each asked position.
        task_names: names of the tasks.
    """

    labels: list[str]
    keep: Bool[Tensor, "n_masks n_heads"]
    correct: Bool[Tensor, "n_masks n_asked"]
    task: Tensor
    task_names: list[str]

    @property
    def n_tasks(self) -> int:
        """Number of tasks."""
        return len(self.task_names)

    def counts(self) -> Tensor:
        """Asked positions per task (float ``[n_tasks]``)."""
        return torch.bincount(self.task, minlength=self.n_tasks).float()

    def accuracy(self) -> Tensor:
        """``[n_masks, n_tasks]`` accuracy of each task under each subset (NaN if absent)."""
        out = torch.zeros(self.keep.shape[0], self.n_tasks)
        for m in range(self.keep.shape[0]):
            out[m] = torch.bincount(self.task[self.correct[m]], minlength=self.n_tasks).float()
        return out / self.counts()

    def mask_index(self, kept: Sequence[int]) -> int:
        """Row of ``keep`` whose kept heads are exactly ``kept`` (column indices)."""
        want = torch.zeros(self.keep.shape[1], dtype=torch.bool)
        want[list(kept)] = True
        rows = (self.keep == want).all(dim=1).nonzero()
        if rows.numel() == 0:
            raise KeyError(f"subset {list(kept)} was not ablated")
        return int(rows[0, 0])

    def table(self) -> pd.DataFrame:
        """One row per (subset, task): ``task``, ``task_name``, ``kept`` and ``ablated`` (head
        labels joined by ``+``, ``"-"`` for none), ``n_kept``, ``accuracy``, ``n``."""
        acc = self.accuracy()
        counts = self.counts()
        rows = []
        for m in range(self.keep.shape[0]):
            kept = [lab for lab, k in zip(self.labels, self.keep[m].tolist()) if k]
            ablated = [lab for lab, k in zip(self.labels, self.keep[m].tolist()) if not k]
            for t in range(self.n_tasks):
                rows.append(
                    {
                        "task": t,
                        "task_name": self.task_names[t],
                        "kept": "+".join(kept) or "-",
                        "ablated": "+".join(ablated) or "-",
                        "n_kept": len(kept),
                        "accuracy": float(acc[m, t]),
                        "n": int(counts[t]),
                    }
                )
        return pd.DataFrame(rows)


def subset_ablation(
    model: Any,
    dataset: ToyDataset,
    blocks: Mapping[int, Any] | None = None,
    keep: Bool[Tensor, "n_masks n_heads_total"] | None = None,
    include_residual: bool = True,
) -> SubsetAblation:
    """Ablate every subset of heads (or the given ones) and record correctness.

    Args:
        model, dataset, blocks, include_residual: as in :func:`correct_under_ablation`.
        keep: the kept subsets (default: all ``2 ** n_heads``, at most
            ``2 ** MAX_ABLATION_HEADS``).

    Raises:
        ValueError: more than :data:`MAX_ABLATION_HEADS` heads and no explicit ``keep``.
    """
    heads = heads_of(model, blocks)
    if keep is None:
        if len(heads) > MAX_ABLATION_HEADS:
            raise ValueError(
                f"{len(heads)} heads give 2**{len(heads)} subsets; pass keep= to choose some "
                f"(at most {MAX_ABLATION_HEADS} heads for all subsets)"
            )
        keep = all_subsets(len(heads))
    correct = correct_under_ablation(
        model, dataset, keep, blocks, include_residual=include_residual
    )
    s, p = dataset.asked()
    labels = [head_label(*h) for h in heads]
    return SubsetAblation(labels, keep, correct, dataset.task[s, p], list(dataset.task_names))


def ablation_table(
    model: Any,
    dataset: ToyDataset,
    blocks: Mapping[int, Any] | None = None,
    keep: Bool[Tensor, "n_masks n_heads_total"] | None = None,
) -> pd.DataFrame:
    """Accuracy of every task with only a subset of heads kept (the others zero-ablated).

    The table of :func:`subset_ablation` (see :meth:`SubsetAblation.table`).
    """
    return subset_ablation(model, dataset, blocks, keep).table()


def solely_encoding_fraction(
    correct: Bool[Tensor, "n_masks n_asked"],
    keep: Bool[Tensor, "n_masks n_heads_total"],
    task: Tensor,
    n_tasks: int,
) -> Tensor:
    """Per task and head, the fraction of asked positions answered correctly under *every*
    kept subset that contains the head (the head kept, every combination of the others
    ablated).

    Args:
        correct, keep: from :func:`correct_under_ablation` with ``keep`` = all subsets.
        task: task index of each asked position ``[n_asked]``.

    Returns:
        float ``[n_tasks, n_heads_total]``.
    """
    n_heads = keep.shape[1]
    counts = torch.bincount(task, minlength=n_tasks).float().clamp(min=1)
    out = torch.zeros(n_tasks, n_heads)
    for h in range(n_heads):
        ok = correct[keep[:, h]].all(dim=0)
        out[:, h] = torch.bincount(task[ok], minlength=n_tasks).float() / counts
    return out


def head_usage(
    model: Any,
    dataset: ToyDataset,
    blocks: Mapping[int, Any] | None = None,
    threshold: float = 0.99,
    ablation: SubsetAblation | None = None,
) -> pd.DataFrame:
    """Per task and head: is the head needed, sufficient alone, solely encoding the task?

    Args:
        model, dataset, blocks: as in :func:`correct_under_ablation`.
        threshold: accuracy threshold.
        ablation: a :func:`subset_ablation` over all subsets, if already computed.

    Returns:
        One row per (task, head): ``task_name``, ``head``, ``needed`` (ablating only this head
        drops the task to ``<= threshold``), ``alone_accuracy`` (only this head kept),
        ``solely_fraction`` (see :func:`solely_encoding_fraction`) and ``solely`` (that
        fraction ``> threshold``).
    """
    ab = ablation or subset_ablation(model, dataset, blocks)
    acc = ab.accuracy()
    frac = solely_encoding_fraction(ab.correct, ab.keep, ab.task, ab.n_tasks)
    n = len(ab.labels)
    rows = []
    for i, label in enumerate(ab.labels):
        without = acc[ab.mask_index([j for j in range(n) if j != i])]
        alone = acc[ab.mask_index([i])]
        for t in range(ab.n_tasks):
            rows.append(
                {
                    "task": t,
                    "task_name": ab.task_names[t],
                    "head": label,
                    "needed": bool(without[t] <= threshold),
                    "alone_accuracy": float(alone[t]),
                    "solely_fraction": float(frac[t, i]),
                    "solely": bool(frac[t, i] > threshold),
                }
            )
    return pd.DataFrame(rows)


def minimal_head_sets(table: pd.DataFrame, threshold: float = 0.99) -> pd.DataFrame:
    """The smallest kept head sets that answer each task above ``threshold``.

    Args:
        table: an :func:`ablation_table`.

    Returns:
        One row per task: ``task_name``, ``size`` (heads in the smallest sufficient sets, NaN
        if even all heads fail), ``sets`` (those sets, as ``+``-joined labels).
    """
    rows = []
    for t, grp in table.groupby("task", sort=True):
        name = str(grp["task_name"].iloc[0])
        ok = grp[grp["accuracy"] > threshold]
        if ok.empty:
            rows.append({"task": t, "task_name": name, "size": float("nan"), "sets": []})
            continue
        size = int(pd.Series(ok["n_kept"]).to_numpy().min())
        sets = sorted(ok.loc[ok["n_kept"] == size, "kept"].tolist())
        rows.append({"task": t, "task_name": name, "size": size, "sets": sets})
    return pd.DataFrame(rows)


def attention_ranking(
    model: Any,
    dataset: ToyDataset,
    tokens: Sequence[int] | None = None,
    layer: int = 0,
) -> pd.DataFrame:
    """Mean attention from the asked (read-off) position to each important token, per head.

    Only sequences containing the token count for it, so a head's preference is measured
    wherever it can show. On the OV-coherent task the two heads of a trained model tend to rank
    the signal tokens in opposite orders (Greenspan & Wynroe's "inverted attention
    preferences"): between them they cover every signal token, and a head attending to its
    second favourite tells the model that its favourite is absent.

    Args:
        model: a toy ``HookedTransformer``.
        dataset: samples with asked positions (one per sample on the OV-coherent task).
        tokens: the important tokens (default: the dataset's ``signal`` tokens).
        layer: the layer whose pattern is read.

    Returns:
        One row per (head, token): ``head``, ``token``, ``attention`` (mean over sequences),
        ``rank`` (1 = the head's favourite).

    Raises:
        ValueError: no ``tokens`` given and the dataset has no signal tokens.
    """
    if tokens is None:
        if "signal" not in dataset.params:
            raise ValueError("pass tokens=[...]: the dataset defines no signal tokens")
        tokens = list(dataset.params["signal"])
    device = next(model.parameters()).device
    name = block_hook(layer, "attn.hook_pattern")
    with torch.inference_mode():
        _, cache = model.run_with_cache(dataset.tokens.to(device), names_filter=[name])
    pattern = cache[name].cpu()  # [batch, head, q, k]
    s, p = dataset.asked()
    rows_attn = pattern[s, :, p, :]  # [n_asked, head, k]
    toks = dataset.tokens[s]  # [n_asked, k]
    rows = []
    for h in range(pattern.shape[1]):
        for tok in tokens:
            at = toks == tok
            present = at.any(dim=1)
            mass = (rows_attn[:, h, :] * at).sum(dim=1)[present]
            rows.append({"head": h, "token": int(tok), "attention": float(mass.mean())})
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("head")["attention"].rank(ascending=False, method="first").astype(int)
    return df
