"""Circuit faithfulness with counterfactual patching, and MIB's CPR and CMD.

MIB's circuit-localisation track (Mueller et al. 2025, arXiv 2504.13151; its code
``hannamw/MIB-circuit-track``, ``evaluation.py``) scores a circuit ``C`` by

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty)),

``m`` the mean over prompts of ``logit(IO) - logit(S)`` at END, ``m(C)`` the metric when every
component outside ``C`` takes its activation from the counterfactual prompt. Here the
components are attention heads (this project's circuits are head-level): a head outside
``C`` has its ``hook_z`` replaced, at every position, by its value in a clean run of the
counterfactual prompt; heads in ``C``, the MLPs and the embeddings are computed as usual on
the edited residual stream. So ``f(every head) = 1`` and ``f(no head) = 0`` exactly.

A method's ranking gives a circuit at each size of MIB's grid, the fractions
:data:`MIB_FRACTIONS` of all heads (``int(fraction * n_heads_total)`` heads, as MIB's
``apply_topn``); CPR is the area under ``f`` over the fractions and CMD the area under
``|1 - f|``, both by the trapezoid rule on the linear fraction axis from 0.001 to 1, as MIB
integrates (:func:`cpr_cmd`). Higher CPR and lower CMD are better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import IOIDataset, logit_diff_from_resid

Head = tuple[int, int]
# MIB's circuit sizes, as fractions of every component (``MIB_circuit_track``, evaluation).
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def sizes_for(n_total: int, fractions: Sequence[float] = MIB_FRACTIONS) -> list[int]:
    """The number of heads of each fraction: ``int(fraction * n_total)`` (MIB's rounding)."""
    return [int(f * n_total) for f in fractions]


def cpr_cmd(fractions: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)``: the trapezoid areas under ``f`` and under ``|1 - f|`` over the fractions.

    Raises:
        ValueError: lengths differ, fewer than two points, or fractions not increasing.
    """
    x, y = np.asarray(fractions, dtype=float), np.asarray(f, dtype=float)
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need as many fractions as values (>= 2), got {len(x)} and {len(y)}")
    if not (np.diff(x) > 0).all():
        raise ValueError("fractions must be increasing")
    dx = np.diff(x)
    cpr = float((dx * (y[1:] + y[:-1]) / 2).sum())
    gap = np.abs(1 - y)
    cmd = float((dx * (gap[1:] + gap[:-1]) / 2).sum())
    return cpr, cmd


def head_z(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos n_layers n_heads d_head"]:
    """Every head's ``hook_z`` in a clean run of ``tokens``, stacked over layers."""
    names = {block_hook(L, "attn.hook_z") for L in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n in names, stop_at_layer=model.cfg.n_layers
    )
    return torch.stack([cache[block_hook(L, "attn.hook_z")] for L in range(model.cfg.n_layers)], 2)


def patch_heads_hooks(
    keep: Bool[Tensor, "n_layers n_heads"],
    z_cf: Float[Tensor, "batch pos n_layers n_heads d_head"],
) -> list[tuple[str | Callable, Callable]]:
    """Hooks giving every head not in ``keep`` (a boolean mask) its counterfactual ``hook_z``."""
    hooks: list[tuple[str | Callable, Callable]] = []
    for L in range(keep.shape[0]):
        if bool(keep[L].all()):
            continue
        swap = ~keep[L].to(z_cf.device)

        def patch(z: Tensor, hook, L=L, swap=swap) -> Tensor:
            del hook
            return torch.where(swap[None, None, :, None], z_cf[:, : z.shape[1], L], z)

        hooks.append((block_hook(L, "attn.hook_z"), patch))
    return hooks


@dataclass
class Faithfulness:
    """Scores head sets on fixed prompts and counterfactuals (module docstring).

    Make one with :meth:`prepare`; each :meth:`metric` call is one forward pass per batch.

    Attributes:
        model, dataset: the model and the prompts (held out from discovery).
        z_cf: ``[n_prompts, pos, n_layers, n_heads, d_head]`` the counterfactual run's z.
        m_full, m_empty: the metric with no head and with every head patched.
        batch_size: prompts per forward pass.
    """

    model: HookedTransformer
    dataset: IOIDataset
    z_cf: Float[Tensor, "n_prompts pos n_layers n_heads d_head"]
    m_full: float
    m_empty: float
    batch_size: int = 64
    _memo: dict[frozenset, float] = field(default_factory=dict, repr=False)

    @classmethod
    @torch.inference_mode()
    def prepare(
        cls,
        model: HookedTransformer,
        dataset: IOIDataset,
        counterfactual: Int[Tensor, "n_prompts pos"],
        batch_size: int = 64,
    ) -> Faithfulness:
        """Run the counterfactual prompts once, and the two ends of the scale.

        Raises:
            ValueError: ``counterfactual`` not of the prompts' shape, or full and empty
                circuits with the same metric (nothing to normalise by).
        """
        if counterfactual.shape != dataset.tokens.shape:
            raise ValueError(
                f"counterfactual must have the prompts' shape {tuple(dataset.tokens.shape)}, "
                f"got {tuple(counterfactual.shape)}"
            )
        dev = next(model.parameters()).device
        z = [
            head_z(model, counterfactual[lo : lo + batch_size].to(dev))
            for lo in range(0, len(dataset), batch_size)
        ]
        width = counterfactual.shape[1]
        z_cf = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, width - t.shape[1]))
                          for t in z])  # fmt: skip
        out = cls(model, dataset, z_cf, 0.0, 0.0, batch_size)
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        out.m_full = out.metric(torch.ones(n_layers, n_heads, dtype=torch.bool))
        out.m_empty = out.metric(torch.zeros(n_layers, n_heads, dtype=torch.bool))
        if abs(out.m_full - out.m_empty) < 1e-6:
            raise ValueError("the full and the empty circuit give the same metric; f is undefined")
        return out

    @torch.inference_mode()
    def per_prompt(self, keep: Bool[Tensor, "n_layers n_heads"]) -> Float[Tensor, " n_prompts"]:
        """``logit(IO) - logit(S)`` of each prompt with the heads outside ``keep`` patched."""
        ds, dev = self.dataset, next(self.model.parameters()).device
        out = []
        for lo in range(0, len(ds), self.batch_size):
            part = ds[lo : lo + self.batch_size]
            z_cf = self.z_cf[lo : lo + len(part), : part.tokens.shape[1]]
            hooks = patch_heads_hooks(keep, z_cf)
            with self.model.hooks(fwd_hooks=hooks):
                resid = self.model(part.tokens.to(dev), stop_at_layer=self.model.cfg.n_layers)
            out.append(
                logit_diff_from_resid(
                    self.model, resid, part.end_pos, part.io_tokens, part.s_tokens
                )
            )
        return torch.cat(out)

    def metric(self, keep: Bool[Tensor, "n_layers n_heads"]) -> float:
        """``m``: the mean over prompts of :meth:`per_prompt`."""
        return float(self.per_prompt(keep).mean())

    def mask(self, heads: Iterable[Head]) -> Bool[Tensor, "n_layers n_heads"]:
        """The boolean mask of ``heads``.

        Raises:
            ValueError: a head outside the model.
        """
        n_layers, n_heads = self.model.cfg.n_layers, self.model.cfg.n_heads
        keep = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for L, h in heads:
            if not (0 <= L < n_layers and 0 <= h < n_heads):
                raise ValueError(f"head {L}.{h} is outside the model ({n_layers} x {n_heads})")
            keep[L, h] = True
        return keep

    def score(self, heads: Iterable[Head]) -> float:
        """``f(heads)`` (module docstring); a head set scored before is not run again."""
        keep = self.mask(heads)
        if bool(keep.all()):
            return 1.0
        if not bool(keep.any()):
            return 0.0
        key = frozenset(map(tuple, keep.nonzero().tolist()))
        if key not in self._memo:
            self._memo[key] = self.metric(keep)
        return (self._memo[key] - self.m_empty) / (self.m_full - self.m_empty)

    def curve(
        self, ranking: Sequence[Head], fractions: Sequence[float] = MIB_FRACTIONS
    ) -> pd.DataFrame:
        """``f`` of the top heads of ``ranking`` at each fraction of all heads.

        Returns:
            fraction, n_heads, faithfulness; CPR and CMD follow with :func:`cpr_cmd`.

        Raises:
            ValueError: a ranking that is not every head of the model once.
        """
        n_total = self.model.cfg.n_layers * self.model.cfg.n_heads
        if len(set(ranking)) != n_total or len(ranking) != n_total:
            raise ValueError(
                f"a ranking must hold every head once ({n_total}), got {len(ranking)} entries, "
                f"{len(set(ranking))} distinct"
            )
        done: dict[int, float] = {}
        rows = []
        for frac, k in zip(fractions, sizes_for(n_total, fractions)):
            if k not in done:
                done[k] = self.score(ranking[:k])
            rows.append({"fraction": frac, "n_heads": k, "faithfulness": done[k]})
        return pd.DataFrame(rows)


def summarise_curves(curves: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """``{"cpr": {method: value}, "cmd": {method: value}}`` of each method's curve."""
    out: dict[str, dict[str, Any]] = {"cpr": {}, "cmd": {}}
    for name, c in curves.items():
        out["cpr"][name], out["cmd"][name] = cpr_cmd(c.fraction, c.faithfulness)
    return out
