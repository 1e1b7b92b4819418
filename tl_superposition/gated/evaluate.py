"""How well a gated block stands in for a real model's attention layer, on held-out text.

:func:`evaluate_splice` reports

- the fraction of variance of ``blocks.L.hook_attn_out`` that the block explains,
  ``FVE = 1 - sum (y - y_hat)^2 / sum (y - mean(y))^2`` over tokens and ``d_model`` (BOS
  positions left out: their attention output is a constant the layer writes at every
  context start);
- next-token loss of the model with and without the block spliced in;
- the IOI logit difference (Wang et al. 2022) with and without it (optional);
- co-attention before and after: heads active per causal (query, key) pair and the share of
  active pairs served by two or more heads, from the layer's own ``hook_pattern`` (before)
  and the block's ``hook_gated_pattern`` (after), a head being active at ``>= threshold``;
  keys at position 0 (BOS, the attention sink) are left out.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_superposition.core.hooks import block_hook
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.gates import active_head_histogram, summarize_histogram
from tl_superposition.gated.splice import splice


@torch.inference_mode()
def evaluate_splice(
    model: Any,
    block: GatedAttentionBlock,
    tokens: Int[Tensor, "n_contexts ctx"],
    *,
    ioi: Any = None,
    threshold: float = 0.1,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Figures of ``block`` spliced into ``model`` at ``block.cfg.layer``.

    Args:
        model: the ``HookedTransformer``.
        block: a trained block for one of its layers.
        tokens: held-out contexts (starting with BOS).
        ioi: an :class:`~tl_superposition.ioi.IOIDataset` for the logit-difference change.
        threshold: attention value at which a head counts as active on a pair.
        batch_size: contexts per forward pass.

    Returns:
        ``{"fve", "loss", "loss_spliced", "loss_change", "n_tokens", "before", "after",
        "gate_open"}`` plus ``"ioi_logit_diff"``, ``"ioi_logit_diff_spliced"``,
        ``"ioi_change"`` when ``ioi`` is given. ``before``/``after`` are
        :func:`~tl_superposition.gated.gates.summarize_histogram` dicts (``n_heads`` added);
        ``gate_open`` the same statistics for gates ``>= 0.5``.

    Raises:
        ValueError: the block does not fit the model.
    """
    layer = block.cfg.layer
    if layer is None:
        raise ValueError("the block records no layer (cfg.layer); build it with from_layer")
    block.check_fits(model, layer)
    names = [
        block_hook(layer, n) for n in (block.cfg.input_hook, "hook_attn_out", "attn.hook_pattern")
    ]
    device = next(model.parameters()).device
    d = block.cfg.d_model
    sums = {"sse": 0.0, "n": 0, "loss": 0.0, "loss_spliced": 0.0}
    y_sum = torch.zeros(d, dtype=torch.float64)
    y_sq = torch.zeros(d, dtype=torch.float64)
    hists = {k: torch.zeros(1, dtype=torch.long) for k in ("before", "after", "gate_open")}
    got: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any) -> None:
        got[hook.name] = t

    for lo in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluate", disable=not progress):
        toks = tokens[lo : lo + batch_size].to(device)
        loss, cache = model.run_with_cache(toks, names_filter=names, return_type="loss")
        with block.hooks(fwd_hooks=[("hook_gated_pattern", keep), ("hook_gate", keep)]):
            y_hat = block(cache[names[0]].float())
        with splice(model, {layer: block}):
            loss_spliced = model(toks, return_type="loss")
        y = cache[names[1]].float()
        err = (y - y_hat)[:, 1:].double()
        sums["sse"] += float((err**2).sum())
        y_rows = y[:, 1:].reshape(-1, d).double().cpu()
        y_sum += y_rows.sum(0)
        y_sq += (y_rows**2).sum(0)
        sums["n"] += y_rows.shape[0]
        sums["loss"] += float(loss) * toks.shape[0]
        sums["loss_spliced"] += float(loss_spliced) * toks.shape[0]
        for key, values, level in (
            ("before", cache[names[2]], threshold),
            ("after", got["hook_gated_pattern"], threshold),
            ("gate_open", got["hook_gate"], 0.5),
        ):
            h = active_head_histogram(values, level, skip_first_key=True)
            hists[key] = _add(hists[key], h)
    n_ctx = tokens.shape[0]
    sst = float((y_sq - y_sum**2 / sums["n"]).sum())
    out: dict[str, Any] = {
        "layer": layer,
        "n_tokens": int(tokens.numel()),
        "fve": 1.0 - sums["sse"] / sst,
        "loss": sums["loss"] / n_ctx,
        "loss_spliced": sums["loss_spliced"] / n_ctx,
        "threshold": threshold,
    }
    out["loss_change"] = out["loss_spliced"] - out["loss"]
    for key, hist in hists.items():
        heads = model.cfg.n_heads if key == "before" else block.cfg.n_heads
        out[key] = {**summarize_histogram(hist), "n_heads": heads}
    if ioi is not None:
        from tl_superposition.ioi import logit_diff

        base = logit_diff(model, ioi)
        with splice(model, {layer: block}):
            spliced = logit_diff(model, ioi)
        out["ioi_logit_diff"] = float(base.mean())
        out["ioi_logit_diff_spliced"] = float(spliced.mean())
        out["ioi_change"] = out["ioi_logit_diff_spliced"] - out["ioi_logit_diff"]
    return out


def _add(a: Tensor, b: Tensor) -> Tensor:
    n = max(len(a), len(b))
    return torch.nn.functional.pad(a, (0, n - len(a))) + torch.nn.functional.pad(b, (0, n - len(b)))
